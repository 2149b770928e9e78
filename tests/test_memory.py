"""memory.py's arithmetic against the real tensors of the tiny model (4-bit NF4 + LoRA, bitsandbytes on CPU).

Every line of the table is a formula of the model's shape; here each formula is applied to the
tiny model's shape and compared with the bytes of the tensors that models.load_model, generate()
and the log-prob pass really hold. Nothing here needs a GPU, and nothing is timed.
"""
import bitsandbytes as bnb
import os

import pytest
import torch

import cegppo
import train
from engine import dense_copy, lab, logprobs, memory, models, sizes
from engine.generation import Generator


def tensor_bytes(t):
    return t.numel() * t.element_size()


@pytest.fixture(scope="module")
def loaded():
    """The tiny model as train.py loads it by default, with fp16 compute: (model, tokenizer, shape)."""
    model, tok = models.load_model(lab.tiny_model_path("tiny"), four_bit=True, lora_rank=8, trainable=True,
                                    dtype="fp16")
    return model, tok, memory.ModelShape.from_config(model.config, "tiny")


def test_shape_of_the_tiny_model(loaded):
    model, _, shape = loaded
    c = model.config
    assert (shape.hidden, shape.layers, shape.heads, shape.kv_heads, shape.vocab, shape.tied) == (
        c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.vocab_size, False)


def test_four_bit_weight_bytes_are_the_quant_states(loaded):
    model, _, shape = loaded
    total, count = 0, 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            qs = m.weight.quant_state
            assert qs.nested and qs.blocksize == memory.NF4_BLOCK and qs.state2.blocksize == memory.NESTED_BLOCK
            total += sum(tensor_bytes(t) for t in (m.weight.data, qs.absmax, qs.code, qs.offset,
                                                   qs.state2.absmax, qs.state2.code))
            count += 1
    assert count == 7 * shape.layers
    assert total == memory.quantised_bytes(shape)


def test_unquantised_and_lora_bytes(loaded):
    model, _, shape = loaded
    rest = [p for n, p in model.named_parameters() if "lora_" not in n and type(p).__name__ != "Params4bit"]
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    # peft's k-bit preparation casts embeddings, head, norms and biases to float32 despite fp16 compute
    assert {p.dtype for p in rest} == {torch.float32}
    assert sum(tensor_bytes(p) for p in rest) == memory.base_weight_bytes(shape, "fp16", True)[1]
    assert {p.dtype for p in lora} == {torch.float32} and all(p.requires_grad for p in lora)
    assert sum(tensor_bytes(p) for p in lora) == 4 * memory.lora_numel(shape, 8)


def test_sixteen_bit_weight_bytes():
    model, _ = models.load_model(lab.tiny_model_path("tiny"), four_bit=False, lora_rank=8, trainable=True,
                                  dtype="fp16")
    shape = memory.ModelShape.from_config(model.config)
    base = [p for n, p in model.named_parameters() if "lora_" not in n]
    assert {p.dtype for p in base} == {torch.float16}
    assert sum(tensor_bytes(p) for p in base) == memory.base_weight_bytes(shape, "fp16", False)[1]


def test_kv_cache_matches_generate(loaded):
    """The rollout's cache: float32 in the 4-bit path (the residual stream is float32 after k-bit preparation)."""
    model, tok, shape = loaded
    prompts = [cegppo.format_prompt(tok, q) for q in ("What is 2+3?", "What is 7*8?", "What is 9-4?")]
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left")
    new = 6
    model.eval()
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                             return_dict_in_generate=True, use_cache=True, pad_token_id=tok.pad_token_id)
    model.train()
    cache = out.past_key_values
    tensors = [t for layer in cache.layers for t in (layer.keys, layer.values)]
    assert len(tensors) == 2 * shape.layers
    assert {t.dtype for t in tensors} == {torch.float32}
    seq = enc["input_ids"].shape[1] + new - 1          # the last sampled token is never fed back
    assert sum(tensor_bytes(t) for t in tensors) == memory.kv_cache_bytes(
        shape, len(prompts), seq, memory.residual_bytes("fp16", True))


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_sampling_logits_are_what_generate_holds(loaded, top_p):
    """The [batch, V] tensors of a decode step, tracked op by op through a whole sampled rollout (a
    dispatch mode sees every tensor generate(), the warpers and the recorder make; the LM head's own
    weight and its views are left out): their peak is what sizes.sampling_logits_bytes counts."""
    import weakref
    from torch.utils._python_dispatch import TorchDispatchMode
    model, tok, shape = loaded
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    B = 8

    class Tracker(TorchDispatchMode):
        live, peak = {}, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.dim() and t.shape[-1] == shape.vocab and \
                        t.untyped_storage().data_ptr() not in weights:
                    self.live[t.untyped_storage().data_ptr()] = (weakref.ref(t), t.untyped_storage().nbytes())
            Tracker.peak = max(Tracker.peak, sum(n for ref, n in self.live.values() if ref() is not None))
            return out
    prompts = [cegppo.format_prompt(tok, q) for q in ("What is 2+3?", "What is 7*8?")]
    with Tracker():
        cegppo.rollout(model, tok, prompts, B // 2, 6, 1.0, top_p, Generator(64))
    # the residual stream (and the head's output) is float32 in the 4-bit policy
    counted = sizes.sampling_logits_bytes(shape, B, memory.residual_bytes("fp16", True), top_p)
    assert 0 < Tracker.peak <= counted
    assert counted <= 1.5 * Tracker.peak                 # and not far above it


@pytest.mark.parametrize("four_bit", [True, False])
def test_one_layer_saved_activations(four_bit):
    """One decoder block's tensors saved for backward, per token, as autograd sees them (measured at
    two lengths: the difference drops anything that does not grow with the tokens)."""
    model, _ = models.load_model(lab.tiny_model_path("tiny"), four_bit=four_bit, lora_rank=8, trainable=True,
                                  dtype="fp16", gradient_checkpointing=False)
    shape = memory.ModelShape.from_config(model.config)
    body = model.get_decoder()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def saved_bytes(S, B=2):
        store = {}

        def pack(t):
            s = t.untyped_storage()
            if s.data_ptr() not in params:
                store[s.data_ptr()] = s.nbytes()
            return t
        ids = torch.randint(3, 90, (B, S))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            x = body.embed_tokens(ids).requires_grad_(True)
            pos = torch.arange(S)[None].expand(B, S)
            body.layers[1](x, attention_mask=None, position_ids=pos, position_embeddings=body.rotary_emb(x, pos))
        return sum(store.values())
    per_token = (saved_bytes(128) - saved_bytes(64)) / (2 * 64)
    resid, fp32 = memory.layer_activation_elems(shape, 8, four_bit)
    assert per_token == resid * memory.residual_bytes("fp16", four_bit) + fp32 * 4


def test_logprob_chunk_is_what_the_pass_uses(loaded, monkeypatch):
    """The largest LM-head matmul of completion_logprobs has logprobs.chunk_size rows (float32 [chunk, V] logits)."""
    model, tok, shape = loaded
    B, P, T = 4, 5, 40
    ids = torch.randint(3, 90, (B, P + T))
    rows = []
    real = torch.nn.functional.linear

    def spy(x, w, b=None):
        if w.shape[0] == shape.vocab:
            rows.append(x.shape[0])
        return real(x, w, b)
    monkeypatch.setattr(logprobs.F, "linear", spy)
    lp, _ = logprobs.chunked_logprobs(model, ids, torch.ones_like(ids), P, 1.0)
    lp.sum().backward()
    assert max(rows) == logprobs.chunk_size(B * T) < B * T
    cfg = train.Config(micro_batch_size=B, max_completion_length=T)
    line = memory.estimate(shape, cfg)["update: log-prob chunk (2 x chunk x V fp32)"]
    assert line == 2 * logprobs.chunk_size(B * T) * shape.vocab * 4


def test_qwen_shapes_and_total():
    m = memory.QWEN["Qwen2.5-0.5B"]
    assert (m.head_dim, m.kv_heads * m.head_dim) == (64, 128)
    est = memory.estimate(m, train.Config(dtype="fp16"))
    parts = [v for k, v in est.items() if not k.startswith("peak")]
    persistent = sum(v for k, v in est.items() if not k.startswith(("rollout", "update", "peak")))
    update = sum(v for k, v in est.items() if k.startswith("update"))
    # the rollout at its peak, with the prefill shared (--shared_prefix, the default): the prefill's
    # activations over the 8 distinct prompts of a 64-sequence sub-batch with their cache; that cache
    # expanded to the 64 sequences layer by layer (each layer's prompt cache freed once expanded); or
    # later the full cache
    kv, shared, prefill, logits = (est[k] for k in (
        "rollout: KV cache", "rollout: the prompts' shared cache", "rollout: prefill activations (one layer)",
        "rollout: sampling logits (5 x [batch, V] fp32 + the step's)"))
    assert shared == kv * 8 * 512 // (64 * 1024)          # 8 of the 64 sequences, 512 of the 1024 positions
    expanded, layers = kv * 512 // 1024, m.layers
    head = est["rollout: the LM head in fp16 (generation.head_cast_once)"]          # through the policy
    assert head == 151936 * 896 * 2
    rollout = max(prefill + shared, shared + expanded / layers, expanded + shared / layers, kv) + logits + head
    assert rollout == memory.rollout_phase_bytes(m, train.Config(dtype="fp16"))
    # without it, every sequence's prefill: the prompts' half of the cache and 8 times the activations
    plain = memory.estimate(m, train.Config(dtype="fp16", shared_prefix=False))
    assert "rollout: the prompts' shared cache" not in plain
    assert plain["rollout: prefill activations (one layer)"] == 8 * prefill
    assert memory.rollout_phase_bytes(m, train.Config(dtype="fp16", shared_prefix=False)) == \
        max(8 * prefill + kv * 512 // 1024, kv) + logits + head
    # the updates: a micro-batch of 8 rows is one group of 8 (mini-batches are whole groups), packed
    # as its prompt once and 8 completions instead of 8 x (prompt + completion) positions
    assert est["update: one layer's recompute"] * 8 * 1024 == plain["update: one layer's recompute"] * (512 + 8 * 512)
    # 6 rows can touch 2 groups: 2 packed rows, each padded to a prompt and 6 completions, hold more
    # positions than the 6 plain rows: the plain layout (logprobs.worth_it's rule, on the padded block)
    assert memory.update_positions(m, train.Config(micro_batch_size=6)) == (6 * 1024, 0, 0)
    # 16 completions of 512 behind a prompt of 64: attention over the packed row costs more than it saves
    assert memory.update_positions(m, train.Config(micro_batch_size=16, num_generations=16, max_prompt_length=64)) == \
        (16 * (64 + 512), 0, 0)
    assert est["peak = persistent + max(rollout, update)"] == persistent + max(rollout, update) < sum(parts)
    # tied head: the 0.5B's float32 embedding table is vocab x hidden x 4 bytes, counted once
    assert est["embeddings / head, norms, biases (fp32)"] > 151936 * 896 * 4
    assert est["embeddings / head, norms, biases (fp32)"] < 151936 * 896 * 4 * 1.01


@pytest.mark.parametrize("name", ["Qwen2.5-0.5B", "Qwen2.5-1.5B"])
def test_the_shared_prefill_never_holds_more_than_the_plain_one(name):
    # each generate() sub-batch encodes its own prompts (engine/generation.py): many prompts per step and a
    # small generation batch (the fits' ladder lowers it) must not make the shared prefill the larger
    m = memory.QWEN[name]
    for P, G, batch in [(8, 8, 64), (64, 8, 16), (64, 8, 4), (32, 4, 6), (16, 16, 8), (8, 2, 3), (4, 8, 1)]:
        kw = dict(dtype="fp16", prompts_per_step=P, num_generations=G, generation_batch_size=batch)
        shared = train.Config(**kw)
        assert memory.rollout_phase_bytes(m, shared) <= memory.rollout_phase_bytes(
            m, train.Config(**kw, shared_prefix=False)), (P, G, batch)


def test_sub_batch_prompts_counts_the_distinct_prompts():
    for rows, G in [(64, 8), (16, 8), (4, 8), (12, 8), (7, 5), (6, 4), (1, 8), (3, 2)]:
        worst = 0
        for start in range(0, 20 * G * rows, rows):        # every sub-batch of a long rollout
            worst = max(worst, len({r // G for r in range(start, start + rows)}))
        assert sizes.sub_batch_prompts(rows, G) >= worst
        assert sizes.sub_batch_prompts(rows, G) <= worst + (0 if rows % G == 0 or G % rows == 0 else 1)


def test_fit_suggestions_fit():
    cfg = train.Config(dtype="fp16")
    for m in memory.QWEN.values():
        for card in memory.CARDS_GB:
            changed, peak = memory.fit(m, cfg, card)
            assert changed is not None and peak + memory.HEADROOM_GB <= card
            assert memory.peak_gb(m, __import__("dataclasses").replace(cfg, **changed)) == peak


def test_printed_table_matches_the_function(capsys):
    assert memory.main([]) == 0
    out = capsys.readouterr().out
    table = memory.table(list(memory.QWEN.values()), train.Config(dtype="fp16"))
    assert table in out and "computed from tensor sizes, not measured" in out
    for line in table.splitlines()[2:]:
        assert line.startswith("| ") and line.count("|") == 4


def test_the_table_counts_bf16_bytes_on_a_t4_host(tmp_path):
    """memory.py counts bytes for any card: on a host whose GPU has no native bf16 (a T4, simulated in the
    subprocesses through a sitecustomize that makes torch.cuda report compute capability 7.5) train.py
    refuses --dtype bf16, and memory.py --dtype bf16 still prints its table."""
    import subprocess
    import sys
    (tmp_path / "sitecustomize.py").write_text(
        "import torch\n"
        "import bitsandbytes, peft, transformers  # they ask CUDA at import: a real T4's answers would differ\n"
        "torch.cuda.is_available = lambda: True\n"
        "torch.cuda.get_device_capability = lambda device=None: (7, 5)\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    refused = subprocess.run([sys.executable, "train.py", "--dtype", "bf16", "--print_config"], cwd=root, env=env,
                             capture_output=True, text=True)
    assert refused.returncode != 0 and "--dtype bf16: this GPU has no native bf16" in refused.stderr
    table = subprocess.run([sys.executable, "memory.py", "--dtype", "bf16"], cwd=root, env=env,
                           capture_output=True, text=True)
    assert table.returncode == 0, table.stderr[-2000:]
    assert "compute bf16" in table.stdout and "| Qwen2.5-0.5B |" in table.stdout


def test_docs_table_is_the_functions():
    page = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "training.md")).read()
    block = page.split("<!-- memory -->")[1].split("<!-- /memory -->")[0].strip()
    assert block == memory.table(list(memory.QWEN.values()), train.Config(dtype="fp16"))


# ----------------------------------------------------------------------------------------------
# The sampling side (sizes.py): what memory.py's table and dense_copy.choose both count
# ----------------------------------------------------------------------------------------------
def allocated_peak(fn):
    """Peak bytes allocated while fn() runs, counted from the profiler's start (CPU allocator events)."""
    import json
    import tempfile
    from torch.profiler import ProfilerActivity, profile
    with tempfile.TemporaryDirectory() as tmp:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        prof.export_chrome_trace(os.path.join(tmp, "trace.json"))
        events = json.load(open(os.path.join(tmp, "trace.json")))["traceEvents"]
    return max(e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]")


@pytest.fixture(scope="module")
def wide_mlp_folders(tmp_path_factory):
    """Tiny Qwen2 models whose MLP is 8x and 16x the hidden size (as Qwen2.5's is 5.4x and 5.8x), so that
    the MLP's share of a layer's forward is measured apart from the rest."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    tok = lab.build_tokenizer()
    folders = {}
    for inter in (512, 1024):
        cfg = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=inter, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
                          tie_word_embeddings=False)
        torch.manual_seed(0)
        folders[inter] = str(tmp_path_factory.mktemp(f"mlp{inter}"))
        Qwen2ForCausalLM(cfg).save_pretrained(folders[inter])
        tok.save_pretrained(folders[inter])
    return folders


@pytest.mark.parametrize("sampler", ["policy", "dense"])
def test_prefill_activations_match_the_allocator(wide_mlp_folders, sampler):
    """A no-grad forward (generate()'s prefill) holds one layer's tensors at a time: per token, measured
    as the growth of the allocator's peak between two lengths, sizes.layer_forward_elems in the
    residual dtype: float32 in the 4-bit + LoRA policy (whatever the compute dtype), the compute
    dtype in the dense copy, whose Linears keep LoRA apart in half precision (dense_copy.LoRALinear,
    run under autocast, as generation on a GPU is) and are merged in float32. Within 2%: the rest is
    a few per-row scalars the formula leaves out (measured: 34 bytes per token of 9216)."""
    import contextlib
    for inter, folder in wide_mlp_folders.items():
        for dtype in ("fp32", "bf16"):
            model, _ = models.load_model(folder, four_bit=True, lora_rank=8, trainable=True, dtype=dtype)
            model.eval()
            if sampler == "dense":
                model = dense_copy.dense_copy(model)
            body, B = model.get_decoder(), 4

            half = sampler == "dense" and dtype == "bf16"

            def per_layer_peak(S, body=body, B=B, half=half):
                ids = torch.randint(3, 90, (B, S))
                with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16) if half else contextlib.nullcontext():
                    return allocated_peak(lambda: body(input_ids=ids, use_cache=False))
            per_token = (per_layer_peak(128) - per_layer_peak(64)) / (B * 64)
            shape = memory.ModelShape.from_config(model.config)
            want = sizes.prefill_bytes(shape, 1, 1, 2 if half else 4, lora=sampler == "policy" or half)
            if half:        # LoRALinear holds a little less than peft's layers: counted as theirs, within 6%
                assert sizes.prefill_bytes(shape, 1, 1, 2, lora=False) <= per_token <= want <= 1.06 * per_token
                continue
            assert want <= per_token <= 1.02 * want, (inter, dtype, per_token, want)


def test_dense_copy_bytes_are_the_copys(tiny_path, tiny_policy):
    """memory.py's dense-copy line from the shape equals dense_copy.copy_bytes on a freshly loaded
    policy (as dense_copy.choose sees it): in fp16 compute the float32 embeddings, head, norms and
    biases are converted too, in float32 shared. (bitsandbytes casts a 4-bit layer's bias to the
    compute dtype in its first forward; from then on the copy shares the biases: 0.1 MB at 1.5B.)"""
    model, _ = models.load_model(tiny_path, four_bit=True, lora_rank=8, trainable=True, dtype="fp16")
    shape = memory.ModelShape.from_config(model.config)
    assert dense_copy.copy_bytes(model) == memory.dense_copy_bytes(shape, "fp16")
    assert dense_copy.copy_bytes(tiny_policy[0]) == memory.dense_copy_bytes(shape, "fp32")
    est = memory.estimate(memory.QWEN["Qwen2.5-1.5B"], train.Config(dtype="bf16", rollout_model="dense"))
    assert est["rollout: dense copy (dequantised weights, bf16)"] / 1e9 == pytest.approx(3.1, abs=0.05)   # the README's


def test_estimate_and_choose_use_one_formula(monkeypatch):
    """The rollout phase of memory.py's table and what dense_copy.choose asks the GPU for are the same
    sizes.sampling_bytes; there is no second copy of the arithmetic in rollout_copy."""
    assert not hasattr(dense_copy, "kv_cache_bytes")
    assert memory.kv_cache_bytes is sizes.kv_cache_bytes and memory.sampling_bytes is sizes.sampling_bytes
    m = memory.QWEN["Qwen2.5-0.5B"]
    seen = []
    real = sizes.sampling_bytes
    spy = lambda *a, **k: seen.append((a, k)) or real(*a, **k)
    monkeypatch.setattr(sizes, "sampling_bytes", spy)
    monkeypatch.setattr(memory, "sampling_bytes", spy)
    dense = memory.rollout_phase_bytes(m, train.Config(dtype="bf16", rollout_model="dense"))
    policy = memory.rollout_phase_bytes(m, train.Config(dtype="bf16"))
    # the copy: bf16, LoRA kept apart; the policy: float32 stream; both with the prefill shared by 8 prompts
    # (the cache in the compute dtype on either: generation.CastKVCache under autocast)
    assert seen == [((m, 64, 512, 1024, 2), {"lora": True, "micro_batch": 8, "top_p": 1.0, "prompts": 8, "kv_bytes": 2}),
                    ((m, 64, 512, 1024, 4), {"lora": True, "micro_batch": 0, "top_p": 1.0, "prompts": 8, "kv_bytes": 2})]
    assert dense == real(*seen[0][0], **seen[0][1]) + memory.dense_copy_bytes(m, "bf16")
    # sampling through the 4-bit policy under autocast also holds its LM head in bf16 (cast once a rollout)
    assert policy == real(*seen[1][0], **seen[1][1]) + m.vocab * m.hidden * 2
    assert memory.rollout_phase_bytes(m, train.Config(dtype="fp32")) == real(m, 64, 512, 1024, 4, lora=True,
                                                                            top_p=1.0, prompts=8, kv_bytes=4)
