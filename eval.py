"""Evaluate a model, or a model plus a LoRA adapter from train.py, on math benchmarks.

    python eval.py --model Qwen/Qwen2.5-1.5B-Instruct --dataset gsm8k --limit 200
    python eval.py --model Qwen/Qwen2.5-1.5B-Instruct --adapter runs/cegppo --dataset math500
    python eval.py --model Qwen/Qwen2.5-1.5B-Instruct --adapter runs/cegppo --dataset aime24 --k 32 --temperature 0.6
    python eval.py --model tiny --dataset tiny                     # offline, seconds

    python eval.py --model lab --dataset lab --k 16 --temperature 1.0    # pass@1 ... pass@16, the lab's warm start

Same prompt template and reward as training (cegppo.format_prompt, cegppo.math_reward).
Greedy by default; with --k > 1 (or --temperature > 0) each question gets k samples and the score
is avg@k, the paper's protocol (temperature 0.6, top_p 0.95, k = 32; MATH500 k = 4). With k samples
it also gives pass@j for each j of --pass_k: the chance that at least one of j samples is right,
estimated without bias from the k (Chen et al. 2021), each with its standard error over questions:
what the field reports as exploration (RL often raises pass@1 while pass@j at large j falls).
Writes results.json (accuracy, standard error, pass@k, settings, counts) and completions.jsonl.
"""

import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
from tqdm import tqdm

import cegppo
from engine import cli, data, dense_copy, errors, models
from engine.errors import UserError
from engine.generation import Generator
from engine.progress import PROGRESS, progress_shown
from engine.sampler import with_fallback


def pass_at_k(n, c, k):
    """The unbiased estimate of pass@k from n samples of which c are right (Chen et al. 2021, Codex): the
    chance that k samples drawn without replacement from the n hold at least one right one,
    1 - C(n - c, k) / C(n, k); exact (integer binomials), 1.0 where fewer than k are wrong."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def mean_and_stderr(xs):
    """The mean of per-question numbers and its standard error over questions."""
    m = sum(xs) / max(1, len(xs))
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / max(1, len(xs) - 1) / max(1, len(xs)))


def evaluate(model, tokenizer, rows, max_new_tokens, batch_size=64, k=1, temperature=0.0, top_p=1.0, progress=False,
             generation_progress="off", pass_k=(), seed=None):
    """Score `rows` [(question, answer)]: k samples each (greedy when temperature is 0).
    progress: a bar over the generate() calls; generation_progress: auto | on | off, a bar inside each
    call, ticked per decoded token (engine/progress.py). Logits that are not finite (an fp16
    overflow) are never scored: cegppo.NonFiniteLogits, saying which questions and in which dtype.
    pass_k: the j (each at most k) whose pass@j to give. seed: sample from a random stream of its own,
    seeded so (the caller's stream, a training run's, is left as it was), or else from the caller's.

    Returns accuracy (avg@k), its standard error over questions, pass@j and theirs, counts, and one
    record per completion.
    """
    if seed is not None:
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            return evaluate(model, tokenizer, rows, max_new_tokens, batch_size, k, temperature, top_p, progress,
                            generation_progress, pass_k)
    per_q = max(1, batch_size // k)         # questions per generate call
    # sub-batches that fit in memory: after an out-of-memory halving, the next chunks start at what fit
    generate = Generator(batch_size, progress=("eval: generating", generation_progress))
    records = []
    for s in tqdm(range(0, len(rows), per_q), desc="eval", disable=not progress, leave=False):
        chunk = rows[s:s + per_q]
        failed = None
        try:
            with models.model_autocast(model):     # half precision on a GPU, as in training; none on a CPU
                ro = cegppo.rollout(model, tokenizer, [cegppo.format_prompt(tokenizer, q) for q, _ in chunk], k,
                                    max_new_tokens, temperature, top_p, generate)
        except cegppo.NonFiniteLogits as e:
            failed = sorted({s + r // k for r in e.rows})
        if failed is not None:                      # raised here, past the except: the failed call's frames are gone
            raise cegppo.NonFiniteLogits(
                f"the logits were not finite ({models.dtype_name(models.model_compute_dtype(model))} compute) while "
                f"generating for question{'s' if len(failed) > 1 else ''} {', '.join(map(str, failed))} (of "
                f"{len(rows)}, counted from 0): nothing was scored", failed)
        lengths = ro.completion_mask.sum(1).tolist()
        for j, text in enumerate(ro.texts):
            q, a = chunk[j // k]
            records.append({"index": s + j // k, "question": q, "answer": cegppo.reference_answer(a),
                            "completion": text, "extracted": cegppo.extract_boxed(text),
                            "reward": cegppo.math_reward(text, a), "length": int(lengths[j]),
                            "truncated": bool(ro.truncated[j])})
    n = len(rows)
    right = [sum(r["reward"] >= 1.0 for r in records[i * k:(i + 1) * k]) for i in range(n)]   # c of each question
    # avg@k and its standard error over questions (the k samples of a question are not independent)
    acc, stderr = mean_and_stderr([sum(r["reward"] for r in records[i * k:(i + 1) * k]) / k for i in range(n)])
    passes = {j: mean_and_stderr([pass_at_k(k, c, j) for c in right]) for j in pass_k}
    return {
        "accuracy": acc,
        "stderr": stderr,
        "pass@k": {str(j): m for j, (m, _) in passes.items()},
        "pass@k_stderr": {str(j): se for j, (_, se) in passes.items()},
        "n_questions": n,
        "k": k,
        "unanswered": sum(r["extracted"] is None for r in records),
        "truncated": sum(r["truncated"] for r in records),
        "mean_response_length": sum(r["length"] for r in records) / max(1, len(records)),
        "records": records,
    }


@dataclass
class EvalConfig:
    model: str = field(default="Qwen/Qwen2.5-1.5B-Instruct", metadata={"help": "Hub id or local folder; 'tiny', 'lab' and 'carry' are built in code"})
    adapter: Optional[str] = field(default=None, metadata={"help": "LoRA folder written by train.py (its output_dir)"})
    dataset: str = field(default="gsm8k", metadata={"help": "gsm8k (test) | math500 | aime24 | math (test) | tiny | lab | carry | a local file"})
    question_field: Optional[str] = field(default=None, metadata={"help": "question field of a local file"})
    answer_field: Optional[str] = field(default=None, metadata={"help": "answer field of a local file"})
    limit: Optional[int] = field(default=None, metadata={"help": "evaluate the first N questions only"})
    k: int = field(default=1, metadata={"help": "samples per question (avg@k, and pass@j for j up to k)"})
    pass_k: Optional[str] = field(default=None, metadata={"help": "the j whose pass@j to give, e.g. 1,4,16 (each at most --k); unset: 1, 2, 4, ... and k"})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy; the paper samples at 0.6"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling (the paper: 0.95)"})
    max_completion_length: int = field(default=1024, metadata={"help": "max new tokens per completion"})
    batch_size: int = field(default=64, metadata={"help": "sequences per generate() call"})
    load_in_4bit: bool = field(default=True, metadata={"help": "load the base weights in 4-bit NF4"})
    output_dir: str = field(default="runs/eval", metadata={"help": "results.json and completions.jsonl go here"})
    dtype: str = field(default="auto", metadata={"help": "compute dtype: auto, bf16, fp16 or fp32"})
    threads: int = field(default=0, metadata={"help": "CPU threads for torch; 0 = $OMP_NUM_THREADS, else one per core"})
    seed: int = field(default=0, metadata={"help": "sampling seed"})
    progress: str = field(default="auto", metadata={"help": "a progress bar inside each generate() call (sequences finished, tokens): auto = on a terminal once a call has run 2 s, on, off"})


def use_dense_copy(model, tok, rows, cfg):
    """Does a dense copy of the 4-bit (+ LoRA) model generate (engine/dense_copy.py: one dense matmul per layer
    instead of dequantising every weight at every token)? On a GPU where it fits."""
    prompt_tokens = max(len(tok(cegppo.format_prompt(tok, q))["input_ids"]) for q, _ in rows)
    return dense_copy.choose("auto", model, min(cfg.batch_size, len(rows) * cfg.k),
                               prompt_tokens + cfg.max_completion_length, prompt_tokens=prompt_tokens) == "dense"


def main(argv=None):
    parser = cli.dataclass_parser(EvalConfig, __doc__.splitlines()[0],
                                      choices={"dtype": ["auto", *models.DTYPES], "progress": list(PROGRESS)})
    cfg = EvalConfig(**vars(parser.parse_args(argv)))
    if cfg.k < 1 or (cfg.limit is not None and cfg.limit < 1):
        raise UserError("--k and --limit must be at least 1")
    if cfg.k > 1 and cfg.temperature <= 0:
        raise UserError(f"--k {cfg.k}: several samples need --temperature > 0 (the paper uses 0.6)")
    if not 0 < cfg.top_p <= 1:
        raise UserError(f"--top_p {cfg.top_p}: must be in (0, 1]")
    pass_k = cli.pass_k_list(cfg.pass_k, cfg.k, "--pass_k")
    models.set_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rows = data.load_rows(cfg.dataset, "test", cfg.question_field, cfg.answer_field, cfg.limit)
    model, tok = models.load_model(models.resolve_model(cfg.model), four_bit=cfg.load_in_4bit, adapter=cfg.adapter,
                                    dtype=cfg.dtype)
    model.eval()
    res, overflow = with_fallback(
        model, use_dense_copy(model, tok, rows, cfg),
        lambda m: evaluate(m, tok, rows, cfg.max_completion_length, cfg.batch_size, cfg.k, cfg.temperature,
                           cfg.top_p, progress=progress_shown(cfg.progress), generation_progress=cfg.progress,
                           pass_k=pass_k),
        lambda line: tqdm.write(f"warning: {line}"))
    if overflow is not None:
        raise UserError(f"{overflow}; evaluate in float32 (--dtype fp32), or bf16 on a GPU that has it natively")
    os.makedirs(cfg.output_dir, exist_ok=True)
    records = res.pop("records")
    with open(os.path.join(cfg.output_dir, "completions.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    with open(os.path.join(cfg.output_dir, "results.json"), "w") as f:
        json.dump({**res, "settings": asdict(cfg)}, f, indent=2)
    name = cfg.model + (f" + {cfg.adapter}" if cfg.adapter else "")
    print(f"\n{'model':<40} {'dataset':<10} {'k':>3} {'accuracy':>9} {'stderr':>7} {'unanswered':>10} {'truncated':>9}")
    print(f"{name[-40:]:<40} {cfg.dataset[-10:]:<10} {cfg.k:>3} {res['accuracy']:>9.4f} {res['stderr']:>7.4f} "
          f"{res['unanswered']:>10} {res['truncated']:>9}")
    if cfg.k > 1:
        print("\n" + " | ".join(f"pass@{j} {res['pass@k'][str(j)]:.4f} ± {res['pass@k_stderr'][str(j)]:.4f}"
                                for j in pass_k))
    print(f"\nwrote {cfg.output_dir}/results.json and completions.jsonl")
    return 0


if __name__ == "__main__":
    errors.run_script(main)
