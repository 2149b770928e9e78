"""fp16 compute with dynamic loss scaling (train.py --dtype fp16, the default on T4-class GPUs), tested on a CPU.

bitsandbytes 0.50 runs NF4 matmuls in fp16 on the CPU, so the whole T4 path runs here: 4-bit base
with compute dtype fp16, LoRA adapters in float32, torch.amp.GradScaler("cpu").

Where fp16 sits in that path. peft's k-bit preparation casts the embeddings, norms and head to
float32, so in 4-bit the residual stream is float32 and only the 4-bit matmuls (forward and the
input gradient of their backward) run in fp16. With --no_load_in_4bit everything but the LoRA
weights is fp16. Both paths are tested; in both, small gradients underflow without scaling.
"""
import dataclasses
import json
import os
import subprocess
import sys

import bitsandbytes as bnb
import pytest
import torch

import cegppo
import train
from engine import bench, lab, logprobs, models, runlog

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The default run's mini-batch: P 8 / steps_per_generation 4 = 2 groups x G 8 = 16 responses of up to
# 512 tokens. The loss of each micro-batch is divided by this count (token mean over the mini-batch),
# which is what makes per-token gradients small: A / 8192 ~ 1e-4 before they enter the network.
MINI_BATCH_TOKENS = 8192


# ----------------------------------------------------------------------------------------------
# train.py end to end with --dtype fp16
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("four_bit", [True, False], ids=["4bit", "16bit"])
def test_fp16_run_trains_and_logs_the_scale(tmp_path, four_bit, capsys):
    out = str(tmp_path / "run")
    args = ["train.py", "--model", "tiny", "--dataset", "tiny", "--dtype", "fp16", "--max_steps", "2",
            "--eval_limit", "0", "--output_dir", out] + ([] if four_bit else ["--no_load_in_4bit"])
    p = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=os.environ.copy())
    assert p.returncode == 0, p.stderr[-3000:]
    assert "fp16 compute (--dtype fp16): dynamic loss scaling on" in p.stderr
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["loss_scale"] == 65536.0 and r["skipped_updates"] == 0 and r["updates"] >= 1
    from safetensors.torch import load_file
    lora_b = {k: v for k, v in load_file(os.path.join(out, "adapter_model.safetensors")).items() if "lora_B" in k}
    assert lora_b and all(torch.isfinite(v).all() for v in lora_b.values())
    assert sum(int((v != 0).sum()) for v in lora_b.values()) > 0       # lora_B starts at zero: the updates moved it
    # a step whose 2 updates overflowed (1 before it): one warning line per update skipped, with the running count
    cfg = train.parse_config(args[1:] + ["--resume"])
    row = dict(rows[-1], skipped_updates=3)
    run = runlog.Run(cfg, 2)
    run.write(row, sampled=None, skipped=2)
    run.bar.close()
    warned = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning")]
    assert warned == ["warning: step 2: non-finite loss or gradient, update skipped (2 so far)",
                      "warning: step 2: non-finite loss or gradient, update skipped (3 so far)"]


# ----------------------------------------------------------------------------------------------
# The gradient of one batch: fp16 + loss scaling against fp32
# ----------------------------------------------------------------------------------------------
def batch(tok):
    """8 responses to 4 prompts (2 groups of size 4 with advantages +1 / -1), left-padded like a rollout."""
    rows = lab.toy_rows("train", tiny=True)[:8]
    prompts = [tok(cegppo.format_prompt(tok, q))["input_ids"] for q, _ in rows]
    comps = [tok(f"{q[8:-1]}=\\boxed{{{a}}}" + tok.eos_token)["input_ids"] for q, a in rows]
    P, T = max(map(len, prompts)), max(map(len, comps))
    ids = torch.full((8, P + T), tok.pad_token_id)
    amask, cmask = torch.zeros(8, P + T, dtype=torch.long), torch.zeros(8, T, dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, comps)):
        ids[i, P - len(p):P], amask[i, P - len(p):P] = torch.tensor(p), 1
        ids[i, P:P + len(c)], amask[i, P:P + len(c)], cmask[i, :len(c)] = torch.tensor(c), 1, 1
    return cegppo.Rollout(input_ids=ids, attention_mask=amask, completion_mask=cmask, truncated=torch.zeros(8, dtype=bool),
                          prompt_len=P, texts=[""] * 8)


def load(dtype, four_bit):
    """The warm-started tiny model with a LoRA whose B is small and random (as after a few updates:
    at init B = 0 and every lora_A gradient is zero), the same in every dtype."""
    torch.manual_seed(0)
    model, tok = models.load_model(lab.warm_start_path("tiny"), four_bit=four_bit, lora_rank=8, trainable=True,
                                    dtype=dtype, gradient_checkpointing=False)
    g = torch.Generator().manual_seed(1)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data = torch.randn(p.shape, generator=g) * 1e-2
    model.train()
    return model, tok


def gradients(model, tok, scale):
    """LoRA gradients (divided by `scale` again) and the gradients w.r.t. the inputs of the base linear
    layers (computed in the compute dtype: exact zeros there are fp16 underflow) for one micro-batch."""
    model.zero_grad(set_to_none=True)
    inputs = []
    hooks = [m.register_full_backward_hook(lambda m, gi, go: inputs.append(gi[0].float() / scale))
             for n, m in model.named_modules() if n.endswith("base_layer") and "layers.0." not in n]
    ro = batch(tok)
    lp, _ = logprobs.chunked_logprobs(model, ro.input_ids, ro.attention_mask, ro.prompt_len,
                                         with_entropy=False)
    adv = torch.tensor([1.0, -1.0] * 4)
    loss, _ = cegppo.cegppo_loss(lp, lp.detach(), adv, ro.completion_mask, num_tokens=MINI_BATCH_TOKENS,
                                 **cegppo.ALGOS["cegppo"])
    (loss * scale).backward()
    for h in hooks:
        h.remove()
    return {n: p.grad.float() / scale for n, p in model.named_parameters() if p.requires_grad}, inputs


def rel_err(g, ref):
    return (sum(((g[n] - ref[n]) ** 2).sum() for n in ref) / sum((ref[n] ** 2).sum() for n in ref)).sqrt().item()


def underflow_share(inputs, ref_inputs):
    """Share of the base layers' input-gradient entries that are non-zero in fp32 and exactly zero here."""
    lost = sum(int(((r != 0) & (g == 0)).sum()) for g, r in zip(inputs, ref_inputs))
    return lost / sum(int((r != 0).sum()) for r in ref_inputs)


def set_compute_dtype(model, dtype):
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.compute_dtype = dtype


@pytest.mark.parametrize("four_bit", [True, False], ids=["4bit", "16bit"])
def test_scaled_fp16_gradient_matches_fp32_and_unscaled_underflows(four_bit):
    if four_bit:
        # The reference is the same NF4 weights with float32 compute: loading in fp16 rounds the weights
        # to fp16 before quantising, which flips a few NF4 codes (about 0.5% of the weight norm).
        model, tok = load("fp16", True)
        set_compute_dtype(model, torch.float32)
        ref, ref_in = gradients(model, tok, 1.0)
        set_compute_dtype(model, torch.float16)
    else:
        ref, ref_in = gradients(*load("fp32", False), 1.0)
        model, tok = load("fp16", False)
    scaled, scaled_in = gradients(model, tok, 65536.0)        # GradScaler's initial scale
    unscaled, unscaled_in = gradients(model, tok, 1.0)
    assert all(scaled[n].abs().sum() > 0 for n in ref)        # lora_A and lora_B of every layer get a gradient
    # Tolerance 1e-2 (relative L2 over all LoRA gradients). fp16 rounds every activation to a unit
    # roundoff of 2^-11 ~ 4.9e-4; the forward and backward pass through ~20 rounded matmuls and
    # softmaxes per layer and the +1 / -1 advantages make the gradient a difference of similar terms,
    # so an error of ten to twenty roundoffs is what fp16 costs even with no underflow at all.
    # Measured: 7.1e-3 (4-bit) and 2.8e-3 (16-bit) with scaling, 1.3e-2 and 2.4e-2 without.
    assert rel_err(scaled, ref) < 1e-2
    assert rel_err(unscaled, ref) > 1e-2
    # Without scaling, about 30% of the fp16 input gradients of the base layers flush to zero
    # (measured 29% in 4-bit, 33% in 16-bit); with the scale, at most a handful of 200k entries.
    assert underflow_share(unscaled_in, ref_in) > 0.15
    assert underflow_share(scaled_in, ref_in) < 1e-3


# ----------------------------------------------------------------------------------------------
# Overflow: an update with inf / nan gradients is skipped, counted, and the scale drops
# ----------------------------------------------------------------------------------------------
@pytest.fixture()
def fp16_policy():
    cfg = train.parse_config(["--model", "tiny", "--dtype", "fp16", "--steps_per_generation", "1"])
    torch.manual_seed(0)
    model, tok = models.policy_model(cfg)
    optimizer = models.Optimizer(model, cfg)
    params, scaler = optimizer.params, optimizer.scaler
    assert scaler.is_enabled() and scaler.get_scale() == 65536.0
    ro = batch(tok)
    old_logp = bench.old_logprobs(model, ro, cfg)
    adv, zero_std = cegppo.group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0]), 4)
    assert not zero_std.any()                       # both groups carry a signal: update_policy trains on all rows
    return cfg, model, params, optimizer, scaler, ro, old_logp, adv


def update(fp16_policy, state, adv_factor=1.0):
    """train.update_policy on the batch; the updates it skipped are counted in state, as train.train does."""
    cfg, model, params, optimizer, scaler, ro, old_logp, adv = fp16_policy
    groups = train.Groups(ro, [("p", "a")] * 2, torch.zeros(8), adv * adv_factor)
    old = train.OldLogProbs(old_logp, torch.zeros_like(old_logp), torch.ones_like(old_logp), {})
    updates = train.update_policy(logprobs.Scorer(cfg.temperature, cfg.shared_prefix), model, optimizer, groups, old,
                                  train.loss_knobs(cfg, state), cfg, state.step)
    state.skipped_updates += updates.skipped
    return {"loss": updates.loss, "tokens": updates.tokens}


@pytest.mark.parametrize("how", ["inf_in_one_gradient", "huge_loss"])
def test_overflow_is_skipped_counted_and_lowers_the_scale(fp16_policy, how):
    _, model, params, _, scaler, *_ = fp16_policy
    before = [p.detach().clone() for p in params]
    state = train.State(step=1)
    if how == "inf_in_one_gradient":
        hook = params[3].register_hook(lambda g: g.index_fill(0, torch.tensor([0]), float("inf")))
        log = update(fp16_policy, state)
        hook.remove()
    else:   # a finite loss whose scaled gradient exceeds fp16's 65504 inside the 4-bit matmuls' backward
        log = update(fp16_policy, state, adv_factor=1e6)
    assert state.skipped_updates == 1 and log["loss"] == []
    assert scaler.get_scale() == 32768.0                      # GradScaler's backoff factor 0.5
    assert all(torch.equal(a, p) for a, p in zip(before, params))
    assert log["tokens"] == {}                                # tokens.jsonl: nothing of an update not made
    log = update(fp16_policy, state)                          # the next, normal update goes through
    assert state.skipped_updates == 1 and len(log["loss"]) == 1 and scaler.get_scale() == 32768.0
    assert sorted(log["tokens"]) == list(range(8))            # both groups recorded (--token_groups 2)
    assert any(not torch.equal(a, p) for a, p in zip(before, params))


def test_scaled_step_is_the_unscaled_step():
    """models.Optimizer.step unscales before clipping and stepping: the update equals plain fp32 AdamW's."""
    cfg = train.Config(max_grad_norm=1.0, learning_rate=1e-2, weight_decay=0.1)
    grads = [torch.randn(8, 4) * 1e-3, torch.randn(4) * 1e-3]
    results = []
    for enabled in (True, False):
        params = torch.nn.ParameterList([torch.nn.Parameter(torch.ones_like(g)) for g in grads])
        opt = models.Optimizer(params, dataclasses.replace(cfg, dtype="fp16" if enabled else "fp32"))
        assert opt.scaler.is_enabled() == enabled
        for p, g in zip(params, grads):
            p.grad = opt.scaler.scale(g.clone())
        grad_norm = opt.step()
        assert grad_norm is not None
        results.append(([p.detach().clone() for p in params], grad_norm))
    (scaled, norm_s), (plain, norm_p) = results
    assert norm_s == pytest.approx(norm_p, rel=1e-6)
    assert all(torch.allclose(a, b, rtol=0, atol=1e-7) for a, b in zip(scaled, plain))


# ----------------------------------------------------------------------------------------------
# The log-prob pass accumulates in float32 whatever the compute dtype
# ----------------------------------------------------------------------------------------------
def test_token_logprob_accumulates_in_float32_from_fp16():
    torch.manual_seed(0)
    N, d, V = 48, 32, 3000
    hidden = (torch.randn(N, d) * 2).half().requires_grad_(True)
    weight = (torch.randn(V, d) * 0.5).half().requires_grad_(True)
    targets = torch.randint(0, V, (N,))
    logp, ent = logprobs._TokenLogProb.apply(hidden, weight, None, targets, 0.7, logprobs.chunk_size(N), True)
    assert logp.dtype == ent.dtype == torch.float32
    # the reference: the same fp16 inputs, everything after them in float64
    h64, w64 = hidden.detach().double().requires_grad_(True), weight.detach().double().requires_grad_(True)
    ref_logp, ref_ent = cegppo.token_logprobs(h64 @ w64.t(), targets, 0.7)
    # fp16 logits have an absolute error of up to ~|logit| * 2^-11 ~ 0.02 at these magnitudes; float32
    # accumulation keeps the log-normaliser over 3000 terms to ~1e-6, so the gap is the matmul's
    # fp16 output rounding only (F.linear on fp16 returns fp16), not the softmax
    assert torch.allclose(logp.double(), ref_logp, atol=2e-2)
    assert torch.allclose(ent.double(), ref_ent, atol=2e-2)
    g = torch.randn(N)
    (logp * g).sum().backward()
    (ref_logp * g).sum().backward()
    assert hidden.grad.dtype == torch.float16 and weight.grad.dtype == torch.float16
    for got, ref in ((hidden.grad, h64.grad), (weight.grad, w64.grad)):
        assert ((got.double() - ref).norm() / ref.norm()).item() < 1e-2
    # a naive fp16 softmax would lose the tail: the float32 pass gives every token a finite log-prob
    assert torch.isfinite(logp).all()
