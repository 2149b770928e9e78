"""GPU acceptance check: train.py's GPU path end to end, on any CUDA machine, offline, in at most 8 minutes.

    python gpu_check.py                              # every part; a table, and runs/gpu_check/gpu_check.json
    python gpu_check.py --parts a,c                  # some parts
    python gpu_check.py --deadline_s 900             # a slower card: more time before parts are skipped

For maintainers, before a release or on a new kind of card (docs/gpu.md: how to install the
packages a bare CUDA image lacks on a machine without network). Models with Qwen2.5-1.5B's and
-0.5B's shapes and random weights are built locally (bench.synthetic_model, lab.build_model): nothing
is downloaded. Random weights never write a right answer, so the reward is bench.coin_reward (a fair
coin per completion, as for `python -m engine.bench --synthetic-0.5b`); the prompts are the lab's.

  a  three default train.py steps at 1.5B shapes (4-bit NF4, LoRA, the dense rollout copy, the
     card's dtype: bf16 from compute capability 8.0), then one more after --resume
  b  the same under an 8 GB cap (torch.cuda.set_per_process_memory_fraction): peak allocated and peak
     reserved beside memory.py's estimate for the same settings
  c  the T4 path forced at 0.5B shapes: the card taken as one without native bf16 (fp16 with dynamic
     loss scaling, TF32 off): three steps, all finite, loss_scale logged
  d  rollout tokens/s and the log-prob mismatch |log pi_sample - log pi_old|, dense copy against the
     4-bit policy, in bf16 and fp16 (0.5B shapes); then python -m engine.bench --mismatch's rows on a small random
     adapter: the copy with LoRA merged and kept apart, what the first update would clip if the
     sampler's numbers were pi_old, and the sampler correction's weights
  e  step time and peak memory beside TRL's GRPOTrainer on (a)'s settings (python -m engine.bench --vs-trl's
     machinery), when trl is installed. Not like for like in one respect, said in its rows: TRL 1.16
     casts a quantised model's trainable LoRA parameters to bf16, ours stay float32. Also our step
     and update time with each group's prompt once against --shared_prefix false, on prompts of
     GSM8K's length with 128-token completions, and the share of micro-batches packed

Each run is a fresh Python process (its own peak memory). Parts that would start after
--deadline_s are skipped and say so. Without CUDA it stops with one line and exit code 2.
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time

from engine import models  # noqa: I001  first: it quiets bitsandbytes' import-time kernel lookup (engine/models.py)
import torch

import cegppo
from engine import bench, cli, data, dense_copy, errors, lab, memory, runlog
from engine.errors import UserError
from engine.generation import Generator

ROOT = os.path.dirname(os.path.abspath(__file__))
PARTS = "abcde"
SIZES = {"1.5b": "qwen2.5-1.5b", "0.5b": "qwen2.5-0.5b"}
QWEN = {"1.5b": "Qwen2.5-1.5B", "0.5b": "Qwen2.5-0.5B"}          # memory.QWEN's names


# ----------------------------------------------------------------------------------------------
# Arguments, models, settings (all of it runs on a CPU too: tests/test_gpu_check.py)
# ----------------------------------------------------------------------------------------------
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default=PARTS, help="which parts to run, e.g. a,c or ac (default: all of abcde)")
    ap.add_argument("--output_dir", default="runs/gpu_check", help="the runs, the table and gpu_check.json")
    ap.add_argument("--deadline_s", type=float, default=480.0, help="skip the parts that would start later "
                    "than this many seconds after the start (default 480: the whole check in 8 minutes)")
    ap.add_argument("--cap_gb", type=float, default=8.0, help="part b's memory cap in GB (default 8)")
    a = ap.parse_args(argv)
    parts = [p for p in a.parts.replace(",", "").strip().lower()]
    if not parts or any(p not in PARTS for p in parts):
        raise UserError(f"--parts {a.parts}: expected letters among {PARTS}, e.g. --parts a,c")
    a.parts = sorted(set(parts))
    if a.deadline_s <= 0 or a.cap_gb <= 0:
        raise UserError(f"--deadline_s {a.deadline_s} / --cap_gb {a.cap_gb}: both must be > 0")
    return a


def shaped_config(size):
    """The transformers config of the random model with `size`'s shapes ('1.5b' or '0.5b'), without
    building it: what memory.QWEN says, as lab.build_model will build it."""
    from transformers import Qwen2Config
    shape = dict(lab.SIZES[SIZES[size]])
    vocab = shape.pop("vocab_size")
    return Qwen2Config(vocab_size=vocab, max_position_embeddings=1024, **shape)


def train_args(folder, out, *extra):
    """train.py's defaults on a shaped model and the lab's prompts; evaluation off, a checkpoint at the end."""
    return ["--model", folder, "--dataset", "lab", "--eval_limit", "0", "--logging_steps", "1000",
            "--output_dir", out, *extra]


def longest_prompt(folder, cfg):
    """The longest chat-formatted lab prompt in tokens: memory.py's estimate takes it as the prompt length
    (the lab's are short; --max_prompt_length is only a limit)."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(folder)
    return max(len(tok(cegppo.format_prompt(tok, q))["input_ids"]) for q, _ in data.load_rows(cfg.dataset))


def estimate_gb(size, cfg, rollout_model, prompt_tokens):
    """memory.py's peak (engine/memory.py) for cfg's settings (in its dtype, the sampler actually used, the real prompts)."""
    dtype = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[models.compute_dtype(cfg.dtype)]
    est = memory.with_flags(cfg, dtype=dtype, rollout_model=rollout_model, max_prompt_length=prompt_tokens)
    return memory.peak_gb(memory.QWEN[QWEN[size]], est)


# ----------------------------------------------------------------------------------------------
# Runs, each in its own process
# ----------------------------------------------------------------------------------------------
def in_own_process(worker, spec, folder, timeout):
    """gpu_check.<worker>(spec) in a fresh Python, its stdout and stderr in folder/log.txt; returns
    (worker.json's contents or {"error": ...}, stderr)."""
    os.makedirs(folder, exist_ok=True)
    spec_path = os.path.join(folder, "spec.json")
    json.dump(spec, open(spec_path, "w"))
    code = f"import sys; sys.path.insert(0, {ROOT!r}); import gpu_check; gpu_check.{worker}({spec_path!r})"
    try:
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=max(1, timeout))
        err, rc = p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:
        err, rc = (e.stderr or b"").decode() if isinstance(e.stderr, bytes) else (e.stderr or ""), "timeout"
    open(os.path.join(folder, "log.txt"), "w").write(err)
    out = os.path.join(folder, "worker.json")
    res = json.load(open(out)) if os.path.isfile(out) else {}
    if rc != 0 and "error" not in res:
        last = err.strip().splitlines()[-1] if err.strip() else ""
        res["error"] = f"exit {rc}: {last}"[:300]
    return res, err


def train_worker(spec_path):
    """train.py's main() on the spec's flags with the coin reward, under an optional memory cap; writes
    worker.json: its exit code or error, and the process's peak allocated and reserved CUDA memory."""
    spec = json.load(open(spec_path))
    cegppo.math_reward = bench.coin_reward
    if spec.get("as_t4"):                # a card without native bf16 (a T4): fp16 by the rule, and no TF32
        models.native_bf16 = lambda device=None: False
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    if spec.get("cap_gb"):
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, spec["cap_gb"] * 1e9 / total))
    res = {}
    try:
        res["rc"], last = bench.run_train(spec["args"])
        if res["rc"] not in (0, 130, *runlog.NO_SIGNAL_EXIT):   # a stop for lack of signal is a result too
            res["error"] = last                      # train.py's own error line
    except Exception as e:          # an out-of-memory is a result here, not a crash of the check
        res["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
    res["max_allocated_gb"] = torch.cuda.max_memory_allocated() / 1e9
    res["max_reserved_gb"] = torch.cuda.max_memory_reserved() / 1e9
    json.dump(res, open(os.path.join(os.path.dirname(spec_path), "worker.json"), "w"))


def rollout_worker(spec_path):
    """Part d: for each dtype, the 4-bit + LoRA policy and its dense copy sample the same prompts;
    tokens per second of generate(), and |log pi_sample - log pi_old| against the policy's log-probs."""
    spec = json.load(open(spec_path))
    rows = []
    for dtype in spec["dtypes"]:
        cfg = cli.resolved_config(spec["args"] + ["--dtype", dtype])
        torch.manual_seed(cfg.seed)
        model, tok = models.policy_model(cfg)
        prompts = [cegppo.format_prompt(tok, q) for q, _ in data.load_rows(cfg.dataset)[:cfg.prompts_per_step]]
        dense = dense_copy.dense_copy(model)
        for name, sampler in (("dense", dense), ("policy", model)):
            row = {"dtype": dtype, "sampler": name}
            try:
                with models.model_autocast(model):           # as train.py's rollout, in the compute dtype
                    cegppo.rollout(sampler, tok, prompts[:1], 2, 8, cfg.temperature, cfg.top_p, Generator(2))  # warm-up
                    runlog.sync()
                    t = time.time()
                    ro = cegppo.rollout(sampler, tok, prompts, cfg.num_generations, cfg.max_completion_length,
                                        cfg.temperature, cfg.top_p, Generator(cfg.generation_batch_size))
                    runlog.sync()
                    seconds = time.time() - t
                mask = ro.completion_mask.cpu()
                row["tokens_per_s"] = int(mask.sum()) / seconds
                old = bench.old_logprobs(model, ro, cfg)
                sample = ro.sample_logp.float().cpu()     # the sampler's own numbers
                row.update(dense_copy.sampling_mismatch(sample[:, :old.shape[1]], old, mask))
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:200]
            rows.append(row)
        dense_copy.release(dense)                           # and on CUDA the cache back to the driver
        del model, dense
    folder = os.path.dirname(spec_path)
    try:
        mismatch = bench.sampler_mismatch(cli.resolved_config(spec["args"]), None, spec["dtypes"], folder)
    except Exception as e:
        mismatch = [{"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:200]}]
    json.dump({"rows": rows, "mismatch": mismatch}, open(os.path.join(folder, "worker.json"), "w"))


def metrics(out):
    path = os.path.join(out, "metrics.jsonl")
    return [json.loads(line) for line in open(path)] if os.path.isfile(path) else []


def finite(rows, *keys):
    return bool(rows) and all(isinstance(r.get(k), (int, float)) and math.isfinite(r[k]) for r in rows for k in keys)


def sampler_of(rows):
    return "dense" if any("time/rollout_copy_s" in r for r in rows) else "policy"


# ----------------------------------------------------------------------------------------------
# The parts: each returns (table rows, raw results)
# ----------------------------------------------------------------------------------------------
def row(part, check, measured, reference="", ok=None):
    return {"part": part, "check": check, "measured": measured, "reference": reference, "ok": ok}


def summarize_train(part, rows, res, steps, resumed=None):
    """Table rows for a train.py run: its steps, finiteness, time per step, peak memory."""
    got = [r["step"] for r in rows]
    out = [row(part, "steps written", ",".join(map(str, got)) or "none", ",".join(map(str, range(1, steps + 1))),
               got == list(range(1, steps + 1)) and not res.get("error"))]
    if res.get("error"):
        out.append(row(part, "error", res["error"], "", False))
    if rows:
        out.append(row(part, "loss, grad_norm finite", finite(rows, "loss", "grad_norm"), "True",
                       finite(rows, "loss", "grad_norm")))
        timed = rows[1:] or rows                            # the first step warms up
        out.append(row(part, "step time (s), after the first", round(sorted(r["time/step_s"] for r in timed)
                                                                   [len(timed) // 2], 2)))
        out.append(row(part, "sampler", sampler_of(rows)))
        if "sampling/sampling_logp_difference/mean" in rows[-1]:
            out.append(row(part, "sampling logp difference, mean / max",
                           f"{rows[-1]['sampling/sampling_logp_difference/mean']:.2e} / "
                           f"{rows[-1]['sampling/sampling_logp_difference/max']:.2e}"))
    if resumed is not None:
        out.append(row(part, "resumed from the checkpoint", resumed, "True", resumed))
    return out


def summarize_memory(part, rows, res, cap_gb, estimate):
    """Peak allocated (train.py's peak_mem_gb) and reserved beside memory.py's estimate, under cap_gb."""
    alloc = max((r["peak_mem_gb"] for r in rows if r.get("peak_mem_gb") is not None), default=None)
    reserved = [r["peak_mem_reserved_gb"] for r in rows if r.get("peak_mem_reserved_gb") is not None]
    reserved = max(reserved) if reserved else res.get("max_reserved_gb")      # else the whole process's
    ok = alloc is not None and not res.get("error") and reserved is not None and reserved <= cap_gb
    return [row(part, f"peak allocated (GB), cap {cap_gb:g}", None if alloc is None else round(alloc, 2),
                f"memory.py estimate {estimate:.2f}", ok),
            row(part, "peak reserved (GB)", None if reserved is None else round(reserved, 2), f"<= {cap_gb:g}", ok)]


def summarize_fp16(part, rows, res):
    scaled = bool(rows) and all("loss_scale" in r for r in rows)
    ok = finite(rows, "loss", "grad_norm") and scaled and not res.get("error")
    return [row(part, "fp16: loss and grad_norm finite", finite(rows, "loss", "grad_norm"), "True", ok),
            row(part, "fp16: loss_scale logged", ", ".join(f"{r.get('loss_scale', 0):g}" for r in rows) or "none",
                "every step", scaled),
            row(part, "fp16: skipped updates", rows[-1].get("skipped_updates") if rows else None, "few")]


def summarize_rollout(part, res):
    out = []
    for r in res.get("rows", []):
        what = f"{r['sampler']} {r['dtype']}"
        if "error" in r:
            out.append(row(part, f"rollout {what}", r["error"], "", False))
            continue
        out.append(row(part, f"rollout tokens/s, {what}", round(r["tokens_per_s"], 1)))
        out.append(row(part, f"logp mismatch mean / max, {what}",
                       f"{r['sampling/sampling_logp_difference/mean']:.2e} / "
                       f"{r['sampling/sampling_logp_difference/max']:.2e}"))
    for r in res.get("mismatch", []):
        if "error" in r:
            out.append(row(part, "sampler mismatch (python -m engine.bench --mismatch)", r["error"], "", False))
            continue
        what = f"{r['sampler']}, {r['dtype']}, small random adapter"
        out.append(row(part, f"logp mismatch mean / max, {what}", f"{r['logp_diff_mean']:.2e} / {r['logp_diff_max']:.2e}",
                       "CPU simulation: docs/benchmarks.md"))
        if "pass_s_head_fp16" in r:      # the fp16 head's rounding of pi_old, and what float32 would cost
            out.append(row(part, f"pi_old pass (s), {what}: head in fp16 / float32",
                           f"{r['pass_s_head_fp16']:.3f} / {r['pass_s_head_fp32']:.3f}"))
            continue
        out.append(row(part, f"sampling tokens/s, {what}", round(r["tokens_per_s"], 1)))
        out.append(row(part, f"outside the clip range at the first update (upper bound) / correction "
                             f"({r['correction']}) mean, masked, {what}",
                       f"{r['would_clip_at_first_update']:.4f} / {r['mean']:.4f}, {r['sampling/correction_masked']:.4f}"))
    if "error" in res:
        out.append(row(part, "error", res["error"], "", False))
    return out


def summarize_trl(part, ours_rows, trl):
    timed = ours_rows[1:] or ours_rows
    ours_step = sorted(r["time/step_s"] for r in timed)[len(timed) // 2] if timed else None
    ours_mem = max((r["peak_mem_gb"] for r in ours_rows if r.get("peak_mem_gb") is not None), default=None)
    out = [row(part, "step time (s): ours / TRL", f"{ours_step:.2f} / {trl['trl_step_s']:.2f}" if ours_step else None,
               f"ratio {ours_step / trl['trl_step_s']:.2f}" if ours_step else ""),
           row(part, "peak allocated (GB): ours / TRL", f"{ours_mem:.2f} / {trl['trl_peak_mem_gb']:.2f}"
               if ours_mem is not None else None)]
    if trl.get("trl_peak_mem_reserved_gb") is not None:
        out.append(row(part, "peak reserved (GB): TRL", round(trl["trl_peak_mem_reserved_gb"], 2)))
    out.append(row(part, "not like for like", "TRL 1.16 casts a quantised model's trainable LoRA parameters to bf16; "
                   "ours stay float32 (more memory, exact optimizer updates)"))
    return out


def summarize_shared_prefix(part, shared_rows, plain_rows):
    """Step and update time with each group's prompt once (--shared_prefix, the default) against
    every row its own prompt, medians after the first step (docs/benchmarks.md has the CPU's)."""
    def median(rows, key):
        timed = sorted(r[key] for r in rows[1:] or rows if key in r)
        return timed[len(timed) // 2] if timed else None
    out = []
    for key, what in (("time/step_s", "step"), ("time/old_logprob_s", "old log-probs"), ("time/update_s", "updates")):
        a, b = median(shared_rows, key), median(plain_rows, key)
        # ok: sharing the prompt is not slower (None where the phase did not run, e.g. pi_old from the sampler)
        out.append(row(part, f"{what} time (s), GSM8K-length prompts: each prompt once / every row its own",
                       f"{a:.2f} / {b:.2f}" if a and b else None, f"ratio {a / b:.2f}" if a and b else "",
                       a <= b if a and b else None))
    share = median(shared_rows, "shared_prefix/packed_share")
    out.append(row(part, "micro-batches packed (shared_prefix/packed_share)", share, "1", bool(share)))
    return out


def format_table(rows):
    """One markdown table of the parts' rows."""
    cell = lambda v: "" if v is None else ("yes" if v is True else "NO" if v is False else str(v))   # noqa: E731
    lines = ["| part | check | measured | reference | ok |", "|---|---|---|---|---|"]
    lines += [f"| {r['part']} | {r['check']} | {cell(r['measured'])} | {cell(r['reference'])} | {cell(r['ok'])} |"
              for r in rows]
    return "\n".join(lines)


def write_results(out_dir, rows, raw, header):
    """The table (printed and gpu_check.md) and everything as gpu_check.json."""
    os.makedirs(out_dir, exist_ok=True)
    table = format_table(rows)
    with open(os.path.join(out_dir, "gpu_check.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(out_dir, "gpu_check.json"), "w") as f:
        json.dump({**header, "table": rows, "parts": raw}, f, indent=2, default=str)
    return table


# ----------------------------------------------------------------------------------------------
# The check
# ----------------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise UserError("gpu_check.py checks the GPU path and needs a CUDA GPU (torch.cuda.is_available() is "
                        "False); see docs/gpu.md")
    t0 = time.time()
    left = lambda: args.deadline_s - (time.time() - t0)                              # noqa: E731
    cap = torch.cuda.get_device_capability()
    header = {"device": torch.cuda.get_device_name(0), "capability": f"{cap[0]}.{cap[1]}",
              "dtype": str(models.compute_dtype()), "torch": torch.__version__}
    print(f"{header['device']} (compute capability {header['capability']}), compute dtype {header['dtype']}; "
          f"parts {''.join(args.parts)}, deadline {args.deadline_s:g} s", flush=True)
    need = {"1.5b": set("abe"), "0.5b": set("cd")}
    folders = {s: bench.synthetic_model(SIZES[s]) for s in need if need[s] & set(args.parts)}
    torch.cuda.empty_cache()                  # the weights were drawn on the GPU: its memory is the runs' now
    out = lambda name: os.path.join(args.output_dir, name)                            # noqa: E731
    rows, raw, a_rows = [], {}, []

    def skip(part):
        if left() < 30:
            rows.append(row(part, "skipped", f"deadline ({args.deadline_s:g} s) reached", "", None))
            return True
        print(f"part {part} ({time.time() - t0:.0f} s in)", flush=True)
        shutil.rmtree(out(part), ignore_errors=True)          # train.py refuses a folder that holds a run
        return False

    if "a" in args.parts and not skip("a"):
        base = train_args(folders["1.5b"], out("a"), "--rollout_model", "dense", "--save_steps", "3")
        res, _ = in_own_process("train_worker", {"args": base + ["--max_steps", "3"]}, out("a"), left())
        a_rows = metrics(out("a"))
        res2, err = in_own_process("train_worker", {"args": base + ["--max_steps", "4", "--resume"]}, out("a/resume"),
                                   left())
        resumed = "resumed from" in err and [r["step"] for r in metrics(out("a"))] == [1, 2, 3, 4]
        failed = {"error": res2["error"]} if "error" in res2 else {}
        rows += summarize_train("a", metrics(out("a")), {**res, **failed}, 4, resumed)
        raw["a"] = {"first": res, "resume": res2}
    if "b" in args.parts and not skip("b"):
        b_args = train_args(folders["1.5b"], out("b"), "--rollout_model", "dense", "--max_steps", "3")
        res, _ = in_own_process("train_worker", {"args": b_args, "cap_gb": args.cap_gb}, out("b"), left())
        b_rows = metrics(out("b"))
        cfg = cli.resolved_config(b_args)
        est = estimate_gb("1.5b", cfg, sampler_of(b_rows) if b_rows else "dense", longest_prompt(folders["1.5b"], cfg))
        rows += summarize_train("b", b_rows, res, 3) + summarize_memory("b", b_rows, res, args.cap_gb, est)
        raw["b"] = {**res, "estimate_gb": est}
    if "c" in args.parts and not skip("c"):
        res, _ = in_own_process("train_worker", {"args": train_args(folders["0.5b"], out("c"), "--max_steps", "3"),
                                                 "as_t4": True}, out("c"), left())
        rows += summarize_train("c", metrics(out("c")), res, 3) + summarize_fp16("c", metrics(out("c")), res)
        raw["c"] = res
    if "d" in args.parts and not skip("d"):
        dtypes = (["bf16"] if models.native_bf16() else []) + ["fp16"]
        res, _ = in_own_process("rollout_worker", {"args": train_args(folders["0.5b"], out("d")), "dtypes": dtypes},
                                out("d"), left())
        rows += summarize_rollout("d", res)
        raw["d"] = res
    if "e" in args.parts and not skip("e"):
        try:
            import trl  # noqa: F401  (optional: requirements-scale.txt)
        except ImportError:
            rows.append(row("e", "TRL comparison", "skipped: trl is not installed (docs/gpu.md)", "", None))
        else:
            e_args = train_args(folders["1.5b"], out("e/ours"), "--rollout_model", "dense")
            if not a_rows:                                   # part a gives ours; otherwise one short run
                in_own_process("train_worker", {"args": e_args + ["--max_steps", "2"]}, out("e/ours"), left())
            ours = a_rows[:3] or metrics(out("e/ours"))
            # each prompt once against every row its own, on prompts of GSM8K's length and 128-token
            # completions (lab prompts beside 512 tokens are too short for packing to pay: the plain layout)
            os.makedirs(out("e"), exist_ok=True)
            long = ["--dataset", bench.gsm8k_length_rows(os.path.join(out("e"), "gsm8k_length.jsonl")),
                    "--max_completion_length", "128", "--rollout_model", "dense", "--max_steps", "3"]
            for name, flag in (("shared", "true"), ("plain", "false")):
                in_own_process("train_worker", {"args": train_args(folders["1.5b"], out(f"e/{name}"), *long,
                                                                   "--shared_prefix", flag)}, out(f"e/{name}"), left())
            rows += summarize_shared_prefix("e", metrics(out("e/shared")), metrics(out("e/plain")))
            try:
                trl_res = bench.run_trl(e_args, 1, out("e/trl"), coin=True)
                rows += summarize_trl("e", ours, trl_res)
                raw["e"] = trl_res
            except SystemExit as e:                            # bench.run_trl stops with its message
                rows.append(row("e", "TRL run", str(e)[-300:], "", False))
    header["elapsed_s"] = round(time.time() - t0, 1)
    print("\n" + write_results(args.output_dir, rows, raw, header))
    print(f"\nwrote {args.output_dir}/gpu_check.json and gpu_check.md ({header['elapsed_s']:.0f} s)")
    return 1 if any(r["ok"] is False for r in rows) else 0


if __name__ == "__main__":
    errors.run_script(main)
