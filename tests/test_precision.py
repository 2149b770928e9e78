"""One precision rule (models.compute_dtype) and half precision through autocast, tested on a CPU.

The GPU's compute capability is simulated (monkeypatch) for the rule; the autocast path runs on
the CPU under torch.autocast("cpu", bfloat16), which exercises the same code (models.autocast's
callers, logprobs._TokenLogProb's backward) that CUDA's autocast does on a GPU.
"""
import warnings

import pytest
import torch

import cegppo
import train
from engine.errors import UserError
from engine import bench, lab, logprobs, models

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
    assert models.compute_dtype() == models.compute_dtype("auto") == want
    assert models.native_bf16() == (want == torch.bfloat16)
    for choice, dtype in models.DTYPES.items():            # an explicit --dtype is taken as given
        assert models.compute_dtype(choice) == dtype
    # train.py: --dtype bf16 is refused by the same rule; auto gives fp16 + loss scaling below 8.0
    if want == torch.bfloat16:
        assert train.parse_config(["--dtype", "bf16"]).dtype == "bf16"
    else:
        with pytest.raises(UserError, match=r"--dtype bf16: this GPU has no native bf16"):
            train.parse_config(["--dtype", "bf16"])
    assert train.parse_config(["--dtype", "fp16"]).dtype == "fp16"


def test_compute_dtype_on_a_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert models.compute_dtype() == torch.float32 and not models.native_bf16()
    assert train.parse_config(["--dtype", "bf16"]).dtype == "bf16"       # on a CPU bf16 is the user's call


@pytest.mark.parametrize("capability,want", CAPABILITIES, ids=lambda c: str(c))
def test_trl_example_follows_the_same_rule(monkeypatch, capability, want):
    pytest.importorskip("trl")
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(models.__file__)), "examples"))
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
        models.enable_tf32()
        on = capability[0] >= 8
        assert torch.backends.cuda.matmul.allow_tf32 is on and torch.backends.cudnn.allow_tf32 is on
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_autocast_helper():
    import contextlib
    for device, dtype in (("cpu", torch.bfloat16), ("cpu", torch.float16), ("cpu", torch.float32),
                          ("cuda", torch.float32)):
        assert isinstance(models.autocast(device, dtype), contextlib.nullcontext), (device, dtype)
    with warnings.catch_warnings():          # without CUDA torch.autocast("cuda") warns and disables itself
        warnings.simplefilter("ignore")
        for dtype in (torch.bfloat16, torch.float16):
            ctx = models.autocast("cuda", dtype)
            assert isinstance(ctx, torch.autocast) and ctx.device == "cuda" and ctx.fast_dtype == dtype
    with torch.autocast("cpu", dtype=torch.bfloat16):          # a caller's autocast stays in force
        with models.autocast("cpu", torch.float32):
            assert torch.is_autocast_enabled("cpu")


def spy_on_linear(monkeypatch):
    """Every F.linear engine/logprobs.py makes: (autocast on, its output dtype)."""
    seen, real = [], torch.nn.functional.linear

    def spy(x, w, b=None):
        out = real(x, w, b)
        seen.append((torch.is_autocast_enabled("cpu"), out.dtype))
        return out
    monkeypatch.setattr(logprobs.F, "linear", spy)
    return seen


def head(V=50, d=16, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    lm = torch.nn.Linear(d, V, bias=False)
    lm.weight.data = torch.randn(V, d, generator=g) * scale
    return lm


def test_the_head_runs_in_float32_under_bf16_autocast(monkeypatch):
    """The log-prob chunks multiply by the LM head in float32 under bf16 autocast, forward and
    backward: the logits, log-probs and gradient are bit for bit those without autocast."""
    seen = spy_on_linear(monkeypatch)
    torch.manual_seed(0)
    lm, targets = head(), torch.randint(0, 50, (40,))
    h = torch.randn(40, 16, requires_grad=True)
    results = {}
    for autocast in (False, True):
        seen.clear()
        h.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            w, b = logprobs.head_operands(lm, "cpu")
            lp, ent = logprobs._TokenLogProb.apply(h, w, b, targets, 1.0, 8, True)
        lp.sum().backward()                                       # outside autocast, as in train.py
        assert len(seen) == 10 and all(not a and d == torch.float32 for a, d in seen), seen   # 5 chunks x 2
        assert w is lm.weight                                     # float32 already: no cast at all
        results[autocast] = (lp.detach(), ent, h.grad.clone())
    for a, b in zip(results[False], results[True]):
        assert torch.equal(a, b)


def test_a_bf16_rounding_step_cannot_move_a_ratio():
    # large logits (bf16's steps are 0.125 at 16-32, 0.5 at 64-128) and targets that compete with the
    # top token: a tiny update of the hidden state (of the policy) moves a bf16 logit by a whole step
    # or not at all, so pi / pi_old jumps; through the float32 head it moves as little as the update
    torch.manual_seed(1)
    lm = head(V=200, d=64, scale=3.0)
    h = torch.randn(64, 64)
    logits = h @ lm.weight.T
    targets = logits.argsort(-1)[:, -2]                          # the runner-up: log-probs far from 0
    dh = torch.randn(64, 64) * 1e-4
    with torch.autocast("cpu", dtype=torch.bfloat16):
        before, _ = logprobs._TokenLogProb.apply(h, *logprobs.head_operands(lm, "cpu"), targets, 1.0, 16, False)
        after, _ = logprobs._TokenLogProb.apply(h + dh, *logprobs.head_operands(lm, "cpu"), targets, 1.0, 16, False)
        bf16_before, _ = cegppo.token_logprobs(torch.nn.functional.linear(h, lm.weight), targets)
        bf16_after, _ = cegppo.token_logprobs(torch.nn.functional.linear(h + dh, lm.weight), targets)
    ref, _ = cegppo.token_logprobs(logits, targets)
    true_change = cegppo.token_logprobs((h + dh) @ lm.weight.T, targets)[0] - ref
    assert logits.abs().max() > 32 and true_change.abs().max() < 0.01   # log r of at most 0.01
    assert ((after - before) - true_change).abs().max() < 1e-4            # the float32 head: the true change
    assert ((bf16_after - bf16_before) - true_change).abs().max() > 0.1   # bf16 logits: a ratio off by e^0.1+


def test_the_head_is_cast_once_per_pass_under_fp16_autocast(monkeypatch):
    """fp16 autocast (a T4): the chunks multiply in fp16, and the [V, d] head is cast to it once per
    pass, not once per chunk (counted with torch's profiler: aten::_to_copy on the head's shape)."""
    lm, targets = head(V=300, d=32), torch.randint(0, 300, (64,))
    lm.weight.requires_grad_(False)                               # frozen, as the policy's head
    h = torch.randn(64, 32, requires_grad=True)
    seen = spy_on_linear(monkeypatch)
    with torch.profiler.profile(record_shapes=True) as prof:
        with torch.autocast("cpu", dtype=torch.float16):
            w, b = logprobs.head_operands(lm, "cpu")
            lp, _ = logprobs._TokenLogProb.apply(h, w, b, targets, 1.0, 8, False)    # 8 chunks
        lp.sum().backward()
    casts = [e for e in prof.events() if e.name == "aten::_to_copy" and e.input_shapes and
             list(e.input_shapes[0]) == [300, 32]]
    assert len(casts) == 1
    assert len(seen) == 16 and all(not a and d == torch.float16 for a, d in seen)
    assert lp.dtype == torch.float32 and torch.isfinite(h.grad).all()


@pytest.mark.parametrize("layout", ["plain", "packed"])
def test_a_real_log_prob_pass_casts_the_head_once(tiny_policy, layout):
    """The same count on the passes train.py takes, through the 4-bit + LoRA policy under fp16 autocast:
    the [V, d] head is cast once per pass, forward and backward together, in the plain layout
    (logprobs.chunked_logprobs) and packed by prompt (logprobs.packed_logprobs)."""
    model, tok = tiny_policy
    ro = rollout_batch(tok)
    ids, amask, cmask, L = logprobs.micro_batch(ro, torch.arange(8))
    V, d = model.get_output_embeddings().weight.shape
    with torch.profiler.profile(record_shapes=True) as prof:
        with torch.autocast("cpu", dtype=torch.float16):
            if layout == "plain":
                lp, _ = logprobs.chunked_logprobs(model, ids, amask, L, with_entropy=False)
            else:
                lp, _ = logprobs.packed_logprobs(model, logprobs.pack(ids, amask, cmask, L), cmask, with_entropy=False)
        (lp * cmask).sum().backward()
    casts = [e for e in prof.events() if e.name == "aten::_to_copy" and e.input_shapes and
             list(e.input_shapes[0]) == [V, d]]
    assert logprobs.chunk_size(int(cmask.numel())) < cmask.numel()          # several chunks: one cast for all
    assert len(casts) == 1 and torch.isfinite(lp).all()


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
    return cegppo.Rollout(input_ids=ids, attention_mask=amask, completion_mask=cmask, truncated=torch.zeros(n, dtype=bool),
                          prompt_len=P, texts=[""] * n)


def first_update(model, ro, cfg, adv):
    """train.py's precision path: old log-probs (through the policy, no grad: engine.bench.old_logprobs, as
    train.old_logprobs takes them on a GPU), then the update's forward under models.autocast and its backward
    outside it. Returns (stats, loss, LoRA grads)."""
    old_logp = bench.old_logprobs(model, ro, cfg)
    model.zero_grad(set_to_none=True)
    ids, amask, c, p = logprobs.micro_batch(ro, torch.arange(len(adv)))
    with models.autocast(ids.device.type, models.compute_dtype(cfg.dtype)):
        lp, _ = logprobs.chunked_logprobs(model, ids, amask, p, cfg.temperature, with_entropy=False)
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
    # half precision as on a GPU: models.autocast is what train.py's forwards enter; here it enters
    # the CPU's bf16 autocast, so old log-probs and the update's forward both run in it
    monkeypatch.setattr(models, "autocast", lambda device_type, dtype: torch.autocast("cpu", dtype=torch.bfloat16))
    st16, lp16, old16, loss16, grads16 = first_update(model, ro, cfg, adv)
    for st, lp, old in ((st32, lp32, old32), (st16, lp16, old16)):
        assert torch.equal(lp, old)                          # bit for bit: the same precision path
        assert st["ratio/mean"] == 1.0 and st["ratio/max"] == 1.0
        assert st["clip_ratio/low_mean"] == st["clip_ratio/high_mean"] == 0.0
    mask = ro.completion_mask[:, :lp32.shape[1]].bool()
    assert not torch.equal(lp16, lp32)                       # bf16 really ran
    # Tolerances. bf16 keeps 8 significant bits (unit roundoff 2^-9 ~ 2e-3). A log-prob passes through
    # two layers of bf16 matmuls (the LM head runs in float32: head_operands), whose rounding moves a logit by ~|logit| x 2^-9;
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
    """Every forward pass of the loop (old log-probs, updates) and of evaluation enters models''
    autocast helper; with the helper made a CPU bf16 autocast, a tiny run still trains."""
    import json
    import os
    import signal
    import eval as eval_script
    seen = {"grad": [], "no_grad": [], "rollout": []}
    real_lp, real_rollout = logprobs.Scorer.micro_batch_logprobs, cegppo.rollout

    def spy_lp(*a, **k):     # every log-prob pass of the loop, packed (shared prefix) or plain
        seen["grad" if torch.is_grad_enabled() else "no_grad"].append(torch.is_autocast_enabled("cpu"))
        return real_lp(*a, **k)

    def spy_rollout(*a, **k):
        seen["rollout"].append(torch.is_autocast_enabled("cpu"))
        return real_rollout(*a, **k)
    monkeypatch.setattr(logprobs.Scorer, "micro_batch_logprobs", spy_lp)
    monkeypatch.setattr(models, "autocast", lambda device_type, dtype: torch.autocast("cpu", dtype=torch.bfloat16))
    handler = signal.getsignal(signal.SIGINT)
    try:
        out = str(tmp_path / "run")
        assert train.main(["--model", "tiny", "--max_steps", "1", "--eval_limit", "0", "--output_dir", out]) == 0
    finally:
        signal.signal(signal.SIGINT, handler)
    row = json.loads(open(os.path.join(out, "metrics.jsonl")).readline())
    assert row["updates"] >= 1 and seen["grad"] and all(seen["grad"] + seen["no_grad"]), seen
    # evaluation: the rollout inside models.model_autocast
    monkeypatch.setattr(cegppo, "rollout", spy_rollout)
    model, tok = models.load_model(lab.warm_start_path("tiny"), four_bit=True)
    res = eval_script.evaluate(model, tok, lab.toy_rows("test", tiny=True)[:2], max_new_tokens=8)
    assert res["n_questions"] == 2 and seen["rollout"] == [True]


def test_first_ratio_is_one_for_the_lab_presets_batch_shapes_under_bf16(monkeypatch):
    """The lab preset scores micro-batches of 32 rows, but its updates take mini-batches of one group
    (8 rows): the old log-probs are scored in the updates' own micro-batches (logprobs.update_partition),
    so under bf16 autocast too every first-update log-prob equals its old one bit for bit. (The lab's
    shapes on its random-init model: the warm start's training is not needed for the shapes.)"""
    cfg = train.parse_config(["--preset", "lab"])
    assert (cfg.micro_batch_size, cfg.num_generations, cfg.steps_per_generation) == (32, 8, 8)
    model, tok = models.load_model(lab.tiny_model_path("lab"), four_bit=True, lora_rank=cfg.lora_r,
                                    lora_alpha=cfg.lora_alpha, trainable=True, gradient_checkpointing=False)
    g = torch.Generator().manual_seed(2)
    for n, q in model.named_parameters():
        if "lora_B" in n:
            q.data = torch.randn(q.shape, generator=g) * 1e-3
    prompts = [cegppo.format_prompt(tok, q) for q, _ in lab.toy_rows("train")[:cfg.prompts_per_step]]
    torch.manual_seed(0)
    ro = cegppo.rollout(model, tok, prompts, cfg.num_generations, cfg.max_completion_length)
    fp32 = bench.old_logprobs(model, ro, cfg)
    monkeypatch.setattr(models, "autocast", lambda device_type, dtype: torch.autocast("cpu", dtype=torch.bfloat16))
    old = bench.old_logprobs(model, ro, cfg)
    assert not torch.equal(old, fp32)                                     # bf16 really ran
    partition = logprobs.update_partition(ro, cfg)
    scorer = logprobs.Scorer(cfg.temperature, cfg.shared_prefix)
    assert [len(idx) for mb in partition for idx in mb] == [8] * 8
    for mini_batch in partition:
        for idx in mini_batch:
            batch = logprobs.micro_batch(ro, idx)
            c = batch[2]
            with models.model_autocast(model):     # the updates' own pass (packed or plain, as they take it)
                lp, _, _ = scorer.micro_batch_logprobs(model, batch, with_entropy=False)
            assert torch.equal(lp.detach() * c, old[idx, :c.shape[1]] * c)     # ratio 1, bit for bit
