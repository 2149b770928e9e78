"""Masks, chunked log-probs and entropy, and rollout on the real 4-bit + LoRA path of a tiny Qwen2."""
import pytest
import torch

import cegppo
from cegppo import completion_mask, format_prompt, rollout, token_logprobs
from engine import data, lab, logprobs, models
from engine.generation import Generator
from engine.logprobs import chunked_logprobs as completion_logprobs


def test_completion_mask_keeps_first_eos_and_flags_truncation():
    eos = pad = 2                                     # pad == eos, the classic trap
    ids = torch.tensor([[5, 6, 2, 2, 2],              # EOS at 2 kept, later pads masked
                        [2, 7, 2, 2, 2],              # EOS as the very first token
                        [5, 6, 7, 8, 9]])             # never stopped: truncated
    mask, trunc = completion_mask(ids, [eos, pad])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert trunc.tolist() == [False, False, True]
    # two EOS ids (Qwen2.5-Instruct: <|im_end|> and <|endoftext|>): whichever comes first ends it
    mask, trunc = completion_mask(torch.tensor([[4, 9, 3, 9, 3]]), [3, 9])
    assert mask.tolist() == [[1, 1, 0, 0, 0]] and trunc.tolist() == [False]


def naive_logprobs(model, ids, amask, P, temperature):
    """Reference: one unpadded forward per row, full float32 logits."""
    lps, ents = [], []
    for row, m in zip(ids, amask):
        start = int((m[:P] == 0).sum())                  # left padding of this row
        seq = row[start:][None]
        logits = model(input_ids=seq).logits.float()[0] / temperature
        logp_all = torch.log_softmax(logits[P - start - 1:-1], -1)
        lps.append(logp_all.gather(-1, seq[0, P - start:, None])[:, 0])
        ents.append(-(logp_all.exp() * logp_all).sum(-1))
    return torch.stack(lps), torch.stack(ents)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_logprobs_equal_naive(tiny_path, temperature):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32)
    torch.manual_seed(0)
    # two prompts of different lengths, left-padded with pad id 0, then 5 completion tokens
    ids = torch.randint(3, 90, (2, 9))
    ids[1, :3] = 0
    amask = torch.ones_like(ids)
    amask[1, :3] = 0
    P = 4
    ref_lp, ref_ent = naive_logprobs(model, ids, amask, P, temperature)
    lp, ent = completion_logprobs(model, ids, amask, P, temperature, chunk_tokens=3)   # 4 chunks
    assert lp.shape == ent.shape == (2, 5)
    assert torch.allclose(lp, ref_lp, atol=1e-5)
    assert torch.allclose(ent, ref_ent, atol=1e-5)
    # the plain definition (token_logprobs on the whole logits) is the same quantity
    plain_lp, plain_ent = cegppo.completion_logprobs(model, ids, amask, P, temperature)
    assert torch.allclose(lp, plain_lp, atol=1e-5) and torch.allclose(ent, plain_ent, atol=1e-5)
    # the temperature is really applied: at 1.0 the 0.7 numbers would be far off
    if temperature != 1.0:
        plain, _ = naive_logprobs(model, ids, amask, P, 1.0)
        assert not torch.allclose(lp, plain, atol=1e-3)
    # gradients through the hand-written chunked backward equal the naive ones
    # (the head's weight, and a body weight, reached through the hidden states)
    w = [model.lm_head.weight, model.model.layers[0].mlp.down_proj.weight]
    g = torch.autograd.grad(lp.sum(), w)
    g_ref = torch.autograd.grad(ref_lp.sum(), w)
    for a, b in zip(g, g_ref):
        assert torch.allclose(a, b, atol=1e-5)


def test_chunked_logprob_backward_by_finite_differences():
    # The hand-written backward of _TokenLogProb against finite differences, in float64, with a
    # bias, a temperature and chunks of 2 over 5 positions (the last chunk is short).
    torch.manual_seed(0)
    h = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 6, 3, 3, 1])
    f = lambda h, w, b: logprobs._TokenLogProb.apply(h, w, b, targets, 0.7, 2, True)[0]
    assert torch.autograd.gradcheck(f, (h, w, b))
    # and its values: log_softmax(hW^T + b) / T at the targets, entropy of that distribution
    lp, ent = logprobs._TokenLogProb.apply(h, w, b, targets, 0.7, 2, True)
    ref = torch.log_softmax((h @ w.T + b) / 0.7, -1)
    assert torch.allclose(lp, ref.gather(-1, targets[:, None])[:, 0])
    assert torch.allclose(ent, -(ref.exp() * ref).sum(-1))
    assert not ent.requires_grad
    _, none = logprobs._TokenLogProb.apply(h, w, b, targets, 0.7, 2, False)
    assert none.abs().sum() == 0


def test_token_logprobs_definition_by_hand():
    # logits [0, ln 3] at T = 1: p = (1/4, 3/4); log p(target 1) = ln 0.75; H = -(1/4 ln 1/4 + 3/4 ln 3/4)
    import math
    logp, ent = token_logprobs(torch.tensor([[0.0, math.log(3.0)]]), torch.tensor([1]))
    assert logp.item() == pytest.approx(math.log(0.75))
    assert ent.item() == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))
    # T = 2 halves the logits: [0, ln 3 / 2] -> p = (1, sqrt 3) / (1 + sqrt 3)
    logp, _ = token_logprobs(torch.tensor([[0.0, math.log(3.0)]]), torch.tensor([0]), temperature=2.0)
    assert logp.item() == pytest.approx(math.log(1 / (1 + math.sqrt(3))))


def test_rollout_on_4bit_lora_is_on_policy(tiny_policy):
    model, tok = tiny_policy
    import bitsandbytes as bnb
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    prompts = [format_prompt(tok, "What is 2+3?"), format_prompt(tok, "What is 12*11-7?")]
    torch.manual_seed(0)
    ro = rollout(model, tok, prompts, num_generations=3, max_new_tokens=12, temperature=0.9, top_p=1.0)
    B, P = 6, ro.prompt_len
    T = ro.input_ids.shape[1] - P
    assert ro.completion_mask.shape == (B, T) and ro.truncated.shape == (B,)
    assert len(ro.texts) == B
    # the prompts are left-padded and repeated G times, in order
    assert torch.equal(ro.input_ids[0, :P], ro.input_ids[2, :P])
    assert not torch.equal(ro.input_ids[0, :P], ro.input_ids[3, :P])
    # mask rules: truncated rows are all ones, the others end at their first EOS
    comp = ro.input_ids[:, P:]
    for b in range(B):
        eos_at = (comp[b] == tok.eos_token_id).nonzero()
        n = int(ro.completion_mask[b].sum())
        if ro.truncated[b]:
            assert n == T == 12 and len(eos_at) == 0
        else:
            assert n == int(eos_at[0]) + 1
    assert torch.equal(ro.attention_mask[:, P:], ro.completion_mask)
    # on-policy the training forward must reproduce the sampling distribution: ratio 1
    with torch.no_grad():
        lp1, ent = completion_logprobs(model, ro.input_ids, ro.attention_mask, P, 0.9)
    model.train()
    with torch.no_grad():
        lp2, _ = completion_logprobs(model, ro.input_ids, ro.attention_mask, P, 0.9)
    m = ro.completion_mask.bool()
    assert torch.allclose(lp1[m], lp2[m], atol=1e-5)        # no dropout anywhere in the policy
    assert (ent[m] > 0).all() and (lp1[m] <= 0).all()


def test_rollout_logprobs_match_generate_scores(tiny_policy):
    """The log-probs the trainer computes equal log_softmax(logits / T) of the very sampling step."""
    model, tok = tiny_policy
    prompts = [format_prompt(tok, "Hi"), format_prompt(tok, "What is 100-1?")]
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left")
    model.eval()
    with torch.no_grad():
        out = model.generate(**enc, do_sample=True, top_k=0, top_p=1.0, temperature=0.8, max_new_tokens=6,
                             min_new_tokens=6, return_dict_in_generate=True, output_logits=True,
                             pad_token_id=tok.pad_token_id)
        P = enc["input_ids"].shape[1]
        gen_lp = torch.stack([torch.log_softmax(l.float() / 0.8, -1).gather(-1, out.sequences[:, P + i, None])[:, 0]
                              for i, l in enumerate(out.logits)], 1)
        amask = torch.cat([enc["attention_mask"], torch.ones(2, 6, dtype=torch.long)], 1)
        lp, _ = completion_logprobs(model, out.sequences, amask, P, 0.8)
    assert torch.allclose(lp, gen_lp, atol=1e-4)


def test_generate_train_generate_on_4bit(tiny_policy):
    """The AVX512-BF16 trap: a no-grad generate must not break the next training forward."""
    model, tok = tiny_policy
    prompts = [format_prompt(tok, "What is 1+1?")]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        ro = rollout(model, tok, prompts, num_generations=2, max_new_tokens=4)
        model.train()
        lp, _ = completion_logprobs(model, ro.input_ids, ro.attention_mask, ro.prompt_len)
        loss, _ = cegppo.cegppo_loss(lp, lp.detach() - 0.5, torch.tensor([1.0, -1.0]), ro.completion_mask,
                                     **cegppo.ALGOS["cegppo"])
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert torch.isfinite(loss)


@pytest.fixture()
def warm_tiny_policy():
    """The tiny model after its short warm start: it writes answers and stops on its own."""
    return models.load_model(lab.warm_start_path("tiny"), four_bit=True, lora_rank=8, trainable=True)


def test_generation_stops_when_every_sequence_has_finished(warm_tiny_policy):
    model, tok = warm_tiny_policy
    prompts = [format_prompt(tok, q) for q, _ in data.load_rows("tiny", "train")[:4]]
    torch.manual_seed(0)
    ro = rollout(model, tok, prompts, 4, 200, 1.0, 1.0, Generator(8))       # two generate() calls of 8
    lengths = ro.completion_mask.sum(1)
    assert not ro.truncated.any()                             # all 16 wrote an EOS well before 200
    # no step was spent past the longest completion: the completion block is exactly that wide
    assert ro.completion_mask.shape[1] == int(lengths.max()) < 200


def test_generation_out_of_memory_halves_the_batch(warm_tiny_policy):
    model, tok = warm_tiny_policy
    prompts = [format_prompt(tok, q) for q, _ in data.load_rows("tiny", "train")[:2]]
    real_generate, sizes = model.generate, []

    def small_gpu_generate(**kw):           # a device on which more than 2 sequences do not fit
        sizes.append(kw["input_ids"].shape[0])
        if kw["input_ids"].shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_generate(**kw)

    model.generate = small_gpu_generate
    with pytest.warns(UserWarning, match="retrying with generation batch 2"):
        ro = rollout(model, tok, prompts, 4, 30, 1.0, 1.0, generate := Generator(8))
    assert sizes == [8, 4, 2, 2, 2, 2]        # 8 fails, 4 fails, then four calls of 2
    assert generate.batch_size == 2 and len(ro.texts) == 8
    assert ro.input_ids.shape[0] == 8 and ro.completion_mask.sum(1).min() >= 1
