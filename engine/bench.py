"""Benchmark train.py's RL step, and optionally TRL's GRPOTrainer on identical settings.

    python -m engine.bench --model tiny --dataset tiny                  # CPU, seconds
    python -m engine.bench --model /path/to/Qwen2.5-0.5B-Instruct --dataset gsm8k --steps 3
    python -m engine.bench --model tiny --dataset tiny --vs-trl         # needs `pip install trl`
    python -m engine.bench --logprob-memory   # the log-prob pass's memory at Qwen2.5's vocabulary

Every flag of train.py applies (it is train.py's own loop that runs; dynamic sampling is off,
--max_generation_rounds 1, as TRL has none, unless given). One warm-up step is run
and not counted, then --steps steps are timed; times are medians over those steps. Each side runs
in its own process, one after the other (--repeats R alternates them R times and keeps each
side's median run), so that peak memory (CUDA peak allocated on a GPU, the process's peak RSS on
CPU) is each one's own. Writes bench.json in --output_dir and prints a table.

--synthetic-0.5b: a random-init model with Qwen2.5-0.5B's shapes, built locally, for machines
that cannot download the real one; its reward is a coin flip (see coin_reward).
--gsm8k-length-prompts: the prompts of GSM8K's length in the chat template (about 140 tokens, a
word problem written in code: gsm8k_length_rows), not the lab's 35, in a local file both sides read.
--logprob-memory: the log-prob pass's peak memory against naive float32 logits, nothing else.
--profile: torch.profiler's table of the ops our side spends its time in (ours/profile.txt).
--both-rollouts: our side twice, sampling from the dense copy (--rollout_model dense) and from the
4-bit + LoRA policy (--rollout_model policy); the second's numbers come back prefixed `policy_`.
--plain-too: our side once more with every row its own prompt (--shared_prefix false), alternating
with the others; its numbers come back prefixed `plain_`, with the ratios shared / plain.
--rollout-copy-cost: what building the dense rollout copy costs (fresh, and refreshed in place), its
bytes, and its logits' distance from the 4-bit + LoRA policy's; nothing else.
--mismatch bf16,fp16,fp32: per compute dtype, how far the sampler's own log-probs are from pi_old
recomputed by the policy's training forward (the dense copy with LoRA merged and kept apart, and the
policy itself), how many tokens would lie outside the clip range at the first update if the
sampler's numbers were pi_old (an upper bound), the sampler correction's weights and each sampler's
tokens/s; under fp16 also pi_old with the log-prob head in fp16 against float32, and both passes'
times. On a CPU the half precisions run under CPU autocast. --adapter: a trained LoRA (a train.py
output folder) instead of a fresh one.

TRL gets the same model object (4-bit + LoRA built by models.load_model), the same chat-formatted
prompts and reward, the same P prompts x G generations, completion length, temperature, top_p,
micro-batch size and optimizer updates per rollout (TRL's steps_per_generation counts
micro-batches; we set it, and the gradient accumulation, so that both take the same number of
optimizer updates of the same size per generation), no KL (beta 0), the same eps.
"""

import argparse
import hashlib
import json
import os
import runpy
import statistics
import subprocess
import sys
import shutil
import tempfile
import threading
import time

from engine import models  # noqa: I001  first: it quiets bitsandbytes' import-time kernel lookup (engine/models.py)
import torch
from torch.profiler import ProfilerActivity, profile
from transformers import TrainerCallback

import cegppo
from engine import cli, data, dense_copy, errors, lab, logprobs, runlog
from engine.errors import UserError
from engine.generation import Generator
from engine.memory import with_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))     # the project


def coin_reward(completion, answer):
    """A fair coin per completion, seeded by its text: the reward of `--synthetic-0.5b`, whose random
    weights never write a right answer (math_reward would be 0 everywhere, every group would have
    zero variance and our loop would skip every update, which is no benchmark)."""
    return float(int(hashlib.md5(completion.encode()).hexdigest(), 16) % 2)


GSM8K_LIKE = ("{a} friends share a garden. Each day {b} of them water {c} rows, and the others pick {d} "
              "baskets. How many baskets in {e} days?")


def gsm8k_length_rows(path, n=64):
    """A .jsonl of n word problems whose chat-formatted prompts are as long as GSM8K's in Qwen's
    template (100-150 tokens): 138 with the lab's character-level tokenizer that --synthetic-0.5b
    uses. The answers are right, but the synthetic model's reward is a coin flip anyway."""
    with open(path, "w") as f:
        for i in range(n):
            a, b, c, d, e = 5 + i % 7, 2 + i % 3, 3 + i % 5, 4 + i % 6, 2 + i % 4
            f.write(json.dumps({"question": GSM8K_LIKE.format(a=a, b=b, c=c, d=d, e=e), "answer": str(d * e)}) + "\n")
    return path


def synthetic_model(size="qwen2.5-0.5b"):
    """Folder of a random-init model with Qwen2.5-0.5B's shapes (494M parameters, vocabulary 151,936,
    tied head; or another of lab.SIZES, e.g. qwen2.5-1.5b) in bf16 as the real checkpoint is, built
    once and cached beside the lab's models. On a GPU the weights are drawn there (seconds, not a
    minute of CPU time for 1.5B)."""
    folder = os.path.join(lab.cache_dir(), f"{size}-shaped-random")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        for device in (["cuda"] if torch.cuda.is_available() else []) + ["cpu"]:
            built = None
            try:
                with torch.random.fork_rng(), torch.device(device):
                    built = lab.build_model(size)
            except torch.OutOfMemoryError:          # a small card: draw them on the CPU instead (below, past
                pass                                # the except, where the half-built model is freed)
            if built is not None:
                break
            torch.cuda.empty_cache()
        lab.save_atomic(built[0].to(torch.bfloat16), built[1], folder)
        del built
        if torch.cuda.is_available():
            torch.cuda.empty_cache()                # the child processes measure a card with nothing of ours on it
    return folder


def in_own_process(worker, spec_path):
    """bench.<worker>(spec_path) in a fresh Python: each side's peak memory is then its own."""
    return subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {ROOT!r}); from engine import bench; "
                           f"bench.{worker}({spec_path!r})"], capture_output=True, text=True)


class _LastLine:
    """A stream that writes through to `stream` and keeps the last non-empty line written to it."""

    def __init__(self, stream):
        self.stream, self.last = stream, ""

    def write(self, text):
        lines = [line.strip() for line in text.replace("\r", "\n").splitlines() if line.strip()]
        self.last = lines[-1] if lines else self.last
        return self.stream.write(text)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def run_train(args):
    """`python train.py ARGS` in this process (runpy runs the script as Python would: train.py is a program,
    not a library), so that a worker can change what it runs in first (the coin reward, a memory cap, a
    profiler around it). Returns (its exit code, the last line it wrote to stderr: its error line)."""
    argv, stderr = sys.argv, sys.stderr
    sys.argv, sys.stderr = [os.path.join(ROOT, "train.py"), *args], _LastLine(sys.stderr)
    try:
        runpy.run_path(os.path.join(ROOT, "train.py"), run_name="__main__")
        rc = 0
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv, sys.stderr, last = argv, stderr, sys.stderr.last
    return rc, last


def ours_worker(spec_path):
    """Runs in its own process: train.py on the spec's flags (with the coin reward if asked)."""
    spec = json.load(open(spec_path))
    if spec["coin"]:
        cegppo.math_reward = coin_reward
    if not spec["profile"]:
        sys.exit(run_train(spec["train_args"])[0])
    models.resolve_model(cli.resolved_config(spec["train_args"]).model)   # a lab warm start is not profiled
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        rc, _ = run_train(spec["train_args"])
    sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    with open(os.path.join(os.path.dirname(spec_path), "profile.txt"), "w") as f:
        f.write(prof.key_averages().table(sort_by=sort, row_limit=40))
    sys.exit(rc)


def run_ours(train_args, steps, out, coin=False, profile=False):
    """train.py for 1 + steps steps with evaluation and checkpoints out of the way."""
    os.makedirs(out, exist_ok=True)
    spec = os.path.join(out, "spec.json")
    args = [*train_args, "--max_steps", str(steps + 1), "--output_dir", out, "--eval_limit", "0",
            "--save_steps", "100000", "--logging_steps", "100000"]
    json.dump({"coin": coin, "profile": profile, "train_args": args}, open(spec, "w"))
    p = in_own_process("ours_worker", spec)
    if p.returncode != 0:
        sys.exit(p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"train.py exited {p.returncode}")
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))][1:]    # drop the warm-up
    # medians: a shared machine's hiccups, and math-verify's first parse of a new kind of answer
    # (it imports and builds its parsers lazily), would otherwise land in one step's mean
    median = lambda k: statistics.median(r.get(k, 0.0) for r in rows)
    # train.py times generate() as time/rollout_s and building the dense copy apart: the rollout is both
    for r in rows:
        r["rollout_with_copy_s"] = r["time/rollout_s"] + r.get("time/rollout_copy_s", 0.0)
    mismatch = [r for r in rows if "sampling/sampling_logp_difference/mean" in r]
    return {
        "step_s": median("time/step_s"),
        "rollout_s": median("rollout_with_copy_s"),
        "reward_s": median("time/reward_s"),
        "old_logprob_s": median("time/old_logprob_s"),
        "update_s": median("time/update_s"),
        "rollout_copy_s": median("time/rollout_copy_s"),          # building the dense copy (inside rollout_s)
        "rollout_tokens_per_s": sum(r["num_tokens"] for r in rows) / sum(r["rollout_with_copy_s"] for r in rows),
        "generate_tokens_per_s": sum(r["num_tokens"] for r in rows) / sum(r["time/rollout_s"] for r in rows),
        **({"sampling_logp_difference_mean": statistics.mean(r["sampling/sampling_logp_difference/mean"]
                                                             for r in mismatch),
            "sampling_logp_difference_max": max(r["sampling/sampling_logp_difference/max"] for r in mismatch)}
           if mismatch else {}),
        "update_tokens_per_s": sum(r["update_tokens"] for r in rows) / max(1e-9, sum(r["time/update_s"] for r in rows)),
        "updates_per_step": statistics.mean(r["updates"] for r in rows),
        "frac_reward_zero_std": statistics.mean(r["frac_reward_zero_std"] for r in rows),
        # None where the OS reports no peak (runlog.peak_mem_gb: Windows); on a GPU also the peak reserved
        "peak_mem_gb": max((r["peak_mem_gb"] for r in rows if r.get("peak_mem_gb") is not None), default=None),
        **({"peak_mem_reserved_gb": max(r["peak_mem_reserved_gb"] for r in rows)}
           if all(r.get("peak_mem_reserved_gb") is not None for r in rows) else {}),
    }


def trl_worker(spec_path):
    """Runs in its own process: TRL's GRPOTrainer on the settings in spec_path; writes its timings."""
    # optional: TRL is not a requirement of the tutorial path, only of --vs-trl
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer
    spec = json.load(open(spec_path))
    if spec["coin"]:
        cegppo.math_reward = coin_reward
    cfg = cli.resolved_config(spec["train_args"])
    torch.manual_seed(cfg.seed)
    model, tok = models.policy_model(cfg)
    rows = data.load_rows(cfg.dataset, "train", cfg.question_field, cfg.answer_field)
    dataset = Dataset.from_list([{"prompt": cegppo.format_prompt(tok, q), "answer": a} for q, a in rows])

    def reward(completions, answer, **kw):
        return [cegppo.math_reward(c, a) for c, a in zip(completions, answer)]

    n = cfg.prompts_per_step * cfg.num_generations                    # completions per generation
    per_update = n // cfg.steps_per_generation
    if n % cfg.steps_per_generation or per_update % cfg.micro_batch_size:
        sys.exit("--vs-trl needs prompts_per_step * num_generations / steps_per_generation to be a multiple "
                 "of --micro_batch_size")
    accum = per_update // cfg.micro_batch_size
    steps = spec["steps"]
    # the precision train.py computes in (models.compute_dtype's rule); mixed precision is for GPUs only
    gpu_dtype = models.compute_dtype(cfg.dtype) if torch.cuda.is_available() else None
    per_rollout = cfg.steps_per_generation * cfg.num_iterations     # TRL optimizer steps per RL step
    args = GRPOConfig(
        output_dir=spec["out"], max_steps=per_rollout * (steps + 1), learning_rate=cfg.learning_rate,
        per_device_train_batch_size=cfg.micro_batch_size, gradient_accumulation_steps=accum,
        steps_per_generation=n // cfg.micro_batch_size, num_iterations=cfg.num_iterations,
        num_generations=cfg.num_generations, max_completion_length=cfg.max_completion_length,
        temperature=cfg.temperature, top_p=cfg.top_p, top_k=0, repetition_penalty=1.0, beta=0.0,
        # our CISPO is TRL's cispo, whose epsilon_high is the cap itself (ours: 1 + epsilon_high)
        **(dict(epsilon=0.2, epsilon_high=1 + cfg.epsilon_high, loss_type="cispo") if cfg.algo == "cispo" else
           dict(epsilon=cfg.epsilon_low, epsilon_high=cfg.epsilon_high, loss_type="dapo")),
        max_grad_norm=cfg.max_grad_norm,
        weight_decay=cfg.weight_decay, warmup_steps=0, lr_scheduler_type="constant", seed=cfg.seed,
        gradient_checkpointing=cfg.gradient_checkpointing, use_cpu=not torch.cuda.is_available(),
        bf16=gpu_dtype == torch.bfloat16, fp16=gpu_dtype == torch.float16, report_to="none",
        logging_steps=10 ** 6, save_strategy="no", disable_tqdm=True)
    marks, peak = [], []

    class Clock(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            marks.append(time.time())
            if len(marks) == per_rollout:
                runlog.reset_peak_mem()          # the warm-up step is not counted, as on our side
            peak.append((runlog.peak_mem_gb(), runlog.peak_mem_reserved_gb()))   # at the end of the last step

    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=dataset, processing_class=tok,
                          callbacks=[Clock()])
    trainer.train()
    ends = marks[per_rollout - 1::per_rollout]                     # the end of each RL step
    json.dump({"trl_step_s": statistics.median(b - a for a, b in zip(ends, ends[1:])),
               "trl_peak_mem_gb": peak[-1][0], "trl_peak_mem_reserved_gb": peak[-1][1]},
              open(os.path.join(spec["out"], "trl.json"), "w"))


def run_trl(train_args, steps, out, coin=False):
    os.makedirs(out, exist_ok=True)
    spec = os.path.join(out, "spec.json")
    json.dump({"train_args": train_args, "steps": steps, "out": out, "coin": coin}, open(spec, "w"))
    p = in_own_process("trl_worker", spec)
    if p.returncode != 0:
        sys.exit(f"TRL run failed:\n{p.stderr[-3000:]}")
    return json.load(open(os.path.join(out, "trl.json")))


# The log-prob and entropy pass at Qwen2.5's sizes (vocabulary 151,936; hidden 896 as in 0.5B).
LOGPROB_VOCAB, LOGPROB_HIDDEN, LOGPROB_TOKENS = 151936, 896, (256, 1024, 4096)


def logprob_pass_extra_gb(n, way, vocab=LOGPROB_VOCAB, hidden=LOGPROB_HIDDEN):
    """Peak extra tensor memory (GB) of log-probs + entropy + backward over n positions, 'ours'
    (logprobs._TokenLogProb, chunked) or 'naive' (full float32 logits, then log_softmax). Exact
    allocator numbers: CUDA's peak allocated, or on CPU the profiler's running total of allocations."""
    cuda = torch.cuda.is_available()
    dev, dtype = ("cuda", models.compute_dtype()) if cuda else ("cpu", torch.float32)
    torch.manual_seed(0)
    h = torch.randn(n, hidden, device=dev, dtype=dtype, requires_grad=True)               # [N, d]
    w = torch.empty(vocab, hidden, device=dev, dtype=dtype).normal_(0, 0.02)              # [V, d] frozen head
    targets = torch.randint(0, vocab, (n,), device=dev)                                    # [N]

    def run():
        if way == "ours":
            lp, _ = logprobs._TokenLogProb.apply(h, w, None, targets, 1.0, logprobs.chunk_size(n), True)
        else:
            logp_all = torch.log_softmax((h @ w.T).float(), -1)                             # [N, V]
            lp = logp_all.gather(-1, targets[:, None])[:, 0]
            with torch.no_grad():
                -(logp_all.exp() * logp_all).sum(-1)
        lp.sum().backward()

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        return (torch.cuda.max_memory_allocated() - base) / 1e9
    run()                   # once outside the profiler: lazy one-time allocations are not the pass's
    h.grad = None
    with tempfile.TemporaryDirectory() as tmp:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            run()
        prof.export_chrome_trace(os.path.join(tmp, "trace.json"))
        events = json.load(open(os.path.join(tmp, "trace.json")))["traceEvents"]
    # this thread's allocations and frees in order (another thread of the process, a test runner's or
    # a library's, allocates into the profiler's shared running total); the running sum's maximum is
    # the peak extra memory
    tid, total, peak = threading.get_native_id(), 0, 0
    for e in sorted((e for e in events if e.get("name") == "[memory]" and e.get("tid") == tid), key=lambda e: e["ts"]):
        total += e["args"]["Bytes"]
        peak = max(peak, total)
    return peak / 1e9


def logprob_memory(out_dir, positions=LOGPROB_TOKENS):
    """Our log-prob pass against naive float32 logits, at Qwen2.5's vocabulary, for growing batches."""
    rows = []
    for n in positions:
        row = {"positions": n, "logits_fp32_gb": n * LOGPROB_VOCAB * 4 / 1e9,
               "naive_extra_gb": logprob_pass_extra_gb(n, "naive"), "ours_extra_gb": logprob_pass_extra_gb(n, "ours")}
        row["ours_over_logits"] = row["ours_extra_gb"] / row["logits_fp32_gb"]
        rows.append(row)
        print(f"  {n:6d} positions: float32 logits {row['logits_fp32_gb']:6.3f} GB | naive pass "
              f"{row['naive_extra_gb']:6.3f} GB | ours {row['ours_extra_gb']:6.3f} GB "
              f"({row['ours_over_logits']:.3f} of the logits)")
    with open(os.path.join(out_dir, "logprob_memory.json"), "w") as f:
        json.dump({"vocab": LOGPROB_VOCAB, "hidden": LOGPROB_HIDDEN, "rows": rows}, f, indent=2)
    print(f"wrote {out_dir}/logprob_memory.json")


def current_rss_gb():
    """The process's resident memory now, from /proc (Linux); None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            return int(next(line.split()[1] for line in f if line.startswith("VmRSS:"))) / 1e6    # kB
    except (OSError, StopIteration):
        return None


def rollout_copy_cost(cfg, out_dir, repeats=3):
    """Build the dense rollout copy of cfg's 4-bit + LoRA policy (LoRA B set to small random values, as
    after training): time to build it fresh and to refresh it in place (medians of `repeats`), the
    bytes it adds, RSS before and after, and the max |logit difference| from the policy on a prompt."""
    models.set_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model, tok = models.policy_model(cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 1e-3)
    rss = current_rss_gb
    rss0, fresh, refresh = rss(), [], []
    for _ in range(repeats):
        times = {}
        dense = runlog.timed(times, "fresh", dense_copy.dense_copy, model)     # (synced on a GPU)
        fresh.append(times["fresh"])
        rss1 = rss()
        del dense
    dense = dense_copy.dense_copy(model)
    for _ in range(repeats):
        times = {}
        runlog.timed(times, "refresh", lambda: dense_copy.dense_copy(model, into=dense))
        refresh.append(times["refresh"])
    ids = tok([cegppo.format_prompt(tok, "What is 7 * 8?")], return_tensors="pt")["input_ids"]
    ids = ids.to(next(model.parameters()).device)
    model.eval()
    with torch.no_grad():
        a, b = model(input_ids=ids).logits.float(), dense(input_ids=ids).logits.float()
    row = {"build_fresh_s": statistics.median(fresh), "refresh_in_place_s": statistics.median(refresh),
           "copy_bytes_gb": dense_copy.copy_bytes(model) / 1e9, "rss_before_gb": rss0, "rss_with_copy_gb": rss1,
           "max_abs_logit_diff": (a - b).abs().max().item(), "max_abs_logit": a.abs().max().item(),
           "dtype": str(models.model_compute_dtype(model))}
    for k, v in row.items():
        print(f"  {k:<22} {v:10.4g}" if isinstance(v, float) else f"  {k:<22} {v}")
    with open(os.path.join(out_dir, "rollout_copy_cost.json"), "w") as f:
        json.dump(row, f, indent=2)
    print(f"wrote {out_dir}/rollout_copy_cost.json")


def old_logprobs(model, ro, cfg):
    """pi_old of a rollout as train.py's step 4 scores it through the policy: in its updates' micro-batches."""
    return logprobs.Scorer(cfg.temperature, cfg.shared_prefix).no_grad(model, ro, logprobs.update_partition(ro, cfg),
                                                                    with_entropy=False)[0]


def head_rounding(model, ro, cfg):
    """Under fp16 autocast: pi_old of the rollout `ro` with the LM head multiplying in fp16 (the default,
    logprobs.head_operands) against float32, and each pass's time (on a T4 the float32 head has no tensor
    cores; on a CPU the times say nothing of a GPU's). A row of --mismatch's table."""
    real, got, seconds = logprobs.head_operands, {}, {}
    for name, dtype in (("fp16", torch.float16), ("fp32", torch.float32)):
        logprobs.head_operands = lambda head, device, dtype=dtype: (head.weight.to(dtype),
                                                                    None if head.bias is None else head.bias.to(dtype))
        try:
            got[name] = runlog.timed(seconds, name, old_logprobs, model, ro, cfg)
        finally:
            logprobs.head_operands = real
    mask = ro.completion_mask.cpu().bool()
    d = (got["fp16"] - got["fp32"]).abs()[mask]
    return {"dtype": "fp16", "sampler": "log-prob head fp16 vs float32", "tokens": int(mask.sum()),
            "logp_diff_mean": d.mean().item(), "logp_diff_max": d.max().item(),
            "pass_s_head_fp16": seconds["fp16"], "pass_s_head_fp32": seconds["fp32"]}


def sampler_mismatch(cfg, adapter, dtypes, out_dir):
    """python -m engine.bench --mismatch: one row per compute dtype and sampler (see the module docstring)."""
    import contextlib
    models.set_threads(cfg.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows, real_autocast = [], models.autocast
    for dtype in dtypes:
        c = with_flags(cfg, dtype=dtype)
        torch.manual_seed(cfg.seed)
        model, tok = models.policy_model(c, adapter)
        if adapter is None:                          # LoRA B small and random, as after some training
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if "lora_B" in n:
                        p.normal_(0, 1e-3)
        prompts = [p for p, _ in data.usable_prompts(c, tok, data.load_data(c)[0])[:cfg.prompts_per_step]]
        half = models.DTYPES[dtype] if dtype != "fp32" else None
        # the autocast train.py's passes enter: CUDA's own, or on a CPU its autocast in the same dtype
        models.autocast = (lambda d, t, half=half: torch.autocast("cpu", dtype=half)) if device == "cpu" and half \
            else real_autocast
        try:
            samplers = [("copy, LoRA merged", True), *([("copy, LoRA kept apart", False)] if half else []),
                        ("4-bit policy", None)]
            for name, merge in samplers:
                sampler = model if merge is None else dense_copy.dense_copy(model, merge=merge)
                torch.manual_seed(cfg.seed + 1)
                seconds = {}
                with models.model_autocast(model) if device == "cuda" else (
                        torch.autocast("cpu", dtype=half) if half else contextlib.nullcontext()):
                    ro = runlog.timed(seconds, "rollout", cegppo.rollout, sampler, tok, prompts, c.num_generations,
                                      c.max_completion_length, c.temperature, c.top_p,
                                      Generator(c.generation_batch_size, share_prompts=c.shared_prefix))
                old = old_logprobs(model, ro, c)
                mask = ro.completion_mask.cpu()
                sample = ro.sample_logp.float().cpu()[:, :old.shape[1]]
                d = (sample - old).abs()[mask.bool()]
                eps = max(c.epsilon_low or 0.2, c.epsilon_high or 0.2)
                _, corr = cegppo.sampler_correction(old, sample, mask, c.sampler_correction, c.sampler_correction_cap)
                # an upper bound of the tokens outside [1 - eps, 1 + eps] had the sampler's numbers been
                # taken as pi_old (|log(1 - eps)| > log(1 + eps)); clipped are those of them whose A has the sign
                rows.append({"dtype": dtype, "sampler": name, "tokens": int(mask.sum()),
                             "tokens_per_s": int(mask.sum()) / seconds["rollout"],
                             "logp_diff_mean": d.mean().item(), "logp_diff_max": d.max().item(),
                             "would_clip_at_first_update": (d > torch.log(torch.tensor(1 + eps))).float().mean().item(),
                             "correction": c.sampler_correction, **{k.split("/")[-1] if "ratio" in k else k: v
                                                                   for k, v in corr.items()}})
                if sampler is not model:
                    dense_copy.release(sampler)
            if dtype == "fp16":         # the log-prob head multiplies in fp16 there (logprobs.head_operands)
                rows.append(head_rounding(model, ro, c))
        finally:
            models.autocast = real_autocast
        del model
    print(f"{'dtype':<6} {'sampler':<22} {'tokens':>6} {'|dlogp| mean':>12} {'max':>8} {'out@1st':>8} "
          f"{'IS mean':>8} {'IS min':>7} {'IS max':>7} {'masked':>7}  sampling")
    for r in rows:
        if "pass_s_head_fp16" in r:
            print(f"{r['dtype']:<6} {r['sampler']:<22} {r['tokens']:>6} {r['logp_diff_mean']:>12.2e} "
                  f"{r['logp_diff_max']:>8.2e}  pi_old pass: {r['pass_s_head_fp16']:.3f} s with the fp16 head, "
                  f"{r['pass_s_head_fp32']:.3f} s with float32")
            continue
        print(f"{r['dtype']:<6} {r['sampler']:<22} {r['tokens']:>6} {r['logp_diff_mean']:>12.2e} {r['logp_diff_max']:>8.2e} "
              f"{r['would_clip_at_first_update']:>8.4f} {r['mean']:>8.4f} {r['min']:>7.3f} {r['max']:>7.3f} "
              f"{r['sampling/correction_masked']:>7.4f}  {r['tokens_per_s']:.0f} tokens/s")
    with open(os.path.join(out_dir, "mismatch.json"), "w") as f:
        json.dump(rows, f, indent=2)
    print(f"wrote {out_dir}/mismatch.json")
    return rows


def parse_args(argv):
    ap = argparse.ArgumentParser(description="Benchmark train.py's RL step (all train.py flags apply).")
    ap.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    ap.add_argument("--vs-trl", action="store_true", help="also run TRL's GRPOTrainer on the same settings")
    ap.add_argument("--repeats", type=int, default=1, help="run each side this many times, alternating; "
                    "report each side's median run")
    ap.add_argument("--output_dir", default="runs/bench", help="bench.json and the runs' files go here")
    ap.add_argument("--logprob-memory", action="store_true",
                    help="instead: peak memory of the log-prob pass at Qwen2.5's vocabulary vs naive logits")
    ap.add_argument("--logprob-positions", type=lambda s: [int(x) for x in s.split(",")],
                    default=list(LOGPROB_TOKENS), help="with --logprob-memory: the numbers of positions N, "
                    "comma-separated (default 256,1024,4096)")
    ap.add_argument("--gsm8k-length-prompts", dest="long_prompts", action="store_true",
                    help="prompts of GSM8K's length in the chat template (a local file of word problems written "
                         "in code), for both sides")
    ap.add_argument("--synthetic-0.5b", dest="synthetic", action="store_true",
                    help="benchmark a random-init model with Qwen2.5-0.5B's shapes on the lab prompts, with a "
                         "coin-flip reward (for machines without the real checkpoint)")
    ap.add_argument("--both-rollouts", action="store_true", help="run our side twice: generating from the dense "
                    "copy and from the 4-bit + LoRA policy (the second's numbers prefixed policy_)")
    ap.add_argument("--plain-too", dest="plain_too", action="store_true", help="also run our side with "
                    "--shared_prefix false (every row its own prompt); its numbers prefixed plain_")
    ap.add_argument("--rollout-copy-cost", action="store_true", help="instead: the dense rollout copy's build "
                    "time (fresh and refreshed in place), size and logits' distance from the policy's")
    ap.add_argument("--mismatch", metavar="DTYPES", type=lambda t: [d.strip() for d in t.split(",") if d.strip()],
                    help="instead: the sampler-vs-policy log-prob difference per compute dtype, e.g. bf16,fp16,fp32")
    ap.add_argument("--adapter", help="with --mismatch: a trained LoRA adapter (a train.py output folder)")
    ap.add_argument("--profile", action="store_true", help="run our side under torch.profiler and write the "
                    "ops that take the time to ours/profile.txt (the timings then include its overhead)")
    args, train_args = ap.parse_known_args(argv)
    if args.steps < 1 or args.repeats < 1:
        raise UserError(f"--steps {args.steps} / --repeats {args.repeats}: both must be at least 1")
    # TRL trains on what one generation round gives: our dynamic sampling off unless asked for
    train_args = ["--max_generation_rounds", "1", *train_args]                         # later flags win
    if args.synthetic:
        train_args = ["--model", synthetic_model(), "--dataset", "lab", *train_args]
    if args.long_prompts:
        os.makedirs(args.output_dir, exist_ok=True)
        rows = gsm8k_length_rows(os.path.join(args.output_dir, "gsm8k_length.jsonl"))
        train_args = [*train_args, "--dataset", rows]
    if args.both_rollouts:
        train_args = [*train_args, "--rollout_model", "dense"]
    return args, train_args


def run_sides(args, train_args):
    """ours, TRL, ours, TRL, ...: a slow minute of a shared machine then hits both sides alike.
    Returns the median run of each side, merged into one dict (the policy side's keys prefixed)."""
    ours, trl, ours_policy, ours_plain = [], [], [], []
    out = lambda name: os.path.join(args.output_dir, name)
    for _ in range(args.repeats):
        shutil.rmtree(out("ours"), ignore_errors=True)
        ours.append(run_ours(train_args, args.steps, out("ours"), args.synthetic, args.profile))
        if args.both_rollouts:
            shutil.rmtree(out("ours_policy"), ignore_errors=True)
            ours_policy.append(run_ours([*train_args, "--rollout_model", "policy"], args.steps, out("ours_policy"),
                                        args.synthetic))
        if args.plain_too:
            shutil.rmtree(out("ours_plain"), ignore_errors=True)
            ours_plain.append(run_ours([*train_args, "--shared_prefix", "false"], args.steps, out("ours_plain"),
                                       args.synthetic))
        if args.vs_trl:
            trl.append(run_trl(train_args, args.steps, out("trl"), args.synthetic))
    middle = lambda runs, k: sorted(runs, key=lambda r: r[k])[len(runs) // 2]        # the median run
    result = {**middle(ours, "step_s"), "step_s_repeats": [r["step_s"] for r in ours]}
    if args.both_rollouts:
        result.update({f"policy_{k}": v for k, v in middle(ours_policy, "step_s").items()},
                      policy_step_s_repeats=[r["step_s"] for r in ours_policy])
        result["rollout_speedup"] = result["generate_tokens_per_s"] / result["policy_generate_tokens_per_s"]
    if args.plain_too:
        result.update({f"plain_{k}": v for k, v in middle(ours_plain, "step_s").items()},
                      plain_step_s_repeats=[r["step_s"] for r in ours_plain])
        for k in ("step_s", "rollout_s", "update_s", "peak_mem_gb"):
            if result.get(k) is not None and result.get(f"plain_{k}"):
                result[f"shared_vs_plain_{k}"] = result[k] / result[f"plain_{k}"]
    if args.vs_trl:
        result.update(middle(trl, "trl_step_s"), trl_step_s_repeats=[r["trl_step_s"] for r in trl])
        for side in ("", "policy_") if args.both_rollouts else ("",):
            result[f"{side}step_ratio"] = result[f"{side}step_s"] / result["trl_step_s"]
            if result[f"{side}peak_mem_gb"] is not None and result["trl_peak_mem_gb"]:   # None: not reported
                result[f"{side}mem_ratio"] = result[f"{side}peak_mem_gb"] / result["trl_peak_mem_gb"]
    return result


def print_table(result, args):
    print(f"device {result['device']}, model {result['model']}, {args.steps} timed steps, {args.repeats} repeat(s)")
    keys = ("step_s", "rollout_s", "rollout_copy_s", "old_logprob_s", "update_s", "reward_s",
            "rollout_tokens_per_s", "generate_tokens_per_s", "update_tokens_per_s", "peak_mem_gb",
            "peak_mem_reserved_gb", "sampling_logp_difference_mean", "sampling_logp_difference_max")
    for k in (*keys, *(f"policy_{k}" for k in keys), *(f"plain_{k}" for k in keys),
              *(f"shared_vs_plain_{k}" for k in ("step_s", "rollout_s", "update_s", "peak_mem_gb")),
              "rollout_speedup", "trl_step_s", "trl_peak_mem_gb",
              "trl_peak_mem_reserved_gb", "step_ratio", "mem_ratio", "policy_step_ratio", "policy_mem_ratio"):
        if k in result:
            print(f"  {k:<36} {result[k]:12.3g}" if result[k] is not None else f"  {k:<36} {'not available':>12}")
    print(f"wrote {args.output_dir}/bench.json" + (f" and {args.output_dir}/ours/profile.txt" if args.profile else ""))


def main(argv=None):
    args, train_args = parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    if args.logprob_memory:
        logprob_memory(args.output_dir, args.logprob_positions)
        return 0
    cfg = cli.resolved_config(train_args)
    if args.rollout_copy_cost:
        rollout_copy_cost(cfg, args.output_dir)
        return 0
    if args.mismatch:
        bad = [d for d in args.mismatch if d not in models.DTYPES]
        if bad:
            raise UserError(f"--mismatch {','.join(bad)}: each one of {', '.join(models.DTYPES)}")
        sampler_mismatch(cfg, args.adapter, args.mismatch, args.output_dir)
        return 0
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    result = {"device": device, "model": cfg.model, "settings": {k: getattr(cfg, k) for k in (
        "prompts_per_step", "num_generations", "max_completion_length", "steps_per_generation", "num_iterations",
        "micro_batch_size", "load_in_4bit", "lora_r", "temperature")}, "timed_steps": args.steps}
    if args.synthetic:
        result["model"], result["reward"] = "random-init, Qwen2.5-0.5B shapes", "coin flip"
    result.update(run_sides(args, train_args))
    with open(os.path.join(args.output_dir, "bench.json"), "w") as f:
        json.dump(result, f, indent=2)
    print_table(result, args)
    return 0


if __name__ == "__main__":
    errors.run_script(main)
