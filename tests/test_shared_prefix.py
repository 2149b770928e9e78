"""Each group's prompt once (engine/logprobs.py's packed rows) and the shared prefill (engine/generation.py): each group's prompt once gives the plain layout's numbers.

Tolerances. In float32 the packed rows compute every hidden state from the same tokens, positions and
attended keys as the plain layout, in matrices of other shapes: the same real numbers summed in
another order, a few float32 roundings (1e-7 relative) per layer. Measured on these models: log-probs
and entropies within 2.4e-6, LoRA gradients within 5.4e-7 relative; bounded at 1e-5 and 1e-5 (4 and
18 times the measured; a completion's positions one off moves them by 1.7e-3 and 4.4e-3). Under
bf16 autocast each matmul rounds to bf16 (2^-9 relative) in whichever shape it runs, so the layouts
differ by bf16 rounding, the bound of tests/test_precision.py: 2e-2 on a log-prob, 3e-2 relative on
the gradient (measured 2.2e-3 and 5.5e-3). Those bounds alone would let positions one off through
(3.8e-3 and 8.6e-3), so the bf16 cases also check that the layouts differ on average by far less
than bf16 differs from float32.
"""

import pytest
import torch

import cegppo
from test_sampling import runs_differing_in
from engine import dense_copy, generation, lab, logprobs, models
from engine.generation import Generator


def policy(size, gradient_checkpointing, seed=1):
    model, tok = models.load_model(lab.tiny_model_path(size), four_bit=True, lora_rank=8, trainable=True,
                                    gradient_checkpointing=gradient_checkpointing)
    g = torch.Generator().manual_seed(seed)
    for n, q in model.named_parameters():           # LoRA moved off zero, so that it counts on every path
        if "lora_B" in n:
            q.data = torch.randn(q.shape, generator=g) * 3e-2
    return model, tok


# prompts of different lengths (33, 51 and 24 tokens in the chat template), so that the plain layout
# left-pads two of them and the packed rows differ in length
QUESTIONS = ["What is 6-8?", "What is 12+3 and then times 7, please?", "Hi?"]


def batch(model, tok, G=4):
    torch.manual_seed(0)
    prompts = [cegppo.format_prompt(tok, q) for q in QUESTIONS]
    return cegppo.rollout(model, tok, prompts, G, 16, 1.0, 1.0, Generator(64))


def numbers(fn, model, completion_mask, adv, old_logp):
    """(logp, entropy, loss, LoRA gradients) of one pass through `fn`, CE-GPPO's loss against old_logp."""
    model.zero_grad(set_to_none=True)
    logp, _ = fn(with_entropy=False)
    with torch.no_grad():
        _, entropy = fn(with_entropy=True)
    loss, _ = cegppo.cegppo_loss(logp, old_logp, adv, completion_mask, **cegppo.ALGOS["cegppo"])
    loss.backward()
    return logp.detach(), entropy, loss.item(), {n: q.grad.clone() for n, q in model.named_parameters()
                                                 if q.requires_grad}


def relative(a, b):
    return (sum(((a[k] - b[k]) ** 2).sum() for k in a) / sum((b[k] ** 2).sum() for k in a)).sqrt().item()


@pytest.mark.parametrize("size,checkpointing,autocast", [("tiny", False, False), ("tiny", True, False),
                                                        ("lab", True, False), ("lab", False, True),
                                                        ("lab", True, True)])
def test_packed_rows_give_the_plain_numbers(size, checkpointing, autocast):
    model, tok = policy(size, checkpointing)
    ro = batch(model, tok)
    idx = torch.arange(2, 11)                          # a group cut at both ends of the micro-batch
    ids, amask, cmask, L = logprobs.micro_batch(ro, idx)
    assert len(logprobs.segments(ids, amask, L)) == 3 and amask[:, 0].sum() < len(idx)   # left padding
    adv = torch.linspace(-1.5, 1.5, len(idx))
    packed = logprobs.pack(ids, amask, cmask, L)
    assert logprobs.worth_it(packed, ids, model.config)              # what train.py would take
    plain = lambda **k: logprobs.chunked_logprobs(model, ids, amask, L, **k)    # noqa: E731
    # old log-probs: the plain float32 pass's, 0.3 off either way (so that both clip regions are used)
    with torch.no_grad():
        reference, _ = plain(with_entropy=False)
    shift = 0.3 * (torch.arange(reference.numel()).view_as(reference) % 3 - 1)     # ratios e^-0.3, 1, e^0.3
    old = reference + shift
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    results = {}
    for name, fn in (("plain", plain),
                     ("packed", lambda **k: logprobs.packed_logprobs(model, packed, cmask, **k))):
        with ctx:
            results[name] = numbers(fn, model, cmask, adv, old)
    (lp, ent, loss, grads), (lp2, ent2, loss2, grads2) = results["plain"], results["packed"]
    m = cmask.bool()
    tol = (2e-2, 3e-2) if autocast else (1e-5, 1e-5)
    assert (lp - lp2)[m].abs().max() < tol[0] and (ent - ent2)[m].abs().max() < tol[0]
    assert loss == pytest.approx(loss2, abs=tol[0])
    assert relative(grads2, grads) < tol[1]
    assert (lp2[~m] == 0).all()                        # after each EOS: nothing computed, zero
    if autocast:
        # the two layouts round the same numbers to bf16: on average they differ by far less than either
        # differs from float32 (measured 0.16-0.18 of it; completion positions one off: 0.8-0.9 of it)
        assert (lp - lp2)[m].abs().mean() < 0.4 * (lp - reference)[m].abs().mean()


def test_packing_layout():
    # two rows of one prompt [5, 6] and one of [7]; completions of 2, 1 and 3 tokens (EOS included)
    ids = torch.tensor([[0, 5, 6, 10, 11, 0], [0, 5, 6, 12, 0, 0], [0, 0, 7, 13, 14, 15]])
    amask = torch.tensor([[0, 1, 1, 1, 1, 0], [0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]])
    cmask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1]])
    p = logprobs.pack(ids, amask, cmask, prompt_len=3)
    assert p["input_ids"].tolist() == [[5, 6, 10, 11, 12], [7, 13, 14, 15, 0]]
    assert p["position_ids"].tolist() == [[0, 1, 2, 3, 2], [0, 1, 2, 3, 0]]   # each completion after its prompt
    mask = p["mask"][:, 0].int().tolist()
    # row 0: prompt causal; completion 1 (positions 2, 3) sees the prompt and itself; completion 2
    # (position 4) sees the prompt only, not completion 1
    assert mask[0] == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 0, 0, 1]]
    assert mask[1][4] == [0, 0, 0, 0, 1]                                     # padding: itself only
    # the state before each kept token (the prompt's last for the first), its target, its plain place
    assert p["states"].tolist() == [1, 2, 1, 5, 6, 7] and p["targets"].tolist() == [10, 11, 12, 13, 14, 15]
    assert p["rows"].tolist() == [0, 0, 1, 2, 2, 2] and p["cols"].tolist() == [0, 1, 0, 0, 1, 2]
    # what it costs (logprobs.cost): per layer, h (2h + 2kv) + 3 h I multiply-adds per position
    # and 2h per pair of positions; with h 4, I 8, kv 2 (48 + 96 = 144 and 8): the packed block, 2 rows
    # of 5, 2 * 5 * 144 + 2 * 25 * 8 = 1840, against the plain 3 x 6: 3 * 6 * 144 + 3 * 36 * 8 = 3456
    config = type("Config", (), dict(hidden_size=4, intermediate_size=8, num_key_value_heads=1, head_dim=2,
                                     num_attention_heads=2, _attn_implementation="sdpa"))
    assert logprobs.cost(2, 5, *logprobs.dims(config)) == 1840
    assert logprobs.cost(3, 6, *logprobs.dims(config)) == 3456
    assert logprobs.worth_it(p, ids, config)                           # 1840 <= 0.9 x 3456
    one = torch.tensor([[5, 6, 10, 11]])                                     # a group of one, no padding:
    alone = logprobs.pack(one, torch.ones_like(one), torch.tensor([[1, 1]]), 2)
    assert not logprobs.worth_it(alone, one, config)                    # the same block: nothing saved
    config._attn_implementation = "eager"                                    # adds its mask: never packed
    assert not logprobs.worth_it(p, ids, config)


@pytest.mark.parametrize("sampler", ["policy", "dense"])
def test_a_shared_prefill_samples_the_same_completions(sampler):
    model, tok = policy("tiny", True)
    gen = dense_copy.dense_copy(model) if sampler == "dense" else model
    prompts = [cegppo.format_prompt(tok, q) for q in QUESTIONS]
    out = {}
    for share in (True, False):
        torch.manual_seed(0)                           # generation batch 5: sub-batches cut the groups
        out[share] = cegppo.rollout(gen, tok, prompts, 4, 16, 1.0, 1.0, Generator(5, share_prompts=share))
    assert out[True].texts == out[False].texts
    for k in ("sample_logp", "sample_entropy"):
        assert (getattr(out[True], k) - getattr(out[False], k)).abs().max() < 1e-5
    assert torch.equal(out[True].input_ids, out[False].input_ids)
    # each generate() sub-batch encodes its own prompts once: rows 0-4, 5-9, 10-11 of 3 prompts x 4
    encoded, real, fail = [], generation.prompt_cache, []

    def spying(model, ids, mask):
        encoded.append(ids.shape[0])
        if fail and ids.shape[0] > 1:                  # a prefill of 2 prompts does not fit: halving covers it
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(model, ids, mask)
    torch.manual_seed(0)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(generation, "prompt_cache", spying)
        cegppo.rollout(gen, tok, prompts, 4, 16, 1.0, 1.0, Generator(5))
        assert encoded == [2, 2, 1]
        encoded.clear()
        fail.append(True)
        with pytest.warns(UserWarning, match="retrying with generation batch 4"):
            halved = cegppo.rollout(gen, tok, prompts, 4, 16, 1.0, 1.0, generate := Generator(8))
    assert encoded == [2, 1, 1, 1] and generate.batch_size == 4 and len(halved.texts) == 12          # rows 0-7 fail; then 3 x 4 rows
    # the prompts' cache has one row per prompt, not per completion
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left")
    gen.eval()                                         # as rollout() runs it (no checkpointing: a cache)
    with torch.no_grad():
        kv = generation.prompt_cache(gen, enc["input_ids"], enc["attention_mask"])
    assert len(kv) == 2 and kv[0][0].shape[0] == 3 and kv[0][0].shape[2] == enc["input_ids"].shape[1] - 1


def test_a_run_gives_the_same_metrics_either_way(tmp_path):
    rows = runs_differing_in(tmp_path, "--shared_prefix", ("true", "false"), "--model", "tiny")
    assert all(r["shared_prefix/packed_share"] == 1.0 for r in rows["true"])        # packed, every micro-batch
    assert all(r["shared_prefix/packed_share"] == 0.0 for r in rows["false"])
    for a, b in zip(rows["true"], rows["false"]):
        assert a["reward"] == b["reward"] and a["num_tokens"] == b["num_tokens"]       # the same samples
        for k in ("loss", "entropy", "approx_kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "grad_norm"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), k


def test_where_packing_does_not_pay_the_plain_layout_is_used_and_said_once(capsys, monkeypatch):
    model, tok = policy("tiny", False)
    ro = batch(model, tok, G=2)
    scorer = logprobs.Scorer(temperature=1.0, shared_prefix=True)          # one run's: says each reason once
    plain = logprobs.micro_batch(ro, torch.tensor([1, 2]))       # one completion of each of 2 groups: nothing shared
    packs = logprobs.micro_batch(ro, torch.arange(4))            # 2 whole groups: packed
    for _ in range(2):
        for b, expected in ((plain, False), (packs, True)):
            logp, _, packed = scorer.micro_batch_logprobs(model, b, False)
            assert logp.shape == b[2].shape and packed == expected
    said = capsys.readouterr()
    assert (said.out + said.err).count("shared prefix: packing does not pay for some micro-batches") == 1
    # an attention that cannot take the packed mask: never packed, and the reason said (once)
    monkeypatch.setattr(model.config, "_attn_implementation", "eager")
    for _ in range(2):
        assert not scorer.micro_batch_logprobs(model, packs, False)[2]
    said = capsys.readouterr()
    assert (said.out + said.err).count("shared prefix: attention is 'eager', and the packed mask needs 'sdpa'") == 1
