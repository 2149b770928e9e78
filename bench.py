"""Benchmark train.py's RL step, and optionally TRL's GRPOTrainer on identical settings.

    python bench.py --model tiny --dataset tiny                         # CPU, seconds
    python bench.py --model /path/to/Qwen2.5-0.5B-Instruct --dataset gsm8k --steps 3
    python bench.py --model tiny --dataset tiny --vs-trl                # needs `pip install trl`
    python bench.py --logprob-memory          # the log-prob pass's memory at Qwen2.5's vocabulary

Every flag of train.py applies (it is train.py's own loop that runs). One warm-up step is run
and not counted, then --steps steps are timed. Each side runs in its own process, one after the
other, so that peak memory (CUDA peak allocated on a GPU, the process's peak RSS on CPU) is each
one's own. Writes bench.json in --output_dir and prints a table.

TRL gets the same model object (4-bit + LoRA built by cegppo.load_model), the same chat-formatted
prompts and reward, the same P prompts x G generations, completion length, temperature, top_p,
micro-batch size and optimizer updates per rollout (TRL's steps_per_generation counts
micro-batches; we set it, and the gradient accumulation, so that both take the same number of
optimizer updates of the same size per generation), no KL (beta 0), the same eps.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.abspath(__file__))


def run_ours(train_args, steps, out):
    """train.py for 1 + steps steps with evaluation and checkpoints out of the way."""
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *train_args, "--max_steps", str(steps + 1),
           "--output_dir", out, "--eval_limit", "0", "--save_steps", "100000", "--logging_steps", "100000"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"train.py exited {p.returncode}")
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))][1:]    # drop the warm-up
    mean = lambda k: statistics.mean(r[k] for r in rows)
    return {
        "step_s": mean("step_time_s"),
        "rollout_s": mean("rollout_time_s"),
        "reward_s": mean("reward_time_s"),
        "old_logprob_s": mean("old_logprob_time_s"),
        "update_s": mean("update_time_s"),
        "rollout_tokens_per_s": sum(r["completion_tokens"] for r in rows) / sum(r["rollout_time_s"] for r in rows),
        "update_tokens_per_s": sum(r["update_tokens"] for r in rows) / max(1e-9, sum(r["update_time_s"] for r in rows)),
        "updates_per_step": mean("updates"),
        "zero_std_groups_per_step": mean("zero_std_groups"),
        "peak_mem_gb": max(r["peak_mem_gb"] for r in rows),
    }


def trl_worker(spec_path):
    """Runs in its own process: TRL's GRPOTrainer on the settings in spec_path; writes its timings."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    import cegppo
    import train
    spec = json.load(open(spec_path))
    cfg = train.parse_config(spec["train_args"])
    torch.manual_seed(cfg.seed)
    model, tok = cegppo.load_model(train.resolve_model(cfg.model), four_bit=cfg.load_in_4bit, lora_rank=cfg.lora_r,
                                   lora_alpha=cfg.lora_alpha, trainable=True,
                                   gradient_checkpointing=cfg.gradient_checkpointing)
    rows = cegppo.load_rows(cfg.dataset, "train", cfg.question_field, cfg.answer_field)
    data = Dataset.from_list([{"prompt": cegppo.format_prompt(tok, q), "answer": a} for q, a in rows])

    def reward(completions, answer, **kw):
        return [cegppo.math_reward(c, a) for c, a in zip(completions, answer)]

    n = cfg.prompts_per_step * cfg.num_generations                    # completions per generation
    per_update = n // cfg.steps_per_generation
    if n % cfg.steps_per_generation or per_update % cfg.micro_batch_size:
        sys.exit("--vs-trl needs prompts_per_step * num_generations / steps_per_generation to be a multiple "
                 "of --micro_batch_size")
    accum = per_update // cfg.micro_batch_size
    steps = spec["steps"]
    per_rollout = cfg.steps_per_generation * cfg.num_iterations     # TRL optimizer steps per RL step
    args = GRPOConfig(
        output_dir=spec["out"], max_steps=per_rollout * (steps + 1), learning_rate=cfg.learning_rate,
        per_device_train_batch_size=cfg.micro_batch_size, gradient_accumulation_steps=accum,
        steps_per_generation=n // cfg.micro_batch_size, num_iterations=cfg.num_iterations,
        num_generations=cfg.num_generations, max_completion_length=cfg.max_completion_length,
        temperature=cfg.temperature, top_p=cfg.top_p, top_k=0, repetition_penalty=1.0, beta=0.0,
        epsilon=cfg.epsilon_low, epsilon_high=cfg.epsilon_high, loss_type="dapo", max_grad_norm=cfg.max_grad_norm,
        weight_decay=cfg.weight_decay, warmup_steps=0, lr_scheduler_type="constant", seed=cfg.seed,
        gradient_checkpointing=cfg.gradient_checkpointing, use_cpu=not torch.cuda.is_available(),
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(), report_to="none",
        logging_steps=10 ** 6, save_strategy="no", disable_tqdm=True)
    marks = []

    class Clock(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            marks.append(time.time())
            if len(marks) == per_rollout and torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()       # the warm-up step is not counted

    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=data, processing_class=tok,
                          callbacks=[Clock()])
    trainer.train()
    json.dump({"trl_step_s": (marks[-1] - marks[per_rollout - 1]) / steps, "trl_peak_mem_gb": train.peak_mem_gb()},
              open(os.path.join(spec["out"], "trl.json"), "w"))


def run_trl(train_args, steps, out):
    os.makedirs(out, exist_ok=True)
    spec = os.path.join(out, "spec.json")
    json.dump({"train_args": train_args, "steps": steps, "out": out}, open(spec, "w"))
    p = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {ROOT!r}); import bench; "
                        f"bench.trl_worker({spec!r})"], capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"TRL run failed:\n{p.stderr[-3000:]}")
    return json.load(open(os.path.join(out, "trl.json")))


# The log-prob and entropy pass at Qwen2.5's sizes (vocabulary 151,936; hidden 896 as in 0.5B).
LOGPROB_VOCAB, LOGPROB_HIDDEN, LOGPROB_TOKENS = 151936, 896, (256, 1024, 4096)


def logprob_pass_extra_gb(n, way, vocab=LOGPROB_VOCAB, hidden=LOGPROB_HIDDEN):
    """Peak extra tensor memory (GB) of log-probs + entropy + backward over n positions, 'ours'
    (cegppo._TokenLogProb, chunked) or 'naive' (full float32 logits, then log_softmax). Exact
    allocator numbers: CUDA's peak allocated, or on CPU the profiler's running total of allocations."""
    import torch
    import cegppo
    cuda = torch.cuda.is_available()
    dev, dtype = ("cuda", cegppo.compute_dtype()) if cuda else ("cpu", torch.float32)
    torch.manual_seed(0)
    h = torch.randn(n, hidden, device=dev, dtype=dtype, requires_grad=True)               # [N, d]
    w = torch.empty(vocab, hidden, device=dev, dtype=dtype).normal_(0, 0.02)              # [V, d] frozen head
    targets = torch.randint(0, vocab, (n,), device=dev)                                    # [N]

    def run():
        if way == "ours":
            lp, _ = cegppo._TokenLogProb.apply(h, w, None, targets, 1.0, cegppo.chunk_size(n), True)
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
    from torch.profiler import ProfilerActivity, profile
    with tempfile.TemporaryDirectory() as tmp:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            run()
        prof.export_chrome_trace(os.path.join(tmp, "trace.json"))
        events = json.load(open(os.path.join(tmp, "trace.json")))["traceEvents"]
    # "Total Allocated" counts from 0 at the profiler's start: its maximum is the peak extra memory
    return max(e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]") / 1e9


def logprob_memory(out_dir):
    """Our log-prob pass against naive float32 logits, at Qwen2.5's vocabulary, for growing batches."""
    rows = []
    for n in LOGPROB_TOKENS:
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


def main(argv=None):
    ap = argparse.ArgumentParser(description="Benchmark train.py's RL step (all train.py flags apply).")
    ap.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    ap.add_argument("--vs-trl", action="store_true", help="also run TRL's GRPOTrainer on the same settings")
    ap.add_argument("--output_dir", default="runs/bench", help="bench.json and the runs' files go here")
    ap.add_argument("--logprob-memory", action="store_true",
                    help="instead: peak memory of the log-prob pass at Qwen2.5's vocabulary vs naive logits")
    args, train_args = ap.parse_known_args(argv)
    if args.logprob_memory:
        os.makedirs(args.output_dir, exist_ok=True)
        logprob_memory(args.output_dir)
        return 0
    import train
    from cegppo import UserError
    try:
        cfg = train.parse_config(train_args)
    except UserError as e:
        sys.exit(f"error: {e}")
    os.makedirs(args.output_dir, exist_ok=True)
    import shutil
    shutil.rmtree(os.path.join(args.output_dir, "ours"), ignore_errors=True)
    import torch
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    result = {"device": device, "model": cfg.model, "settings": {k: getattr(cfg, k) for k in (
        "prompts_per_step", "num_generations", "max_completion_length", "steps_per_generation", "num_iterations",
        "micro_batch_size", "load_in_4bit", "lora_r", "temperature")}, "timed_steps": args.steps}
    result.update(run_ours(train_args, args.steps, os.path.join(args.output_dir, "ours")))
    if args.vs_trl:
        result.update(run_trl(train_args, args.steps, os.path.join(args.output_dir, "trl")))
        result["step_ratio"] = result["step_s"] / result["trl_step_s"]
        result["mem_ratio"] = result["peak_mem_gb"] / result["trl_peak_mem_gb"]
    with open(os.path.join(args.output_dir, "bench.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(f"device {device}, model {cfg.model}, {args.steps} timed steps")
    for k in ("step_s", "rollout_s", "old_logprob_s", "update_s", "reward_s", "rollout_tokens_per_s",
              "update_tokens_per_s", "peak_mem_gb", "trl_step_s", "trl_peak_mem_gb", "step_ratio", "mem_ratio"):
        if k in result:
            print(f"  {k:<22} {result[k]:10.3f}")
    print(f"wrote {args.output_dir}/bench.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
