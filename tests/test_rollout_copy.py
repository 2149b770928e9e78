"""engine/dense_copy.py: the dense (dequantised, LoRA-merged) copy of the policy that train.py samples from."""
import dataclasses
import gc
import hashlib
import json
import os
import weakref

import bitsandbytes as bnb
import pytest
import torch

import cegppo
import train
from engine.sampler import Sampler
from engine import dense_copy, lab, models, sizes

# Tolerance on the logits, CPU float32. The copy computes x @ (W + s B A)^T where the policy computes
# x @ W^T + s (x A^T) B^T from the same dequantised W: the same real number, summed in another order,
# so the logits differ by float32 rounding, measured at about 5e-6 on logits of size ~10 (relative
# 1e-6, a few ulps after 2 layers). 1e-4 leaves 20x room for other BLAS paths, and is still 100x
# below what a wrong merge gives: the LoRA update alone moves these logits by more than 1e-2
# (asserted below), and NF4 rounding error (a copy of the unquantised weights) by about 1e-1.
ATOL = 1e-4


@pytest.fixture()
def policy():
    torch.manual_seed(0)
    model, tok = models.load_model(lab.warm_start_path("tiny"), four_bit=True, lora_rank=8, trainable=True)
    return model, tok


def logits(model, ids):
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids).logits
    model.train(was)
    return out


def four_bit_state(model):
    """Every 4-bit weight's packed bytes and scales, cloned."""
    return {n: (m.weight.data.clone(), m.weight.quant_state.absmax.clone())
            for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def test_dense_copy_follows_the_policy_through_updates(policy):
    model, tok = policy
    ids = tok([cegppo.format_prompt(tok, q) for q in ("What is 3 + 4?", "What is 9 * 2?")], return_tensors="pt",
              padding=True)["input_ids"]
    before = four_bit_state(model)
    dense = dense_copy.dense_copy(model)
    # a plain transformers model: no 4-bit layers, no LoRA
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in dense.modules())
    assert all(type(m).__module__.startswith(("torch", "transformers")) for m in dense.modules())
    assert (logits(dense, ids) - logits(model, ids)).abs().max() < ATOL          # LoRA B = 0: base only

    # some optimizer updates move the LoRA weights (B is zero at init, so the first update matters)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(3):
        lp, _ = cegppo.completion_logprobs(model, ids, torch.ones_like(ids), 3)
        (-lp.mean()).backward()
        opt.step()
        opt.zero_grad()
    after = logits(model, ids)
    stale = logits(dense, ids)
    assert (stale - after).abs().max() > 1e-2           # the adapter moved the logits: the test has power
    fresh = dense_copy.dense_copy(model)
    assert (logits(fresh, ids) - after).abs().max() < ATOL
    refreshed = dense_copy.dense_copy(model, into=dense)                # in place, no new model
    assert refreshed is dense and (logits(dense, ids) - after).abs().max() < ATOL

    # building the copies changed no 4-bit weight of the policy
    for n, (data, absmax) in four_bit_state(model).items():
        assert torch.equal(data, before[n][0]) and torch.equal(absmax, before[n][1]), n
    # frozen tensors are shared (same dtype and device), the merged Linear weights are the copy's own
    base = dense_copy.base_model(model)
    assert dense.model.embed_tokens.weight.data_ptr() == base.model.embed_tokens.weight.data_ptr()
    linear_bytes = sum(m.weight.numel() * 4 for m in dense.modules()
                       if isinstance(m, torch.nn.Linear) and m is not dense.lm_head)
    assert dense_copy.copy_bytes(model) == linear_bytes


def test_choose_and_mismatch(policy):
    model, _ = policy
    assert dense_copy.choose("policy", model) == "policy"
    assert dense_copy.choose("dense", model) == "dense"
    assert dense_copy.choose("auto", model, 64, 1024) == "policy"          # on a CPU (measured slower)
    m = dense_copy.sampling_mismatch(torch.tensor([[-1.0, -2.0, 5.0]]), torch.tensor([[-1.5, -2.0, 0.0]]),
                                       torch.tensor([[1, 1, 0]]))
    assert m == {"sampling/sampling_logp_difference/mean": 0.25, "sampling/sampling_logp_difference/max": 0.5}


def folder_hash(folder):
    h = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        h.update(name.encode() + open(os.path.join(folder, name), "rb").read())
    return h.hexdigest()


def test_train_step_with_dense_rollout(tmp_path):
    folder = lab.warm_start_path("tiny")
    disk = folder_hash(folder)
    out = str(tmp_path / "run")
    assert train.main(["--model", "tiny", "--dataset", "tiny", "--max_steps", "2", "--eval_limit", "0",
                       "--rollout_model", "dense", "--output_dir", out]) == 0
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert len(rows) == 2
    for r in rows:
        mean, mx = r["sampling/sampling_logp_difference/mean"], r["sampling/sampling_logp_difference/max"]
        # float32 rounding only (see ATOL): far below any log-prob difference that would matter
        assert 0 <= mean <= mx < 1e-3
        assert r["time/rollout_copy_s"] > 0 and "time/sampling_logprob_s" not in r    # no extra pass for it
    assert rows[0]["updates"] >= 1                    # the policy trained between the two rollouts
    assert folder_hash(folder) == disk                                    # the base model's folder is untouched
    out2 = str(tmp_path / "policy")
    assert train.main(["--model", "tiny", "--dataset", "tiny", "--max_steps", "1", "--eval_limit", "0",
                       "--rollout_model", "policy", "--output_dir", out2]) == 0
    row = json.loads(open(os.path.join(out2, "metrics.jsonl")).readline())
    assert "time/rollout_copy_s" not in row
    assert row["sampling/sampling_logp_difference/max"] < 1e-5          # the policy samples: rounding only


def test_choose_counts_what_sampling_holds(policy, monkeypatch):
    """On a GPU (simulated: the copy is counted from the CPU policy's tensors and the free memory is
    set by hand), auto takes the copy only when the copy, the KV cache, the prefill's activations,
    the logits and the mismatch metric's log-prob pass all fit, by memory.py's own formulas."""
    from engine import memory
    model, _ = policy
    shape = memory.ModelShape.from_config(model.config)
    S, P, T, mb = 16, 40, 100, 8                           # sequences, prompt tokens, all tokens, micro-batch
    held = dense_copy.held_while_sampling(model, S, T, P, mb)
    # the formulas' one home: the copy computes in float32 on a CPU, with merged (not LoRA) Linears
    assert held == sizes.sampling_bytes(shape, S, P, T, 4, lora=False, micro_batch=mb)
    generate = max(sizes.kv_cache_bytes(shape, S, T, 4), sizes.kv_cache_bytes(shape, S, P, 4)
                   + sizes.prefill_bytes(shape, S, P, 4, lora=False)) + sizes.sampling_logits_bytes(shape, S)
    logprob = sizes.logprob_pass_bytes(shape, mb, T, T - P, 4, lora=False)
    assert held == max(generate, logprob) and dense_copy.held_while_sampling(model, S, T, P) == generate
    assert held > memory.kv_cache_bytes(shape, S, T, 4)   # more than the KV cache the old rule counted
    need = dense_copy.copy_bytes(model) + held
    assert need == memory.dense_copy_bytes(shape, "fp32") + held
    monkeypatch.setattr(dense_copy, "_device", lambda policy: torch.device("cuda"))
    gpu = {"free": 0, "total": 10 ** 12, "allocated": 0, "reserved": 0, "fraction": 1.0}
    for name, key in (("memory_allocated", "allocated"), ("memory_reserved", "reserved"),
                      ("get_per_process_memory_fraction", "fraction")):
        monkeypatch.setattr(torch.cuda, name, lambda device=None, key=key: gpu[key])
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (gpu["free"], gpu["total"]))
    for free, want in ((need / 0.9 + 10, "dense"), (need / 0.9 - 10, "policy")):
        gpu["free"] = int(free)
        assert dense_copy.choose("auto", model, S, T, 0.1, prompt_tokens=P, micro_batch=mb) == want
    # torch's cached blocks are free for the copy; a per-process cap the driver does not see is not
    gpu.update(free=int(need / 0.9 - 10), allocated=1000, reserved=1000 + 20)
    assert dense_copy.choose("auto", model, S, T, 0.1, prompt_tokens=P, micro_batch=mb) == "dense"
    gpu.update(free=10 ** 12, total=10 ** 12, fraction=(need / 0.9 + 1000 - 10) / 10 ** 12)
    assert dense_copy.choose("auto", model, S, T, 0.1, prompt_tokens=P, micro_batch=mb) == "policy"
    gpu.update(fraction=(need / 0.9 + 1000 + 10) / 10 ** 12)
    assert dense_copy.choose("auto", model, S, T, 0.1, prompt_tokens=P, micro_batch=mb) == "dense"


def test_release_frees_the_copy_and_spares_the_policy(policy, monkeypatch):
    model, tok = policy
    dense = dense_copy.dense_copy(model)
    shared = dense.model.embed_tokens.weight.data_ptr()
    assert shared == dense_copy.base_model(model).model.embed_tokens.weight.data_ptr()
    merged = dense.model.layers[0].mlp.up_proj.weight
    emptied = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    dense_copy.release(dense)
    assert emptied == [True]                                              # on CUDA the cache goes back too
    assert all(t.is_meta for t in [*dense.parameters(), *dense.buffers()])
    assert merged.is_meta is False and merged.untyped_storage().nbytes() > 0   # a reference kept by a caller...
    # ...is the caller's; the copy holds nothing: the policy still works and keeps its own tensors
    ids = tok(["What is 2+3?"], return_tensors="pt")["input_ids"]
    assert torch.isfinite(logits(model, ids)).all()
    assert not dense_copy.base_model(model).model.embed_tokens.weight.is_meta


def test_the_bf16_copy_keeps_a_small_adapter_that_merging_rounds_away():
    """In bf16, W + s B A rounds back to W wherever the adapter's change is below half a bf16 step of
    W: a merged copy samples from (almost) the base model early in a run. The half-precision copy keeps
    the adapters apart (LoRALinear, as peft computes them) and so computes what the policy computes."""
    torch.manual_seed(0)                           # LoRA A's init: the same layers whatever ran before
    model, _ = models.load_model(lab.warm_start_path("tiny"), four_bit=True, lora_rank=8, trainable=True,
                                  dtype="bf16")
    assert models.model_compute_dtype(model) == torch.bfloat16
    g = torch.Generator().manual_seed(1)
    for n, q in model.named_parameters():          # a small trained adapter: B of 1e-5, as after a few updates
        if "lora_B" in n:
            q.data = torch.randn(q.shape, generator=g) * 1e-5
    kept, merged = dense_copy.dense_copy(model), dense_copy.dense_copy(model, merge=True)
    errors, changes = [], []
    for name, dmod, pmod in dense_copy._pairs(kept, dense_copy.base_model(model)):
        if not dense_copy._lora_adapters(pmod):
            continue
        assert isinstance(dmod, dense_copy.LoRALinear)
        x = torch.randn(6, pmod.in_features, generator=g).to(torch.bfloat16)
        with torch.no_grad():
            want = pmod(x).float()                           # the policy: 4-bit base + LoRA (peft)
            base = pmod.get_base_layer()(x).float()          # the same without the adapter
            got = dmod(x).float()
            rounded = merged.get_submodule(name)(x).float()
        assert torch.equal(got, want), name                  # bit for bit: the same operations
        changes.append((want - base).abs().sum().item())         # what the adapter changes
        errors.append((rounded - want).abs().sum().item())       # the merged copy's error
    assert len(errors) == 2 * 7                                # 2 layers x q, k, v, o, gate, up, down
    # merged in bf16 (W + s B A rounded to bf16: changes below half a step lost, others moved by up to
    # half a step), the copy's error is several times the whole of the adapter's change: in total and
    # in the median layer (measured with LoRA inits of seeds 0-4: 5.1 to 7.7 times in total, the median
    # layer 4.2 to 9.5 times; a single layer can come out exact by chance)
    assert sum(changes) > 0
    assert sum(errors) > 3 * sum(changes), (errors, changes)
    assert sorted(e / max(c, 1e-30) for e, c in zip(errors, changes))[len(errors) // 2] > 2
    # in float32 the copy merges (exact to float32 rounding, and one matmul per layer)
    fp32, _ = models.load_model(lab.warm_start_path("tiny"), four_bit=True, lora_rank=8, trainable=True)
    assert not any(isinstance(m, dense_copy.LoRALinear) for m in dense_copy.dense_copy(fp32).modules())
    dense_copy.release(kept)
    assert all(m.adapters == [] for m in kept.modules() if isinstance(m, dense_copy.LoRALinear))
    assert all(p.is_meta for p in kept.parameters())


def test_evaluation_generates_from_the_dense_copy_where_the_rollout_does(policy, monkeypatch):
    import eval as eval_script
    model, tok = policy
    rows = lab.toy_rows("test", tiny=True)[:4]
    cfg = train.parse_config(["--model", "tiny", "--max_completion_length", "12", "--generation_batch_size", "8"])

    def sampler(kind):                   # what the rollout samples from: the dense copy, or the policy
        return Sampler(model, tok, dataclasses.replace(cfg, rollout_model=kind), "sampler")
    seen, real = [], train.evaluate
    monkeypatch.setattr(train, "evaluate", lambda m, *a, **k: seen.append(type(m).__name__) or real(m, *a, **k))
    on_copy = train.evaluate_policy(sampler("dense"), tok, rows, cfg, 1)
    on_policy = train.evaluate_policy(sampler("policy"), tok, rows, cfg, 1)
    assert seen == ["Qwen2ForCausalLM", "PeftModelForCausalLM"]
    assert on_copy == on_policy                        # greedy, float32: the same answers
    # no room to build the copy for an evaluation: said, and that evaluation generates through the policy
    # (and what the half-built copy had allocated is freed before the evaluation runs, not held by the
    # exception's traceback)
    held = []

    def no_room(model, into=None):
        half_built = torch.empty(1000)
        held.append(weakref.ref(half_built))
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
    def evaluate(m, *a, **k):
        gc.collect()
        seen.append((type(m).__name__, held[0]() is None))
        return real(m, *a, **k)
    seen.clear()
    with monkeypatch.context() as m:
        m.setattr(dense_copy, "dense_copy", no_room)
        m.setattr(train, "evaluate", evaluate)
        assert train.evaluate_policy(sampler("dense"), tok, rows, cfg, 1) == on_policy
    assert seen == [("PeftModelForCausalLM", True)]
    # eval.py: the copy where dense_copy.choose picks it (a GPU with room), the model itself otherwise
    ecfg = eval_script.EvalConfig(max_completion_length=12)
    assert not eval_script.use_dense_copy(model, tok, rows, ecfg)          # a CPU: the policy
    monkeypatch.setattr(dense_copy, "choose", lambda mode, *a, **k: "dense")
    assert eval_script.use_dense_copy(model, tok, rows, ecfg)
