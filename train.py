"""Train a Qwen2.5 model (4-bit NF4 + LoRA) on verifiable math with CE-GPPO, on one GPU.

    python train.py                                      # CE-GPPO, Qwen2.5-1.5B-Instruct, GSM8K
    python train.py --model Qwen/Qwen2.5-0.5B-Instruct --beta1 0.75 --beta2 1.0
    python train.py --algo grpo                          # the same loop with beta1 = beta2 = 0
    python train.py --preset lab                         # CPU lab: a small model learns arithmetic
    python train.py --model tiny --dataset tiny          # offline smoke run (seconds, CPU)

One RL step, in the order main() runs it (the numbers match the comments in the loop):
  1. rollout      P prompts x G completions each, sampled at the temperature    (cegppo.rollout)
  2. reward       1 if the last \\boxed{} equals the reference, else 0            (cegppo.math_reward)
  3. advantages   z-score within each group; all-equal groups are dropped         (cegppo.group_advantages)
  4. old log-probs  log pi_old of every sampled token, once, with no gradient     (cegppo.completion_logprobs)
  5. updates      the kept groups are split into `steps_per_generation` mini-batches, one optimizer
                  update each: after the first, the policy has moved, ratios leave 1 and the clip
                  regions fill up. That is where CE-GPPO and GRPO differ            (cegppo.cegppo_loss)
  6. log          one metrics row, samples and curves; evaluation every `eval_steps`
  7. checkpoint   atomic; --resume continues exactly

Deviations from the paper (besides those listed in cegppo.py): LoRA on a 4-bit model instead of
full fine-tuning (hence a larger learning rate, 1e-5 instead of 1e-6), far smaller batches and
response lengths (one consumer GPU instead of a cluster), Qwen2.5-Instruct instead of
DeepSeek-R1-Distill-Qwen, GSM8K / MATH instead of KlearReasoner-MathSub-30K.
"""

import dataclasses
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from tqdm import tqdm

import cegppo
import loading
import plot
import rollout_copy
from eval import evaluate
from loading import UserError


def _f(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    # model
    model: str = _f("Qwen/Qwen2.5-1.5B-Instruct", "Hub id or local folder of a causal LM; 'tiny' and 'lab' are built in code")
    load_in_4bit: bool = _f(True, "load the base weights in 4-bit NF4 (bitsandbytes)")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = _f("auto", "compute dtype; auto: bf16 on GPUs with native bf16 (compute capability 8.0+), fp16 with loss scaling on older GPUs (T4, V100, RTX 20xx), fp32 on CPU")
    lora_r: int = _f(16, "LoRA rank (LoRA on all linear layers, dropout 0)")
    lora_alpha: int = _f(32, "LoRA alpha")
    gradient_checkpointing: bool = _f(True, "recompute activations in the backward pass (saves memory)")
    # data
    dataset: str = _f("gsm8k", "gsm8k | math | tiny | lab | a local .jsonl/.json/.parquet file")
    question_field: Optional[str] = _f(None, "question field of a local file; unset: 'question'")
    answer_field: Optional[str] = _f(None, "answer field of a local file; unset: 'answer' (GSM8K '#### x' understood)")
    eval_dataset: Optional[str] = _f(None, "held-out set; unset: the named dataset's test split, none for a local file")
    max_prompt_length: int = _f(512, "prompts longer than this (tokens) are skipped and counted")
    # algorithm: --algo fills in the five knobs below that are not given (cegppo.ALGOS)
    algo: Literal["cegppo", "grpo", "dapo", "gppo"] = _f("cegppo", "sets the defaults of the five loss knobs below")
    beta1: Optional[float] = _f(None, "gradient scale in the low clip region (ratio < 1-eps_low, A < 0; NA&LP): lowers entropy")
    beta2: Optional[float] = _f(None, "gradient scale in the high clip region (ratio > 1+eps_high, A > 0; PA&LP): raises entropy")
    epsilon_low: Optional[float] = _f(None, "clip range below 1")
    epsilon_high: Optional[float] = _f(None, "clip range above 1 (DAPO's clip-higher raises it)")
    dual_clip: Optional[float] = _f(None, "dual clip c for A < 0 (loss <= -c*A), as in the authors' scripts; 0 = off")
    sft_coef: float = _f(0.0, "weight of the authors' SFT term on fully rewarded responses (their scripts: 0.1; the paper: 0)")
    # rollout
    prompts_per_step: int = _f(8, "P: prompts per RL step")
    num_generations: int = _f(8, "G: sampled completions per prompt (the group)")
    max_completion_length: int = _f(512, "max new tokens per completion")
    temperature: float = _f(1.0, "sampling temperature (the log-probs use the same one)")
    top_p: float = _f(1.0, "nucleus sampling for the rollout (1.0 = the plain softmax, as in the paper)")
    generation_batch_size: int = _f(64, "sequences per generate() call; halves itself on out-of-memory")
    rollout_model: Literal["auto", "dense", "policy"] = _f("auto", "sample from a dense copy of the policy (4-bit dequantised, LoRA merged; held while sampling) or through its 4-bit + LoRA layers; auto: dense on a GPU where it fits, else policy")
    old_logprobs: Literal["auto", "sampler", "policy"] = _f("auto", "pi_old of the sampled tokens: the sampler's own log-probs (no extra pass) or a pass through the policy; auto: the sampler's when it computes in float32 (CPU), else the policy's")
    max_generation_rounds: int = _f(4, "dynamic sampling: generate again (more prompts) until P groups carry a signal, at most this many rounds per step; 1 = off")
    collapse_patience: int = _f(20, "stop (saved) after this many steps in a row in which no group carried a signal; 0 = never")
    # optimisation
    steps_per_generation: int = _f(4, "optimizer updates per pass over a rollout (mini-batches of whole groups); with 1 update in all (and num_iterations 1) the ratio is always 1 and nothing is clipped")
    num_iterations: int = _f(1, "passes over each rollout (the paper: 1)")
    micro_batch_size: int = _f(8, "responses per forward/backward (gradient accumulation inside a mini-batch)")
    learning_rate: float = _f(1e-5, "AdamW learning rate (constant after warm-up)")
    warmup_steps: int = _f(5, "linear warm-up, in RL steps")
    weight_decay: float = _f(0.1, "AdamW weight decay (paper: 0.1)")
    max_grad_norm: float = _f(1.0, "gradient clipping")
    max_steps: int = _f(200, "RL steps")
    seed: int = _f(42, "seed for data order, sampling and LoRA init")
    seeds: Optional[str] = _f(None, "comma-separated seeds, e.g. 1,2,3: one run per seed, in output_dir/seed-<n>")
    threads: int = _f(0, "CPU threads for torch; 0 = $OMP_NUM_THREADS, else one per core")
    # logging, evaluation, checkpoints
    output_dir: str = _f("runs/cegppo", "metrics.jsonl, samples.jsonl, curves.png, checkpoint/, final adapter (presets: runs/<preset>)")
    logging_steps: int = _f(1, "write samples.jsonl and redraw curves.png every N steps")
    eval_steps: int = _f(25, "greedy accuracy on the held-out subset every N steps (and at step 1 and the end)")
    eval_limit: int = _f(64, "size of the fixed held-out subset; 0 = no evaluation")
    save_steps: int = _f(25, "checkpoint every N steps (and at the end and on Ctrl-C)")
    resume: bool = _f(False, "continue from output_dir/checkpoint")
    wandb: bool = _f(False, "also log to Weights & Biases (pip install wandb)")
    preset: Optional[str] = _f(None, "tiny | lab: other defaults for the offline smoke run or the CPU lab; flags still win")


# --preset NAME changes the defaults; flags on the command line still win.
PRESETS = {
    # the offline smoke run; `--model tiny` picks it when no other preset is named
    "tiny": dict(model="tiny", dataset="tiny", lora_r=8, lora_alpha=16, prompts_per_step=4, num_generations=4,
                 max_completion_length=28, steps_per_generation=2, micro_batch_size=8, learning_rate=5e-3,
                 warmup_steps=1, weight_decay=0.0, max_steps=4, eval_steps=2, eval_limit=8, save_steps=2,
                 output_dir="runs/tiny"),
    "lab": dict(model="lab", dataset="lab", lora_r=32, lora_alpha=64, gradient_checkpointing=False,
                prompts_per_step=8, num_generations=8, max_completion_length=28, max_prompt_length=256,
                steps_per_generation=8, num_iterations=2, micro_batch_size=32, learning_rate=2e-4, warmup_steps=10,
                epsilon_low=0.1, epsilon_high=0.1, weight_decay=0.0, max_steps=100, eval_steps=25, eval_limit=140,
                save_steps=50, logging_steps=10, output_dir="runs/lab"),
}

# Flags that may change between a run and its --resume; any other difference is refused.
RESUME_MAY_CHANGE = {"resume", "seeds", "max_steps", "save_steps", "eval_steps", "logging_steps", "wandb",
                     "generation_batch_size", "threads", "rollout_model",
                     "collapse_patience"}
AT_LEAST_1 = ("prompts_per_step", "num_generations", "max_completion_length", "steps_per_generation", "num_iterations",
              "micro_batch_size", "max_steps", "logging_steps", "eval_steps", "save_steps", "generation_batch_size",
              "max_prompt_length", "lora_r", "lora_alpha", "max_generation_rounds")


# ----------------------------------------------------------------------------------------------
# Configuration: flags -> Config, checked before anything is loaded or written
# ----------------------------------------------------------------------------------------------
def _default_text(f):
    """What --help shows as a flag's default: the algorithms' values for the loss knobs."""
    if f.name in cegppo.ALGOS["cegppo"]:
        return ", ".join(f"{a} {v[f.name]:g}" for a, v in cegppo.ALGOS.items())
    return "unset" if f.default is None else str(f.default)


def parse_config(argv=None):
    """Config from flags: a preset's defaults, then the flags, then --algo's loss knobs, then checks."""
    parser = loading.dataclass_parser(Config, __doc__.splitlines()[0], _default_text, {"preset": list(PRESETS)})
    given = vars(parser.parse_args(sys.argv[1:] if argv is None else argv))
    preset = given.get("preset") or ("tiny" if given.get("model") == "tiny" else None)
    cfg = Config(**{**PRESETS.get(preset, {}), **given, "preset": preset})
    for k, v in cegppo.ALGOS[cfg.algo].items():
        if getattr(cfg, k) is None:
            setattr(cfg, k, v)
    check_config(cfg)
    if cfg.seeds:
        seed_list(cfg.seeds)
    return cfg


def check_config(cfg):
    """Every range a flag must be in; one line naming the flag when it is not."""
    def need(ok, name, what):
        if not ok:
            raise UserError(f"--{name} {getattr(cfg, name)}: {what}")
    for name in AT_LEAST_1:
        need(getattr(cfg, name) >= 1, name, "must be at least 1")
    need(cfg.num_generations >= 2, "num_generations", "a group needs at least 2 completions")
    for name in ("beta1", "beta2", "sft_coef", "weight_decay", "warmup_steps", "eval_limit", "threads",
                 "collapse_patience"):
        need(getattr(cfg, name) >= 0, name, "must be >= 0")
    for name in ("epsilon_low", "epsilon_high"):
        need(0 <= getattr(cfg, name) < 1, name, "must be in [0, 1)")
    need(cfg.dual_clip == 0 or cfg.dual_clip > 1, "dual_clip", "must be 0 (off) or greater than 1")
    need(0 < cfg.top_p <= 1, "top_p", "must be in (0, 1]")
    need(cfg.temperature > 0, "temperature", "RL sampling needs a temperature > 0")
    need(cfg.learning_rate > 0, "learning_rate", "must be > 0")
    need(cfg.max_grad_norm > 0, "max_grad_norm", "must be > 0")
    if cfg.dtype == "bf16" and torch.cuda.is_available() and not loading.native_bf16():   # the rule of compute_dtype
        raise UserError("--dtype bf16: this GPU has no native bf16 (compute capability below 8.0); "
                        "use --dtype fp16 (loss-scaled) or auto")


def check_resume(cfg):
    """The checkpoint to resume from (or None); refuses a run folder that would be overwritten."""
    out = cfg.output_dir
    if not cfg.resume:
        if os.path.exists(os.path.join(out, "metrics.jsonl")):
            raise UserError(f"--output_dir {out}: holds a run already; pass --resume to continue it or pick a new folder")
        return None
    ckpt = find_checkpoint(out)
    if ckpt is None:
        raise UserError(f"--resume: no checkpoint in {out}")
    saved = json.load(open(os.path.join(out, "config.json")))
    for k, v in dataclasses.asdict(cfg).items():
        if k not in RESUME_MAY_CHANGE and saved.get(k) != v:
            raise UserError(f"--resume: --{k} is {v!r} here but {saved.get(k)!r} in {out}/config.json")
    return ckpt


# ----------------------------------------------------------------------------------------------
# Setup: data, model, optimizer
# ----------------------------------------------------------------------------------------------
def load_data(cfg):
    """The training rows and the fixed held-out subset: [(question, answer)] each."""
    train_rows = loading.load_rows(cfg.dataset, "train", cfg.question_field, cfg.answer_field)
    eval_name = cfg.eval_dataset or (None if cfg.dataset.endswith(loading.LOCAL_FILE) else cfg.dataset)
    eval_rows = []
    if eval_name and cfg.eval_limit > 0:
        eval_rows = loading.load_rows(eval_name, "test", cfg.question_field, cfg.answer_field, cfg.eval_limit)
    return train_rows, eval_rows


def usable_prompts(cfg, tok, rows):
    """Chat-formatted (prompt, answer) pairs that fit --max_prompt_length; the others are counted."""
    formatted = [(cegppo.format_prompt(tok, q), a) for q, a in rows]
    prompts = [(p, a) for p, a in formatted if len(tok(p)["input_ids"]) <= cfg.max_prompt_length]
    if len(prompts) < len(formatted):
        print(f"skipped {len(formatted) - len(prompts)} prompts longer than --max_prompt_length "
              f"{cfg.max_prompt_length}", file=sys.stderr)
    if not prompts:
        raise UserError(f"--dataset {cfg.dataset}: no usable prompts")
    if len(prompts) < cfg.prompts_per_step:
        raise UserError(f"--dataset {cfg.dataset}: {len(prompts)} usable prompts, fewer than --prompts_per_step "
                        f"{cfg.prompts_per_step}; lower --prompts_per_step or add data")
    return prompts


def policy_model(cfg, adapter=None):
    """(model, tokenizer): the 4-bit base with a fresh LoRA adapter, or `adapter`, as cfg asks (bench.py too)."""
    return loading.load_model(loading.resolve_model(cfg.model), four_bit=cfg.load_in_4bit, lora_rank=cfg.lora_r,
                              lora_alpha=cfg.lora_alpha, adapter=adapter, trainable=True,
                              gradient_checkpointing=cfg.gradient_checkpointing, dtype=cfg.dtype)


def load_policy(cfg, ckpt):
    """The 4-bit base with a LoRA adapter (fresh, or the checkpoint's), its optimizer and loss scaler."""
    model, tok = policy_model(cfg, ckpt and os.path.join(ckpt, "adapter"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    # fused: one kernel for all LoRA tensors instead of a few small ops per tensor (CPU and CUDA)
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=True)
    # fp16 gradients underflow without loss scaling; bf16 and fp32 need none (the scaler is then a no-op)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    scaler = torch.amp.GradScaler(device, enabled=loading.compute_dtype(cfg.dtype) == torch.float16)
    if scaler.is_enabled():
        why = "no bf16 on this GPU" if cfg.dtype == "auto" else "--dtype fp16"
        print(f"fp16 compute ({why}): dynamic loss scaling on", file=sys.stderr)
    return model, tok, params, optimizer, scaler


def lr_at(step, cfg):
    """Linear warm-up over warmup_steps RL steps, then constant (the paper's schedule)."""
    return cfg.learning_rate * min(1.0, step / max(1, cfg.warmup_steps))


@dataclass
class State:
    """Everything a checkpoint restores besides the adapter and the optimizer."""
    step: int = 0
    epoch: int = 0
    pos: int = 0
    skipped_updates: int = 0
    last_signal_step: int = 0      # the last step in which some group's rewards differed (collapse_patience)


# ----------------------------------------------------------------------------------------------
# The step's phases, in order
# ----------------------------------------------------------------------------------------------
def sample_prompts(prompts, state, cfg, n):
    """1. The next n prompts of a seeded shuffle; a new shuffle each epoch (resumable from state)."""
    batch = []
    while len(batch) < n:
        if state.pos == len(prompts):
            state.epoch, state.pos = state.epoch + 1, 0
        order = list(range(len(prompts)))
        random.Random(cfg.seed + state.epoch).shuffle(order)
        batch.append(prompts[order[state.pos]])
        state.pos += 1
    return batch


def rollout_step(model, sampler, tok, batch, gen_bs, cfg, times, shrink_on_oom=True):
    """1. G samples for each prompt from the current policy (= pi_old for this step), with the
    sampler's own log-probs of its tokens. `sampler` is the policy itself or, on a GPU by default,
    a dense copy of it (rollout_copy.py): a copy that runs out of memory is given up (freeing it
    gives back far more than halving the generation batch would)."""
    with loading.model_autocast(model):        # the policy's compute dtype on a GPU, also for the copy
        return timed(times, "rollout", cegppo.rollout, sampler, tok, [p for p, _ in batch], cfg.num_generations,
                     cfg.max_completion_length, cfg.temperature, cfg.top_p, gen_bs, shrink_on_oom)


def give_up_dense_copy(error, copy, step):
    """The dense copy ran out of memory or produced non-finite probabilities (fp16 overflow): free
    it and sample through the 4-bit policy from now on. Said once; counted in sampling/dense_fallback."""
    why = "out of memory" if isinstance(error, torch.OutOfMemoryError) else "non-finite probabilities"
    tqdm.write(f"warning: step {step}: the dense rollout copy hit {why}; sampling through the 4-bit policy "
               "from now on (as --rollout_model policy)")
    rollout_copy.release(copy)


def score(texts, answers):
    """2. The verifiable reward of every completion: [B] floats."""
    return torch.tensor([cegppo.math_reward(c, a) for c, a in zip(texts, answers)])


def collect_groups(model, tok, prompts, rollout_mode, gen_bs, state, cfg, times):
    """1-3. Rollout, reward and advantages, in rounds, until P groups carry a signal (dynamic sampling).

    A group whose G rewards are all equal has advantage 0 everywhere: no gradient. The authors
    (DAPO's dynamic sampling, which CE-GPPO's runs use) sample more prompts and generate again
    until the step holds P groups that do carry a signal; here at most max_generation_rounds
    rounds, each on the next prompts of the seeded order. Each extra round asks for as many
    prompts as the missing groups need at the signal rate seen so far (at most P); informative
    groups beyond P are dropped. Returns the kept groups as one rollout, with their prompts,
    rewards and advantages, and the counts of everything sampled (for the metrics).
    """
    P, G = cfg.prompts_per_step, cfg.num_generations
    kept, sampled = [], {"rewards": [], "entropy": [], "rounds": 0, "prompts": 0, "all_wrong": 0, "all_right": 0,
                         "surplus": 0, "thrown_away_s": 0.0, "lengths": [], "truncated": [], "batch": [], "texts": [],
                         "dense_fallback": 0}
    sampler = timed(times, "rollout_copy", rollout_copy.dense_copy, model) if rollout_mode == "dense" else model
    while len(kept) < P and sampled["rounds"] < cfg.max_generation_rounds:
        rate = len(kept) / max(1, sampled["prompts"]) if sampled["rounds"] else 1.0
        n = P if not sampled["rounds"] else min(P, math.ceil((P - len(kept)) / max(rate, 1 / P)))
        t0 = time.time()
        # 1. rollout: n prompts, G completions each
        batch = sample_prompts(prompts, state, cfg, n)
        try:
            ro = rollout_step(model, sampler, tok, batch, gen_bs, cfg, times, shrink_on_oom=sampler is model)
        except (torch.OutOfMemoryError, cegppo.NonFiniteLogits) as e:
            if sampler is model:
                raise
            give_up_dense_copy(e, sampler, state.step)
            sampler, sampled["dense_fallback"] = model, 1
            ro = rollout_step(model, sampler, tok, batch, gen_bs, cfg, times)
        gen_bs = ro["gen_batch_size"]
        # 2. reward
        answers = [a for _, a in batch for _ in range(G)]
        rewards = timed(times, "reward", score, ro["texts"], answers)
        # 3. advantages: a z-score within each group; all-equal groups get 0 and are dropped
        adv, zero_std = cegppo.group_advantages(rewards, G)
        informative = (~zero_std).nonzero()[:, 0].tolist()
        take = informative[:P - len(kept)]
        kept += [(ro, g, batch[g], rewards[g * G:(g + 1) * G], adv[g * G:(g + 1) * G]) for g in take]
        group_mean = rewards.view(-1, G).mean(1)
        sampled["all_wrong"] += int((zero_std & (group_mean == 0)).sum())
        sampled["all_right"] += int((zero_std & (group_mean > 0)).sum())
        sampled["surplus"] += len(informative) - len(take)
        sampled["thrown_away_s"] += (time.time() - t0) * (1 - len(take) / n)    # this round's share not trained on
        sampled["rounds"] += 1
        sampled["prompts"] += n
        sampled["rewards"].append(rewards)
        cmask = ro["completion_mask"].cpu()
        sampled["entropy"].append(ro["sample_entropy"].cpu()[cmask.bool()])
        sampled["lengths"].append(cmask.sum(1).float())
        sampled["truncated"].append(ro["truncated"].cpu())
        sampled["batch"] += batch
        sampled["texts"] += ro["texts"]
    if sampler is not model:
        rollout_copy.release(sampler)                   # its memory goes back before the updates
    del sampler
    sampled = {k: torch.cat(v) if k in ("rewards", "entropy", "lengths", "truncated") else v for k, v in sampled.items()}
    sampled["gen_batch_size"] = gen_bs
    step = {"ro": merge_groups([(ro, g) for ro, g, *_ in kept], G, tok.pad_token_id),
            "batch": [b for _, _, b, _, _ in kept],
            "rewards": torch.cat([r for *_, r, _ in kept]) if kept else torch.zeros(0),
            "adv": torch.cat([a for *_, a in kept]) if kept else torch.zeros(0)}
    return step, sampled


def merge_groups(parts, G, pad):
    """One rollout of the groups [(rollout, group index)], possibly from several rounds: prompts
    left-padded to the longest prompt, completions right-padded to the longest completion."""
    if not parts:
        return None
    L = max(ro["prompt_len"] for ro, _ in parts)
    T = max(ro["completion_mask"].shape[1] for ro, _ in parts)
    cols = {"input_ids": [], "attention_mask": [], "completion_mask": [], "truncated": [], "sample_logp": [],
            "sample_entropy": [], "texts": []}
    for ro, g in parts:
        rows, p = slice(g * G, (g + 1) * G), ro["prompt_len"]
        t = ro["completion_mask"].shape[1]
        left, right = (L - p, 0), (0, T - t)
        cols["input_ids"].append(torch.cat([F.pad(ro["input_ids"][rows, :p], left, value=pad),
                                            F.pad(ro["input_ids"][rows, p:], right, value=pad)], 1))
        cols["attention_mask"].append(torch.cat([F.pad(ro["attention_mask"][rows, :p], left),
                                                 F.pad(ro["attention_mask"][rows, p:], right)], 1))
        for k in ("completion_mask", "sample_logp", "sample_entropy"):
            cols[k].append(F.pad(ro[k][rows], right))
        cols["truncated"].append(ro["truncated"][rows])
        cols["texts"] += ro["texts"][rows]
    return {**{k: v if k == "texts" else torch.cat(v) for k, v in cols.items()}, "prompt_len": L}


def trim(ids, amask, cmask, prompt_len):
    """Drop the columns that are padding in every row of this micro-batch (saves compute)."""
    start = int((amask.sum(0) > 0).nonzero()[0])       # first column any row attends to
    T = int(cmask.sum(1).max())
    return ids[:, start:prompt_len + T], amask[:, start:prompt_len + T], cmask[:, :T], prompt_len - start


def micro_batch(ro, idx):
    """The rows idx of a rollout, trimmed: (input_ids, attention_mask, completion_mask, prompt_len)."""
    return trim(ro["input_ids"][idx], ro["attention_mask"][idx], ro["completion_mask"][idx], ro["prompt_len"])


def old_logprob_source(cfg):
    """'sampler' or 'policy' for --old_logprobs. auto: the sampler's own log-probs where it computes in
    float32 (a CPU), where they equal the policy's to rounding (measured: at most a few 1e-6 in
    log-prob, so the first update's ratio is 1 to 1e-5, far inside any clip range); the policy's
    where half-precision decoding differs from the training forward by far more (a GPU)."""
    if cfg.old_logprobs != "auto":
        return cfg.old_logprobs
    on_cpu_in_fp32 = not torch.cuda.is_available() and loading.compute_dtype(cfg.dtype) == torch.float32
    return "sampler" if on_cpu_in_fp32 else "policy"


def old_logprobs_step(model, ro, source, cfg):
    """4. log pi_old and the entropy of every kept token, [K*G, T] each on the CPU: the sampler's own
    numbers (no pass at all), or one no-grad pass through the policy (old_logprobs)."""
    if ro is None:
        return torch.zeros(0, 0), torch.zeros(0, 0)
    if source == "sampler":
        return ro["sample_logp"].float().cpu(), ro["sample_entropy"].float().cpu()
    return old_logprobs(model, ro, cfg)


@torch.no_grad()
def old_logprobs(model, ro, cfg, with_entropy=True):
    """4. log pi_old and the entropy of every sampled token, micro-batch by micro-batch: [B, T] each, on the CPU."""
    B, T = ro["completion_mask"].shape
    old_logp, entropy = torch.zeros(B, T), torch.zeros(B, T)
    for s in range(0, B, cfg.micro_batch_size):
        ids, amask, _, p = micro_batch(ro, slice(s, s + cfg.micro_batch_size))
        with loading.autocast(ids.device.type, loading.compute_dtype(cfg.dtype)):    # as the updates' forward
            lp, ent = cegppo.completion_logprobs(model, ids, amask, p, cfg.temperature, with_entropy=with_entropy)
        old_logp[s:s + len(ids), :lp.shape[1]] = lp.float().cpu()
        entropy[s:s + len(ids), :lp.shape[1]] = ent.float().cpu()
    return old_logp, entropy


# cegppo_loss's statistics that are averaged over the tokens of all updates of a step
TOKEN_STATS = ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/dual_mean", "approx_kl", "ratio/mean")


def update_policy(model, optimizer, scaler, params, ro, old_logp, adv, positive, kept_groups, cfg, state):
    """5. `steps_per_generation` optimizer updates per pass over the kept groups, `num_iterations` passes.

    Mini-batches are whole groups: a group's advantages sum to zero, so an update that saw only its
    wrong answers would push down the tokens that right and wrong answers share.
    Returns the per-update losses and grad norms and the token-weighted loss statistics.
    """
    G = cfg.num_generations
    log = {"loss": [], "sft_loss": [], "grad_norm": [], "ratio/max": [], "stat_sums": {}, "stat_tokens": 0,
           "first_update": {"tokens": 0, "clipped": 0.0, "diff_sum": 0.0, "diff_max": 0.0}}
    for _ in range(cfg.num_iterations):
        for groups in torch.tensor_split(kept_groups, min(cfg.steps_per_generation, max(1, len(kept_groups)))):
            if len(groups) == 0:
                continue
            mb = (groups[:, None] * G + torch.arange(G)).flatten()            # the responses of those groups
            losses = accumulate_gradients(model, scaler, ro, mb, old_logp, adv, positive, cfg, log)
            if optimizer_step(optimizer, scaler, params, cfg, losses, log):
                continue
            state.skipped_updates += 1
            tqdm.write(f"warning: step {state.step}: non-finite loss or gradient, update skipped "
                       f"({state.skipped_updates} so far)")
    return log


def accumulate_gradients(model, scaler, ro, mb, old_logp, adv, positive, cfg, log):
    """Forward and backward over one mini-batch in micro-batches; returns (policy, sft) loss sums or None."""
    cmask = ro["completion_mask"]
    mb_tokens, pos_tokens = int(cmask[mb].sum()), int(cmask[mb][positive[mb]].sum())
    device = ro["input_ids"].device
    policy_sum, sft_sum = 0.0, 0.0
    for s in range(0, len(mb), cfg.micro_batch_size):
        idx = mb[s:s + cfg.micro_batch_size]
        ids, amask, c, p = micro_batch(ro, idx)
        with loading.autocast(device.type, loading.compute_dtype(cfg.dtype)):          # as old_logprobs' forward
            lp, _ = cegppo.completion_logprobs(model, ids, amask, p, cfg.temperature, with_entropy=False)
        loss, st = cegppo.cegppo_loss(lp, old_logp[idx, :c.shape[1]].to(device), adv[idx].to(device), c,
                                      epsilon_low=cfg.epsilon_low, epsilon_high=cfg.epsilon_high, beta1=cfg.beta1,
                                      beta2=cfg.beta2, dual_clip=cfg.dual_clip, num_tokens=mb_tokens)
        sft = cegppo.positive_sft_loss(lp, c, positive[idx].to(device), num_tokens=pos_tokens)
        total = loss + cfg.sft_coef * sft if cfg.sft_coef else loss
        if not torch.isfinite(total):
            return None
        scaler.scale(total).backward()
        policy_sum, sft_sum = policy_sum + loss.item(), sft_sum + sft.item()
        n = int(c.sum())
        log["stat_tokens"] += n
        for k in TOKEN_STATS:
            log["stat_sums"][k] = log["stat_sums"].get(k, 0.0) + st[k] * n
        log["ratio/max"].append(st["ratio/max"])
        if not log["loss"] and "sample_logp" in ro:   # no update applied yet: still the sampling policy
            first = log["first_update"]
            sample_lp = ro["sample_logp"][idx, :c.shape[1]].to(device)
            diff = (lp.detach().float() - sample_lp).abs()[c.bool()]
            first["tokens"] += n
            first["clipped"] += (st["clip_ratio/low_mean"] + st["clip_ratio/high_mean"]) * n
            first["diff_sum"] += diff.sum().item()
            first["diff_max"] = max(first["diff_max"], diff.max().item() if n else 0.0)
    return policy_sum, sft_sum


def optimizer_step(optimizer, scaler, params, cfg, losses, log):
    """Clip and apply the accumulated gradient; False (and nothing applied) if it is not finite.

    With fp16 the gradient is unscaled first, and an overflow lowers the loss scale for the next
    update (GradScaler's dynamic scaling); a nan/inf never reaches the weights in any dtype.
    """
    finite = losses is not None
    if finite:
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        finite = bool(torch.isfinite(grad_norm))
    if finite:
        scaler.step(optimizer)
        log["loss"].append(losses[0])
        log["sft_loss"].append(losses[1])
        log["grad_norm"].append(grad_norm.item())
    if scaler.is_enabled() and losses is not None:
        scaler.update()                 # halves the scale after an overflow, grows it after a quiet run
    optimizer.zero_grad(set_to_none=True)
    return finite


def _mean(xs):
    return sum(xs) / max(1, len(xs))


def metrics_row(state, cfg, step, sampled, old_logp, entropy, upd, times, scaler):
    """6. One row of metrics.jsonl; names follow TRL's GRPOTrainer where it logs the same quantity.

    Over everything sampled in the step (all rounds): reward, reward_std, frac_reward_zero_std,
    entropy, completions/*. Over the trained tokens (the kept groups): the clip ratios, approx_kl,
    the quadrants (their four fractions add up to 1), update_tokens."""
    G, ro = cfg.num_generations, step["ro"]
    rewards = sampled["rewards"]
    trained = ro["completion_mask"].cpu() if ro is not None else torch.zeros(0, 0)
    first = upd["first_update"]
    return {
        "step": state.step,
        "reward": rewards.mean().item(),
        "reward_std": rewards.view(-1, G).std(1).mean().item(),
        "frac_reward_zero_std": (sampled["all_wrong"] + sampled["all_right"]) / sampled["prompts"],
        "entropy": sampled["entropy"].mean().item(),
        **{k: upd["stat_sums"].get(k, 0.0) / max(1, upd["stat_tokens"]) for k in TOKEN_STATS},
        "clip_ratio/region_mean": sum(upd["stat_sums"].get(k, 0.0) for k in
                                      ("clip_ratio/low_mean", "clip_ratio/high_mean")) / max(1, upd["stat_tokens"]),
        "clip_ratio/first_update": first["clipped"] / max(1, first["tokens"]),
        "ratio/max": max(upd["ratio/max"], default=1.0),
        "sampling/sampling_logp_difference/mean": first["diff_sum"] / max(1, first["tokens"]),
        "sampling/sampling_logp_difference/max": first["diff_max"],
        "sampling/old_logprobs_from_sampler": int(old_logprob_source(cfg) == "sampler"),
        "sampling/dense_fallback": sampled["dense_fallback"],
        "completions/mean_length": sampled["lengths"].mean().item(),
        "completions/max_length": sampled["lengths"].max().item(),
        "completions/clipped_ratio": sampled["truncated"].float().mean().item(),
        "num_tokens": int(sampled["lengths"].sum()),
        "generation/rounds": sampled["rounds"],
        "generation/prompts": sampled["prompts"],
        "generation/groups_all_wrong": sampled["all_wrong"],
        "generation/groups_all_right": sampled["all_right"],
        "generation/groups_surplus": sampled["surplus"],
        "generation/groups_kept": len(step["batch"]),
        "time/thrown_away_rollout_s": sampled["thrown_away_s"],
        "update_tokens": int(trained.sum()) * cfg.num_iterations,
        "trained_responses": trained.shape[0],
        "updates": len(upd["loss"]),
        "updates_asked": cfg.steps_per_generation * cfg.num_iterations,
        "skipped_updates": state.skipped_updates,
        "loss": _mean(upd["loss"]),
        "sft_loss": _mean(upd["sft_loss"]),
        "grad_norm": _mean(upd["grad_norm"]),
        "learning_rate": lr_at(state.step, cfg),
        "epoch": state.epoch,
        **({"loss_scale": scaler.get_scale()} if scaler.is_enabled() else {}),
        **cegppo.token_quadrants(old_logp, entropy, step["adv"], trained),
        **{f"time/{k}_s": v for k, v in times.items()},
    }


def log_step(out, row, sampled, cfg, wandb_run, bar):
    """6. Append the row, print one line, write samples and redraw the curves every logging_steps."""
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")
    if wandb_run:
        wandb_run.log(row, step=row["step"])
    bar.update(1)
    ev = f" | eval {row['eval/accuracy']:.3f}" if "eval/accuracy" in row else ""
    upd = f"{row['updates']} upd" if row["updates"] == row["updates_asked"] else \
        f"{row['updates']}/{row['updates_asked']} upd"          # fewer groups carried a signal than asked
    gen = f" ({row['generation/rounds']} rounds)" if row["generation/rounds"] > 1 else ""
    if row["generation/groups_kept"] < cfg.prompts_per_step:    # the rounds ran out first
        gen += f" | groups {row['generation/groups_kept']}/{cfg.prompts_per_step}"
    tqdm.write(f"step {row['step']:4d} | reward {row['reward']:.3f} | entropy {row['entropy']:.3f} | clip low "
               f"{row['clip_ratio/low_mean']:.3f} high {row['clip_ratio/high_mean']:.3f} | kl {row['approx_kl']:.1e} | "
               f"len {row['completions/mean_length']:.0f} | {upd}{gen} | {row['time/step_s']:.1f}s{ev}")
    if row["step"] % cfg.logging_steps and row["step"] != cfg.max_steps:
        return
    G = cfg.num_generations
    with open(os.path.join(out, "samples.jsonl"), "a") as f:
        for j in range(min(4, len(sampled["texts"]))):
            prompt, answer = sampled["batch"][j // G]
            f.write(json.dumps({"step": row["step"], "prompt": prompt, "completion": sampled["texts"][j],
                                "answer": answer, "reward": sampled["rewards"][j].item()}) + "\n")
    plot.plot_runs([out], os.path.join(out, "curves.png"))


# ----------------------------------------------------------------------------------------------
# Checkpoints, peak memory, Ctrl-C
# ----------------------------------------------------------------------------------------------
def rng_state():
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s):
    """The saved generators back, on whatever machine resumes: the CUDA states of the GPUs it has
    (the first min(saved, visible); none without CUDA), so a run saved on a GPU resumes on a CPU
    and one saved with 2 GPUs visible resumes with 1 (or 1 with 2: the others keep their seeds)."""
    random.setstate(s["python"])
    torch.set_rng_state(s["torch"].cpu())
    cuda = s.get("cuda") or []
    if torch.cuda.is_available():
        for i, state in enumerate(cuda[:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state.cpu(), i)


def save_checkpoint(out, model, optimizer, scaler, state):
    """7. Adapter + optimizer + loss scale + State + RNG, written to a temp folder and renamed."""
    final, tmp, old = (os.path.join(out, n) for n in ("checkpoint", "checkpoint.tmp", "checkpoint.old"))
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(os.path.join(tmp, "adapter"))
    torch.save({"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "rng": rng_state(),
                **dataclasses.asdict(state)}, os.path.join(tmp, "state.pt"))
    if os.path.isdir(final):
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(out):
    for name in ("checkpoint", "checkpoint.old"):   # .old only survives a crash between two renames
        path = os.path.join(out, name)
        if os.path.isfile(os.path.join(path, "state.pt")):
            return path
    return None


def restore(ckpt, out, optimizer, scaler):
    """State from a checkpoint; metrics and sample rows written after it (a crash) are dropped, to be redone."""
    # map_location: a checkpoint saved on a GPU loads on a CPU too; load_state_dict then moves each
    # optimizer state tensor to its parameter's device (and dtype), wherever that is
    st = torch.load(os.path.join(ckpt, "state.pt"), weights_only=False, map_location="cpu")
    optimizer.load_state_dict(st["optimizer"])
    if scaler.is_enabled() and st["scaler"]:     # a run saved without fp16 (or moved to fp16) starts a fresh scale
        scaler.load_state_dict(st["scaler"])
    set_rng_state(st["rng"])
    state = State(**{f.name: st[f.name] for f in dataclasses.fields(State) if f.name in st})
    for name in ("metrics.jsonl", "samples.jsonl"):
        path = os.path.join(out, name)
        rows = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows if r["step"] <= state.step)
        os.replace(tmp, path)
    print(f"resumed from {ckpt} at step {state.step}", file=sys.stderr)
    return state


def reset_peak_mem():
    """Start a new peak: CUDA's peak allocated and reserved, or on Linux the process's peak RSS (VmHWM)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                    # Linux >= 4.0: resets VmHWM to the current RSS
    except OSError:
        pass                                # elsewhere the peak stays the process's lifetime peak


def peak_mem_gb():
    """Peak memory since reset_peak_mem(): CUDA allocated (the tensors), or RSS on CPU (model loading
    included otherwise, whose transient peak would hide the training step's). None where the OS
    tells neither (Windows: no /proc and no `resource` module)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    try:
        with open("/proc/self/status") as f:
            return int(next(line.split()[1] for line in f if line.startswith("VmHWM:"))) / 1e6   # kB
    except (OSError, StopIteration):
        pass
    try:
        import resource         # Unix only, so not at the top: the training path runs on Windows too
    except ImportError:
        return None
    # the process's lifetime peak: Linux reports ru_maxrss in KiB, macOS in bytes
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1e9 if sys.platform == "darwin" else 1e6)


def peak_mem_reserved_gb():
    """Peak CUDA memory reserved by torch's caching allocator since reset_peak_mem() (what the card
    had to hold: the tensors of peak_mem_gb plus cached and fragmented blocks); None without CUDA."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_reserved() / 1e9
    return None


def catch_ctrl_c():
    """Ctrl-C finishes the step in progress (a half-updated step cannot be checkpointed), then saves."""
    stop = {"asked": False}

    def on_sigint(signum, frame):
        if stop["asked"]:
            raise KeyboardInterrupt
        stop["asked"] = True
        tqdm.write("Ctrl-C: finishing this step, then saving a checkpoint (Ctrl-C again to abort)")
    signal.signal(signal.SIGINT, on_sigint)
    return stop


def start_wandb(cfg):
    if not cfg.wandb:
        return None
    try:
        import wandb            # optional: only for --wandb
    except ImportError:
        raise UserError("--wandb: wandb is not installed (pip install wandb)")
    return wandb.init(project="cegppo", name=os.path.basename(cfg.output_dir), config=dataclasses.asdict(cfg))


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------
def main(argv=None):
    """Parse the flags and train once, or once per seed of --seeds (each in output_dir/seed-<n>)."""
    cfg = parse_config(argv)
    if not cfg.seeds:
        return train(cfg)
    for seed in seed_list(cfg.seeds):
        out = os.path.join(cfg.output_dir, f"seed-{seed}")
        fresh = cfg.resume and not find_checkpoint(out) and not os.path.exists(os.path.join(out, "metrics.jsonl"))
        # --resume of an interrupted --seeds run: the seeds that had not started yet start now
        rc = train(dataclasses.replace(cfg, seed=seed, seeds=None, output_dir=out, resume=cfg.resume and not fresh))
        if rc and rc != COLLAPSED:                      # a collapsed seed is a result: the next seeds still run
            return rc
    print(f"compare the seeds with: python plot.py {cfg.output_dir}/seed-* --output seeds.png", file=sys.stderr)
    return 0


def seed_list(text):
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds {text}: expected comma-separated integers, e.g. 1,2,3")
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds {text}: expected distinct comma-separated integers, e.g. 1,2,3")
    return seeds


def setup(cfg):
    """Everything before the first step: the checks, the data, the policy, the output folder, the saved state."""
    loading.set_threads(cfg.threads)
    ckpt = check_resume(cfg)
    if not torch.cuda.is_available() and cfg.model not in ("tiny", "lab"):
        print(f"No CUDA GPU found: a real model trains very slowly on the CPU; {loading.CPU_HINT}.", file=sys.stderr)
    if cfg.model not in ("tiny", "lab"):
        loading.check_model_source(cfg.model)            # a wrong name or no Hub: one line, before anything slow
    train_rows, eval_rows = load_data(cfg)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)                          # LoRA init, then sampling
    model, tok, params, optimizer, scaler = load_policy(cfg, ckpt)
    prompts = usable_prompts(cfg, tok, train_rows)
    os.makedirs(cfg.output_dir, exist_ok=True)           # only now: every input was good
    with open(os.path.join(cfg.output_dir, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=2)
    state = restore(ckpt, cfg.output_dir, optimizer, scaler) if ckpt else State()
    return model, tok, params, optimizer, scaler, prompts, eval_rows, state


def timed(times, name, fn, *args):
    """fn(*args), its wall time added to times[name]. On a GPU the clock is read once the work queued
    before and by fn has run (CUDA calls return before their kernels finish)."""
    sync()
    t = time.time()
    out = fn(*args)
    sync()
    times[name] = times.get(name, 0.0) + time.time() - t
    return out


def sync():
    """Wait for the GPU's queued work, when CUDA is in use."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def due(step, every, cfg):
    """Evaluation and checkpoints run every N steps and at the last step."""
    return step % every == 0 or step == cfg.max_steps


def train(cfg):
    """One run: setup, then per RL step the seven steps below, then the final adapter."""
    model, tok, params, optimizer, scaler, prompts, eval_rows, state = setup(cfg)
    out, gen_bs, source = cfg.output_dir, cfg.generation_batch_size, old_logprob_source(cfg)
    rollout_mode = rollout_copy.choose(cfg.rollout_model, model, min(gen_bs, cfg.prompts_per_step * cfg.num_generations),
                                       cfg.max_prompt_length + cfg.max_completion_length,
                                       prompt_tokens=cfg.max_prompt_length, micro_batch=cfg.micro_batch_size)
    print(f"sampling through the {'dense copy' if rollout_mode == 'dense' else '4-bit policy'}; pi_old from the "
          f"{'sampler' if source == 'sampler' else 'policy (one no-grad pass)'}", file=sys.stderr)
    wandb_run, stop = start_wandb(cfg), catch_ctrl_c()
    bar = tqdm(total=cfg.max_steps, initial=state.step, desc="steps", dynamic_ncols=True)
    while state.step < cfg.max_steps and not stop["asked"]:
        state.step += 1
        sync()
        times, t0 = {}, time.time()
        reset_peak_mem()                                 # peak_mem_gb is this step's peak
        for g in optimizer.param_groups:
            g["lr"] = lr_at(state.step, cfg)
        # 1-3. rollout, reward, advantages: P prompts x G completions, scored, z-scored per group;
        #      rounds of more prompts until P groups carry a signal (dynamic sampling)
        step, sampled = collect_groups(model, tok, prompts, rollout_mode, gen_bs, state, cfg, times)
        gen_bs = sampled["gen_batch_size"]
        rollout_mode = "policy" if sampled["dense_fallback"] else rollout_mode
        # 4. old log-probs and entropy of the kept tokens under the sampling policy, no gradient
        old_logp, entropy = timed(times, "old_logprob", old_logprobs_step, model, step["ro"], source, cfg)
        # 5. several optimizer updates on mini-batches of the kept groups
        upd = timed(times, "update", update_policy, model, optimizer, scaler, params, step["ro"], old_logp,
                    step["adv"], step["rewards"] >= 1.0, torch.arange(len(step["batch"])), cfg, state)
        # 6. log (and evaluate)
        row = metrics_row(state, cfg, step, sampled, old_logp, entropy, upd, times, scaler)
        if eval_rows and (state.step == 1 or due(state.step, cfg.eval_steps, cfg)):
            res = evaluate(model, tok, eval_rows, max_new_tokens=cfg.max_completion_length, batch_size=gen_bs)
            row.update({"eval/accuracy": res["accuracy"], "eval/mean_length": res["mean_response_length"]})
            model.train()
        sync()
        row.update({"time/step_s": time.time() - t0, "peak_mem_gb": peak_mem_gb(),
                    "peak_mem_reserved_gb": peak_mem_reserved_gb()})
        log_step(out, row, sampled, cfg, wandb_run, bar)
        # 7. checkpoint; a policy whose groups have all been equal for collapse_patience steps stops here
        state.last_signal_step = state.step if step["batch"] else state.last_signal_step
        collapsed = cfg.collapse_patience and state.step - state.last_signal_step >= cfg.collapse_patience
        if due(state.step, cfg.save_steps, cfg) or stop["asked"] or collapsed:
            save_checkpoint(out, model, optimizer, scaler, state)
        if collapsed:
            bar.close()
            return collapse(state, row, cfg)
    bar.close()
    return finish(model, tok, state, stop, out)


COLLAPSED = 3   # train()'s exit code for a run stopped by collapse_patience


def collapse(state, row, cfg):
    """The one line a collapsed run ends with (after its checkpoint is saved)."""
    print(f"collapsed: no group has carried a reward signal since step {state.last_signal_step} "
          f"({state.step - state.last_signal_step} steps; last reward {row['reward']:.3f}); stopped at step "
          f"{state.step}, checkpoint in {cfg.output_dir}/checkpoint. Try a lower --beta1 or --learning_rate.",
          file=sys.stderr)
    return COLLAPSED


def finish(model, tok, state, stop, out):
    """The final adapter and tokenizer, or after Ctrl-C the way to resume (exit code 130)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if stop["asked"]:
        print(f"stopped at step {state.step}; checkpoint saved in {out}/checkpoint; continue with --resume",
              file=sys.stderr)
        return 130
    model.save_pretrained(out)
    tok.save_pretrained(out)
    curves = f", curves in {out}/curves.png" if os.path.exists(os.path.join(out, "curves.png")) else ""
    print(f"done: {state.step} steps; adapter and tokenizer in {out}{curves}", file=sys.stderr)
    return 0


FLAGS_PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "docs", "flags.md")


def flags_page():
    """docs/flags.md: every flag with its default, generated from Config (tests keep the file equal)."""
    head = open(FLAGS_PAGE).read().split("| group | flag |")[0] if os.path.exists(FLAGS_PAGE) else "# flags\n\n"
    return head + loading.flags_markdown(Config, _default_text)


def write_flags_page():
    with open(FLAGS_PAGE, "w") as f:
        f.write(flags_page())


if __name__ == "__main__":
    loading.run_script(main)
