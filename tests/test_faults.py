"""The GPU path's failures, made to happen inside the real calls on the CPU: an overflow in one sampling
round, non-finite logits under greedy decoding, a checkpoint's own sampling knobs, an out-of-memory error
while the prompts' cache is expanded, a cut while the final adapter is written; and the SFT term under
the sampler correction."""
import gc
import json
import os
import signal
import subprocess
import sys
import weakref

import pytest
import safetensors.torch
import torch
from transformers import DynamicCache, GenerationConfig

import cegppo
import eval as eval_script
import train
from engine import data, dense_copy, generation, lab, logprobs, models, progress, runfiles, runlog
from engine.generation import Generator
from engine.sampler import Sampler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(args):
    handler = signal.getsignal(signal.SIGINT)
    try:
        return train.main(args)
    finally:
        signal.signal(signal.SIGINT, handler)


def rows(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


# ----------------------------------------------------------------------------------------------
# 1. An overflow in one sampling round costs that round, not the checkpointing of the updates after it
# ----------------------------------------------------------------------------------------------
def test_an_overflowing_round_leaves_the_updates_in_train_mode(monkeypatch, tmp_path):
    seen, planted = [], []                 # (layer in train mode, checkpointing on) of every forward with grad
    real_policy_model = models.policy_model

    def instrumented(cfg, adapter=None):
        model, tok = real_policy_model(cfg, adapter)

        def nan_once(module, inputs, logits):          # the first decode step's logits: one nan (an fp16 overflow)
            if not torch.is_grad_enabled() and not planted:
                planted.append(True)
                logits = logits.clone()
                logits[0, -1, 0] = float("nan")
                return logits
        model.get_output_embeddings().register_forward_hook(nan_once)
        for layer in model.get_decoder().layers:
            layer.register_forward_pre_hook(
                lambda m, args: seen.append((m.training, m.gradient_checkpointing)) if torch.is_grad_enabled() else None)
        return model, tok
    monkeypatch.setattr(models, "policy_model", instrumented)
    out = str(tmp_path / "run")
    assert run_main(["--preset", "tiny", "--max_steps", "2", "--eval_limit", "0", "--rollout_model", "policy",
                     "--output_dir", out]) == 0
    assert planted and [r["sampling/non_finite_rounds"] for r in rows(out)] == [1, 0]
    # every layer forward of every update, in both steps, in train mode with checkpointing (before: eval mode)
    assert seen and set(seen) == {(True, True)}, f"{sum(not t for t, _ in seen)} of {len(seen)} layer calls in eval mode"


def test_rollout_puts_the_mode_back_however_it_ends(tiny_policy):
    model, tok = tiny_policy
    prompts = [cegppo.format_prompt(tok, "What is 1+2?")]
    hook = model.get_output_embeddings().register_forward_hook(lambda m, i, o: o * float("nan"))
    try:
        for mode in (True, False):
            model.train(mode)
            with pytest.raises(cegppo.NonFiniteLogits):
                cegppo.rollout(model, tok, prompts, 2, 4)
            assert model.training is mode
    finally:
        hook.remove()


# ----------------------------------------------------------------------------------------------
# 2. Greedy evaluation never scores non-finite logits
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def overflowing_folder(tmp_path_factory):
    """The warm tiny model with +inf in the embedding of '*': every question with a product overflows
    (a row's numbers stay its own), every other one is fine."""
    folder = str(tmp_path_factory.mktemp("overflowing"))
    model, tok = models.load_model(lab.warm_start_path("tiny"), four_bit=False)
    with torch.no_grad():
        model.get_input_embeddings().weight[tok.convert_tokens_to_ids("*")] = float("inf")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def product_questions(n):
    return [i for i, (q, _) in enumerate(data.load_rows("tiny", "test")[:n]) if "*" in q]


def test_eval_says_which_questions_overflowed_and_scores_nothing(overflowing_folder, tmp_path):
    bad = product_questions(8)
    assert 0 < len(bad) < 8
    out = tmp_path / "eval"
    p = subprocess.run([sys.executable, "eval.py", "--model", overflowing_folder, "--dataset", "tiny", "--limit", "8",
                        "--max_completion_length", "8", "--output_dir", str(out)], cwd=ROOT, capture_output=True,
                       text=True)
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 2, p.stderr[-2000:]
    assert last.startswith("error: the logits were not finite (fp32 compute) while generating for question")
    assert f"{', '.join(map(str, bad))} (of 8, counted from 0): nothing was scored" in last and "--dtype fp32" in last
    assert not (out / "results.json").exists()
    # sampled, k per question: the rows map back to their questions
    with pytest.raises(cegppo.NonFiniteLogits) as e:
        model, tok = models.load_model(overflowing_folder, four_bit=True)
        eval_script.evaluate(model, tok, data.load_rows("tiny", "test")[:8], 8, batch_size=16, k=2, temperature=1.0)
    assert e.value.rows == bad


def test_trainings_evaluation_of_an_overflowing_policy_is_said_not_scored(overflowing_folder, capsys):
    model, tok = models.load_model(overflowing_folder, four_bit=True, lora_rank=8, trainable=True)
    cfg = train.parse_config(["--preset", "tiny", "--eval_limit", "8"])
    got = train.evaluate_policy(Sampler(model, tok, cfg, "sampler"), tok, data.load_rows("tiny", "test")[:8], cfg, 1)
    assert got == {"eval/non_finite": len(product_questions(8))}
    assert "warning: evaluation: the logits were not finite (fp32 compute)" in capsys.readouterr().out


def test_trainings_evaluation_falls_back_from_an_overflowing_copy(tiny_policy, monkeypatch, capsys):
    model, tok = tiny_policy
    real_copy = dense_copy.dense_copy

    def overflowing_copy(policy, into=None):
        dense = real_copy(policy, into)
        with torch.no_grad():       # a merged weight: the copy's own tensor, not the policy's
            dense.model.layers[0].self_attn.q_proj.weight[0].fill_(float("inf"))
        return dense
    monkeypatch.setattr(dense_copy, "dense_copy", overflowing_copy)
    cfg = train.parse_config(["--preset", "tiny", "--rollout_model", "dense"])
    eval_rows = data.load_rows("tiny", "test")[:4]
    got = train.evaluate_policy(Sampler(model, tok, cfg, "sampler"), tok, eval_rows, cfg, 1)
    assert "warning: evaluation: the dense copy hit non-finite logits: generating through the 4-bit policy" \
        in capsys.readouterr().out
    assert set(got) == {"eval/accuracy", "eval/mean_length"}
    monkeypatch.setattr(dense_copy, "dense_copy", real_copy)
    cfg = train.parse_config(["--preset", "tiny", "--rollout_model", "policy"])
    assert train.evaluate_policy(Sampler(model, tok, cfg, "sampler"), tok, eval_rows, cfg, 1) == got   # the policy's own


# ----------------------------------------------------------------------------------------------
# 3. The SFT term sees the tokens the policy loss sees
# ----------------------------------------------------------------------------------------------
def test_the_sft_term_drops_what_the_sampler_correction_masks(tiny_policy):
    model, tok = tiny_policy
    cfg = train.parse_config(["--preset", "tiny", "--sft_coef", "1", "--num_generations", "2",
                              "--steps_per_generation", "1"])
    torch.manual_seed(0)
    ro = cegppo.rollout(model, tok, [cegppo.format_prompt(tok, q) for q, _ in data.load_rows("tiny")[:2]], 2, 12)
    mask = ro.completion_mask
    old_logp, adv = ro.sample_logp, torch.tensor([1.0, -1.0, 1.0, -1.0])
    positive = torch.tensor([True, False, True, False])
    weights = mask.float()
    weights[2] = 0.0                               # the sequence_mask correction drops response 2, a positive one
    micro_batches = logprobs.update_partition(ro, cfg)[0]

    def sft(positive, weights):
        groups = train.Groups(ro, [("p", "a")] * 2, positive.float(), adv)                 # positive: reward 1
        old = train.OldLogProbs(old_logp, torch.zeros_like(old_logp), weights, {})
        _, sft_sum = train.accumulate_gradients(logprobs.Scorer(cfg.temperature, cfg.shared_prefix), model,
                                                models.Optimizer(model, cfg), groups, old,
                                                train.loss_knobs(cfg, train.State()), micro_batches, cfg,
                                                runlog.Updates())
        model.zero_grad(set_to_none=True)
        return sft_sum
    # masked: -sum(log pi over response 0) / (tokens of responses 0 and 2); not positive: the same sum over
    # the tokens of response 0 alone. So sft_masked * n(0, 2) = sft_not_positive * n(0)
    n0, n2 = int(mask[0].sum()), int(mask[2].sum())
    masked = sft(positive, weights)
    not_positive = sft(torch.tensor([True, False, False, False]), weights)
    assert masked * (n0 + n2) == pytest.approx(not_positive * n0, rel=1e-5)
    assert masked != pytest.approx(sft(positive, mask.float()), rel=1e-3)        # the weights did act


# ----------------------------------------------------------------------------------------------
# 4. The sampler draws from the distribution the loss assumes, whatever the checkpoint's generation config
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def opinionated_folder(tmp_path_factory):
    """The warm tiny model with a generation_config.json that sets several sampling knobs: digits suppressed,
    no repeated token, min_p 0.5, top_k 3 (a fine-tuned checkpoint from the Hub might set any of them)."""
    folder = str(tmp_path_factory.mktemp("opinionated"))
    model, tok = models.load_model(lab.warm_start_path("tiny"), four_bit=False)
    model.generation_config = GenerationConfig(
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, do_sample=True, top_k=3, min_p=0.5, no_repeat_ngram_size=1,
        suppress_tokens=tok.convert_tokens_to_ids(list("0123456789")), typical_p=0.5, epsilon_cutoff=0.01)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_sampling_ignores_the_checkpoints_own_knobs(opinionated_folder, tmp_path):
    model, tok = models.load_model(opinionated_folder, four_bit=True, lora_rank=8, trainable=True)
    assert model.generation_config.top_k == 3 and model.generation_config.suppress_tokens
    prompts = [cegppo.format_prompt(tok, q) for q, _ in data.load_rows("tiny")[:4]]
    torch.manual_seed(0)
    ro = cegppo.rollout(model, tok, prompts, 4, 12)
    assert any(c.isdigit() for t in ro.texts for c in t)                 # digits were not suppressed
    # the recorded numbers are the policy's plain temperature softmax (token_logprobs), however it sampled
    logp, _ = cegppo.completion_logprobs(model, ro.input_ids, ro.attention_mask, ro.prompt_len)
    mask = ro.completion_mask.bool()
    assert (logp - ro.sample_logp)[mask].abs().max() < 1e-4
    # greedy too: the plain argmax (the digit a suppressing config would forbid)
    greedy = cegppo.rollout(model, tok, prompts[:1], 1, 12, temperature=0.0)
    assert any(c.isdigit() for c in greedy.texts[0])
    assert model.generation_config.top_k == 3            # the checkpoint's config is back after the calls
    out = str(tmp_path / "run")                          # and a training run on it (before: a crash at step 1)
    assert run_main(["--preset", "tiny", "--model", opinionated_folder, "--max_steps", "1", "--eval_limit", "4",
                     "--output_dir", out]) == 0


# ----------------------------------------------------------------------------------------------
# 5. An out-of-memory error while the prompts' cache is expanded holds nothing through the retry
# ----------------------------------------------------------------------------------------------
def test_out_of_memory_while_expanding_the_prompt_cache_frees_it(tiny_policy, monkeypatch):
    model, tok = tiny_policy
    prompts = [cegppo.format_prompt(tok, q) for q, _ in data.load_rows("tiny")[:2]]
    real_cache, real_update, refs, alive, failed = generation.prompt_cache, DynamicCache.update, [], [], []

    def recorded_cache(*a):
        kv = real_cache(*a)
        refs.extend(weakref.ref(t) for pair in kv for t in pair)
        return kv

    def update(self, k, v, layer, *a, **kw):         # the expansion's second layer does not fit, once
        if layer == 1 and k.shape[0] == 8 and not failed:
            failed.append(True)
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_update(self, k, v, layer, *a, **kw)

    def empty_cache():
        gc.collect()
        alive.append(sum(r() is not None for r in refs))
    monkeypatch.setattr(generation, "prompt_cache", recorded_cache)
    monkeypatch.setattr(DynamicCache, "update", update)
    monkeypatch.setattr(torch.cuda, "empty_cache", empty_cache)
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="retrying with generation batch 4"):
        ro = cegppo.rollout(model, tok, prompts, 4, 8, generate=Generator(batch_size=8))
    assert failed and len(ro.texts) == 8
    assert alive[0] == 0, f"{alive[0]} of the prompt cache's tensors alive when the memory is given back"


# ----------------------------------------------------------------------------------------------
# 6. The final adapter is written atomically
# ----------------------------------------------------------------------------------------------
def test_a_cut_while_the_final_adapter_is_written_leaves_every_file_whole(tiny_policy, tmp_path, monkeypatch):
    model, tok = tiny_policy
    old_dir, new_dir, out = tmp_path / "old", tmp_path / "new", tmp_path / "run"
    for d in (old_dir, new_dir, out):
        d.mkdir()
    runfiles.save_final(str(old_dir), model, tok)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01)
    runfiles.save_final(str(new_dir), model, tok)
    files = sorted(os.listdir(old_dir))
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json"} <= set(files)
    old = {f: (old_dir / f).read_bytes() for f in files}
    new = {f: (new_dir / f).read_bytes() for f in files}
    assert old["adapter_model.safetensors"] != new["adapter_model.safetensors"]

    def start_from_the_old_adapter():
        for f in files:
            (out / f).write_bytes(old[f])
    # a cut part way through writing the weights: the run folder keeps its files, whole
    start_from_the_old_adapter()
    real_save = safetensors.torch.save_file

    def cut_save(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata)
        with open(filename, "r+b") as f:
            f.truncate(os.path.getsize(filename) // 2)
        raise KeyboardInterrupt("power cut")
    with monkeypatch.context() as m:
        m.setattr("peft.peft_model.safe_save_file", cut_save)
        with pytest.raises(KeyboardInterrupt):
            runfiles.save_final(str(out), model, tok)
    assert {f: (out / f).read_bytes() for f in files} == old
    # a cut before any of the renames: each file whole, old or new, and a new config only beside new weights
    real_replace = os.replace
    for cut_after in range(len(files)):
        start_from_the_old_adapter()
        done = []

        def replace(src, dst, done=done, cut_after=cut_after):
            if len(done) == cut_after:
                raise KeyboardInterrupt("power cut")
            done.append(dst)
            real_replace(src, dst)
        with monkeypatch.context() as m:
            m.setattr(os, "replace", replace)
            with pytest.raises(KeyboardInterrupt):
                runfiles.save_final(str(out), model, tok)
        got = {f: (out / f).read_bytes() for f in files}
        assert all(got[f] in (old[f], new[f]) for f in files), cut_after
        assert "adapter_config.json" not in {os.path.basename(d) for d in done}    # eval.py's first look: last
    # uncut: the new adapter, the config renamed after the weights, and no temp folder left
    order = []
    with monkeypatch.context() as m:
        m.setattr(os, "replace", lambda src, dst: order.append(os.path.basename(dst)) or real_replace(src, dst))
        runfiles.save_final(str(out), model, tok)
    assert order[-1] == "adapter_config.json" and order.index("adapter_model.safetensors") < len(order) - 1
    assert {f: (out / f).read_bytes() for f in files} == new and sorted(os.listdir(out)) == files


# ----------------------------------------------------------------------------------------------
# The second read of the GPU path
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["greedy", "not shared"])
def test_under_autocast_every_generate_keeps_its_cache_in_the_compute_dtype(tiny_policy, monkeypatch, how):
    # greedy evaluation (one completion per prompt) and --shared_prefix false have no shared prefill, and had a
    # default cache: float32 keys and values through the 4-bit policy, cast down again at every decoded token
    model, tok = tiny_policy
    prompts = [cegppo.format_prompt(tok, q) for q, _ in data.load_rows("tiny")[:2]]
    stored, real = [], generation.CastKVCache.update

    def recording(self, k, v, layer, *a, **kw):
        out = real(self, k, v, layer, *a, **kw)
        stored.append((out[0].dtype, out[1].dtype))
        return out
    monkeypatch.setattr(generation.CastKVCache, "update", recording)
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if how == "greedy":
            cegppo.rollout(model, tok, prompts, 1, 6, temperature=0.0, generate=Generator())
        else:
            cegppo.rollout(model, tok, prompts, 2, 6, generate=Generator(share_prompts=False))
    assert stored and set(stored) == {(torch.bfloat16, torch.bfloat16)}


def test_evaluation_keeps_the_generation_batch_that_fit(tiny_policy):
    model, tok = tiny_policy
    real, sizes = model.generate, []

    def small_gpu_generate(**kw):           # a device on which more than 4 sequences do not fit
        sizes.append(kw["input_ids"].shape[0])
        if kw["input_ids"].shape[0] > 4:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(**kw)
    model.generate = small_gpu_generate
    try:
        with pytest.warns(UserWarning, match="retrying with generation batch 4"):
            res = eval_script.evaluate(model, tok, data.load_rows("tiny", "test")[:16], 6, batch_size=8)
    finally:
        del model.generate
    # two chunks of 8 questions: the first halves once, the second starts at what fit (before: 8 again)
    assert sizes == [8, 4, 4, 4, 4] and res["n_questions"] == 16


def test_the_progress_bar_forgets_an_attempt_that_ran_out_of_memory(tiny_policy):
    model, tok = tiny_policy
    prompts = [cegppo.format_prompt(tok, q) for q, _ in data.load_rows("tiny")[:4]]
    real, failed = model.generate, []

    def late_oom(**kw):                     # the cache outgrows the card on the third decoded token, once
        class Boom(torch.nn.Module):
            steps = 0

            def forward(self, input_ids, scores):
                Boom.steps += 1
                if Boom.steps == 3 and not failed:
                    failed.append(True)
                    raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
                return scores
        kw["logits_processor"].append(Boom())
        return real(**kw)
    model.generate = late_oom
    ticker = progress.GenerationProgress("rollout", 8, cegppo.eos_ids(tok, model), "off")
    try:
        torch.manual_seed(0)
        with pytest.warns(UserWarning, match="retrying with generation batch 4"):
            ro = cegppo.rollout(model, tok, prompts, 2, 10, generate=Generator(batch_size=8, processors=[ticker]))
    finally:
        del model.generate
    assert failed
    # every token of every completion counted once, the failed attempt's not at all (before: 8 more per step)
    assert ticker.tokens == int(ro.completion_mask.sum())
    assert ticker.bar.n <= int((~ro.truncated).sum())


def test_an_fp16_run_resumes_in_float32(tmp_path):
    # what the overflow's stop line tells the user to do (--resume with another --dtype) is allowed
    out = str(tmp_path / "run")
    args = ["--preset", "tiny", "--eval_limit", "0", "--output_dir", out]
    assert run_main([*args, "--dtype", "fp16", "--max_steps", "2"]) == 0
    assert run_main([*args, "--dtype", "fp32", "--max_steps", "3", "--resume"]) == 0
    got = rows(out)
    assert [r["step"] for r in got] == [1, 2, 3] and "loss_scale" in got[1] and "loss_scale" not in got[2]
