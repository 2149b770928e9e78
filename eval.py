"""Evaluate a model, or a model plus a LoRA adapter from train.py, on math benchmarks.

    python eval.py --model Qwen/Qwen2.5-1.5B-Instruct --dataset gsm8k --limit 200
    python eval.py --model Qwen/Qwen2.5-1.5B-Instruct --adapter runs/cegppo --dataset math500
    python eval.py --model Qwen/Qwen2.5-1.5B-Instruct --adapter runs/cegppo --dataset aime24 --k 32 --temperature 0.6
    python eval.py --model tiny --dataset tiny                     # offline, seconds

Same prompt template and reward as training (cegppo.format_prompt, cegppo.math_reward).
Greedy by default; with --k > 1 (or --temperature > 0) each question gets k samples and the score
is avg@k, the paper's protocol (temperature 0.6, top_p 0.95, k = 32; MATH500 k = 4).
Writes results.json (accuracy, standard error, settings, counts) and completions.jsonl.
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


def evaluate(model, tokenizer, rows, max_new_tokens, batch_size=64, k=1, temperature=0.0, top_p=1.0, progress=False,
             generation_progress="off"):
    """Score `rows` [(question, answer)]: k samples each (greedy when temperature is 0).
    progress: a bar over the generate() calls; generation_progress: auto | on | off, a bar inside each
    call, ticked per decoded token (engine/progress.py). Logits that are not finite (an fp16
    overflow) are never scored: cegppo.NonFiniteLogits, saying which questions and in which dtype.

    Returns accuracy (avg@k), its standard error over questions, counts, and one record per completion.
    """
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
    per_question = [sum(r["reward"] for r in records[i * k:(i + 1) * k]) / k for i in range(n)]
    acc = sum(per_question) / max(1, n)
    # standard error of the mean over questions (the k samples of a question are not independent)
    var = sum((x - acc) ** 2 for x in per_question) / max(1, n - 1)
    return {
        "accuracy": acc,
        "stderr": math.sqrt(var / max(1, n)),
        "n_questions": n,
        "k": k,
        "unanswered": sum(r["extracted"] is None for r in records),
        "truncated": sum(r["truncated"] for r in records),
        "mean_response_length": sum(r["length"] for r in records) / max(1, len(records)),
        "records": records,
    }


@dataclass
class EvalConfig:
    model: str = field(default="Qwen/Qwen2.5-1.5B-Instruct", metadata={"help": "Hub id or local folder; 'tiny' / 'lab' are built in code"})
    adapter: Optional[str] = field(default=None, metadata={"help": "LoRA folder written by train.py (its output_dir)"})
    dataset: str = field(default="gsm8k", metadata={"help": "gsm8k (test) | math500 | aime24 | math (test) | tiny | lab | a local file"})
    question_field: Optional[str] = field(default=None, metadata={"help": "question field of a local file"})
    answer_field: Optional[str] = field(default=None, metadata={"help": "answer field of a local file"})
    limit: Optional[int] = field(default=None, metadata={"help": "evaluate the first N questions only"})
    k: int = field(default=1, metadata={"help": "samples per question (avg@k)"})
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
    models.set_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rows = data.load_rows(cfg.dataset, "test", cfg.question_field, cfg.answer_field, cfg.limit)
    model, tok = models.load_model(models.resolve_model(cfg.model), four_bit=cfg.load_in_4bit, adapter=cfg.adapter,
                                    dtype=cfg.dtype)
    model.eval()
    res, overflow = with_fallback(
        model, use_dense_copy(model, tok, rows, cfg),
        lambda m: evaluate(m, tok, rows, cfg.max_completion_length, cfg.batch_size, cfg.k, cfg.temperature,
                           cfg.top_p, progress=progress_shown(cfg.progress), generation_progress=cfg.progress),
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
    print(f"\nwrote {cfg.output_dir}/results.json and completions.jsonl")
    return 0


if __name__ == "__main__":
    errors.run_script(main)
