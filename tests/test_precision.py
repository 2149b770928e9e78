"""One precision rule (loading.compute_dtype) and half precision through autocast, tested on a CPU.

The GPU's compute capability is simulated (monkeypatch) for the rule; the autocast path runs on
the CPU under torch.autocast("cpu", bfloat16), which exercises the same code (loading.autocast's
callers, cegppo._TokenLogProb's backward) that CUDA's autocast does on a GPU.
"""
import warnings

import pytest
import torch

import cegppo
import lab
import loading
import train
from loading import UserError

CAPABILITIES = [((7, 0), torch.float16), ((7, 5), torch.float16), ((8, 0), torch.bfloat16),
                ((8, 6), torch.bfloat16), ((9, 0), torch.bfloat16)]


def simulate_gpu(monkeypatch, capability):
    """A CUDA GPU of this compute capability, as far as the precision rule can tell. is_bf16_supported
    says yes everywhere, as torch does on 7.x cards (emulation): the rule must not ask it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)


@pytest.mark.parametrize("capability,want", CAPABILITIES, ids=lambda c: str(c))
def test_compute_dtype_follows_the_capability(monkeypatch, capability, want):
    simulate_gpu(monkeypatch, capability)
    assert loading.compute_dtype() == loading.compute_dtype("auto") == want
    assert loading.native_bf16() == (want == torch.bfloat16)
    for choice, dtype in loading.DTYPES.items():            # an explicit --dtype is taken as given
        assert loading.compute_dtype(choice) == dtype
    # train.py: --dtype bf16 is refused by the same rule; auto gives fp16 + loss scaling below 8.0
    if want == torch.bfloat16:
        assert train.parse_config(["--dtype", "bf16"]).dtype == "bf16"
    else:
        with pytest.raises(UserError, match=r"--dtype bf16: this GPU has no native bf16"):
            train.parse_config(["--dtype", "bf16"])
    assert train.parse_config(["--dtype", "fp16"]).dtype == "fp16"


def test_compute_dtype_on_a_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert loading.compute_dtype() == torch.float32 and not loading.native_bf16()
    assert train.parse_config(["--dtype", "bf16"]).dtype == "bf16"       # on a CPU bf16 is the user's call


@pytest.mark.parametrize("capability,want", CAPABILITIES, ids=lambda c: str(c))
def test_trl_example_follows_the_same_rule(monkeypatch, capability, want):
    pytest.importorskip("trl")
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(loading.__file__), "examples"))
    import trl_gsm8k
    simulate_gpu(monkeypatch, capability)
    d = trl_gsm8k._defaults()
    assert (d["bf16"], d["fp16"]) == (want == torch.bfloat16, want == torch.float16)
    cfg = type("Args", (), {"bf16": d["bf16"], "fp16": d["fp16"]})
    assert trl_gsm8k.model_dtype(cfg, 16) == str(want).split(".")[1]
    assert trl_gsm8k.model_dtype(cfg, 0) == ("bfloat16" if want == torch.bfloat16 else "float32")   # full fp16 FT


@pytest.mark.parametrize("capability", [c for c, _ in CAPABILITIES], ids=str)
def test_tf32_on_capability_8_and_newer(monkeypatch, capability):
    simulate_gpu(monkeypatch, capability)
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        loading.enable_tf32()
        on = capability[0] >= 8
        assert torch.backends.cuda.matmul.allow_tf32 is on and torch.backends.cudnn.allow_tf32 is on
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_autocast_helper():
    import contextlib
    for device, dtype in (("cpu", torch.bfloat16), ("cpu", torch.float16), ("cpu", torch.float32),
                          ("cuda", torch.float32)):
        assert isinstance(loading.autocast(device, dtype), contextlib.nullcontext), (device, dtype)
    with warnings.catch_warnings():          # without CUDA torch.autocast("cuda") warns and disables itself
        warnings.simplefilter("ignore")
        for dtype in (torch.bfloat16, torch.float16):
            ctx = loading.autocast("cuda", dtype)
            assert isinstance(ctx, torch.autocast) and ctx.device == "cuda" and ctx.fast_dtype == dtype
    with torch.autocast("cpu", dtype=torch.bfloat16):          # a caller's autocast stays in force
        with loading.autocast("cpu", torch.float32):
            assert torch.is_autocast_enabled("cpu")


def test_token_logprob_backward_runs_in_the_forwards_precision(monkeypatch):
    """The backward recomputes each chunk's logits: under the forward's autocast state (custom_fwd /
    custom_bwd), not under the caller's of backward(), which train.py keeps outside autocast."""
    seen = []
    real = torch.nn.functional.linear

    def spy(x, w, b=None):
        out = real(x, w, b)
        seen.append((torch.is_grad_enabled(), torch.is_autocast_enabled("cpu"), out.dtype))
        return out
    monkeypatch.setattr(cegppo.F, "linear", spy)
    torch.manual_seed(0)
    h = torch.randn(40, 16, requires_grad=True)
    w, targets = torch.randn(50, 16), torch.randint(0, 50, (40,))
    for autocast in (True, False):
        seen.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            lp, _ = cegppo._TokenLogProb.apply(h, w, None, targets, 1.0, 8, False)
        assert lp.dtype == torch.float32                          # the log-probs are float32 either way
        lp.sum().backward()                                       # outside autocast, as in train.py
        forward, backward = seen[:5], seen[5:]
        assert len(forward) == len(backward) == 5
        want = torch.bfloat16 if autocast else torch.float32
        assert all(a == autocast and d == want for _, a, d in forward + backward), seen
    # and the gradient is the definition's under the same autocast: the recomputed softmax is the
    # forward's (before the fix, the backward's float32 logits did not match the bf16 forward's lse)
    h.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp, _ = cegppo._TokenLogProb.apply(h, w, None, targets, 1.0, 8, False)
    lp.sum().backward()
    ours = h.grad.clone()
    h.grad = None
    monkeypatch.setattr(cegppo.F, "linear", real)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = real(h, w)                                       # bf16, as the chunks'
    ref, _ = cegppo.token_logprobs(logits, targets)
    ref.sum().backward()
    assert torch.allclose(lp, ref, atol=1e-6)
    # both backward matmuls run in bf16 (unit roundoff 2^-9 = 2e-3) on the same softmax: a few roundoffs
    assert ((ours - h.grad).norm() / h.grad.norm()).item() < 1e-2


def rollout_batch(tok, n=8):
    """n responses to n/4 prompts in groups of 4, left-padded as cegppo.rollout returns them."""
    rows = lab.toy_rows("train", tiny=True)[:n]
    prompts = [tok(cegppo.format_prompt(tok, q))["input_ids"] for q, _ in rows]
    comps = [tok(f"{q[8:-1]}=\\boxed{{{a}}}" + tok.eos_token)["input_ids"] for q, a in rows]
    P, T = max(map(len, prompts)), max(map(len, comps))
    ids = torch.full((n, P + T), tok.pad_token_id)
    amask, cmask = torch.zeros(n, P + T, dtype=torch.long), torch.zeros(n, T, dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, comps)):
        ids[i, P - len(p):P], amask[i, P - len(p):P] = torch.tensor(p), 1
        ids[i, P:P + len(c)], amask[i, P:P + len(c)], cmask[i, :len(c)] = torch.tensor(c), 1, 1
    return {"input_ids": ids, "attention_mask": amask, "completion_mask": cmask, "prompt_len": P}


def first_update(model, ro, cfg, adv):
    """train.py's precision path: old log-probs (train.old_logprobs, no grad), then the update's
    forward under loading.autocast and its backward outside it. Returns (stats, loss, LoRA grads)."""
    old_logp, _ = train.old_logprobs(model, ro, cfg)
    model.zero_grad(set_to_none=True)
    ids, amask, c, p = train.micro_batch(ro, torch.arange(len(adv)))
    with loading.autocast(ids.device.type, loading.compute_dtype(cfg.dtype)):
        lp, _ = cegppo.completion_logprobs(model, ids, amask, p, cfg.temperature, with_entropy=False)
    loss, st = cegppo.cegppo_loss(lp, old_logp[:, :c.shape[1]], adv, c, num_tokens=int(c.sum()),
                                  **cegppo.ALGOS["cegppo"])
    loss.backward()
    grads = {n: q.grad.clone() for n, q in model.named_parameters() if q.requires_grad}
    return st, lp.detach(), old_logp[:, :c.shape[1]], loss.item(), grads


def test_autocast_first_update_ratio_is_one_and_matches_fp32(tiny_policy, monkeypatch):
    model, tok = tiny_policy
    g = torch.Generator().manual_seed(1)
    for n, q in model.named_parameters():               # LoRA B small and random, as after some updates
        if "lora_B" in n:
            q.data = torch.randn(q.shape, generator=g) * 1e-2
    cfg = train.parse_config(["--model", "tiny", "--micro_batch_size", "4"])
    ro, adv = rollout_batch(tok), torch.tensor([1.0, -1.0, 0.5, -0.5] * 2)
    st32, lp32, old32, loss32, grads32 = first_update(model, ro, cfg, adv)
    # half precision as on a GPU: loading.autocast is what train.py's forwards enter; here it enters
    # the CPU's bf16 autocast, so old log-probs and the update's forward both run in it
    monkeypatch.setattr(loading, "autocast", lambda device_type, dtype: torch.autocast("cpu", dtype=torch.bfloat16))
    st16, lp16, old16, loss16, grads16 = first_update(model, ro, cfg, adv)
    for st, lp, old in ((st32, lp32, old32), (st16, lp16, old16)):
        assert torch.equal(lp, old)                          # bit for bit: the same precision path
        assert st["ratio/mean"] == 1.0 and st["ratio/max"] == 1.0
        assert st["clip_ratio/low_mean"] == st["clip_ratio/high_mean"] == 0.0
    mask = ro["completion_mask"][:, :lp32.shape[1]].bool()
    assert not torch.equal(lp16, lp32)                       # bf16 really ran
    # Tolerances. bf16 keeps 8 significant bits (unit roundoff 2^-9 ~ 2e-3). A log-prob passes through
    # two layers of bf16 matmuls and a bf16 LM head, whose rounding moves a logit by ~|logit| x 2^-9;
    # with this model's logits of a few units that is ~1e-2 at most (measured: max 2.2e-3, mean
    # 5.6e-4), so 2e-2. The loss is a token mean of ratio x advantage with the ratio exactly 1 in
    # both runs: the same number. The LoRA gradient is a difference of similar terms (advantages of
    # both signs) through bf16 backward matmuls, so a few roundoffs relative: measured 8.7e-3
    # (relative L2 over all LoRA tensors), bounded at 3e-2; a wrong precision path (e.g. old
    # log-probs in fp32, the update in bf16) shows as a ratio away from 1 above, not here.
    assert (lp16 - lp32).abs()[mask].max() < 2e-2
    assert loss16 == pytest.approx(loss32, rel=1e-6)
    num = sum(((grads16[n] - grads32[n]) ** 2).sum() for n in grads32)
    den = sum((grads32[n] ** 2).sum() for n in grads32)
    assert den > 0 and (num / den).sqrt().item() < 3e-2


def test_train_and_eval_forwards_run_under_autocast(tmp_path, monkeypatch):
    """Every forward pass of the loop (old log-probs, updates) and of evaluation enters loading's
    autocast helper; with the helper made a CPU bf16 autocast, a tiny run still trains."""
    import json
    import os
    import signal
    import eval as eval_script
    seen = {"grad": [], "no_grad": [], "rollout": []}
    real_lp, real_rollout = cegppo.completion_logprobs, cegppo.rollout

    def spy_lp(*a, **k):
        seen["grad" if torch.is_grad_enabled() else "no_grad"].append(torch.is_autocast_enabled("cpu"))
        return real_lp(*a, **k)

    def spy_rollout(*a, **k):
        seen["rollout"].append(torch.is_autocast_enabled("cpu"))
        return real_rollout(*a, **k)
    monkeypatch.setattr(cegppo, "completion_logprobs", spy_lp)
    monkeypatch.setattr(loading, "autocast", lambda device_type, dtype: torch.autocast("cpu", dtype=torch.bfloat16))
    handler = signal.getsignal(signal.SIGINT)
    try:
        out = str(tmp_path / "run")
        assert train.main(["--model", "tiny", "--max_steps", "1", "--eval_limit", "0", "--output_dir", out]) == 0
    finally:
        signal.signal(signal.SIGINT, handler)
    row = json.loads(open(os.path.join(out, "metrics.jsonl")).readline())
    assert row["updates"] >= 1 and seen["grad"] and all(seen["grad"] + seen["no_grad"]), seen
    # evaluation: the rollout inside loading.model_autocast
    monkeypatch.setattr(cegppo, "rollout", spy_rollout)
    model, tok = loading.load_model(lab.warm_start_path("tiny"), four_bit=True)
    res = eval_script.evaluate(model, tok, lab.toy_rows("test", tiny=True)[:2], max_new_tokens=8)
    assert res["n_questions"] == 2 and seen["rollout"] == [True]
