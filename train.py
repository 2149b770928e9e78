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
import os
import random
import resource
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
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
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = _f("auto", "compute dtype; auto: bf16 on GPUs that have it, fp16 on older GPUs (with loss scaling), fp32 on CPU")
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
    algo: Literal["cegppo", "grpo", "dapo"] = _f("cegppo", "sets the defaults of the five loss knobs below")
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
    # optimisation
    steps_per_generation: int = _f(4, "optimizer updates per rollout (mini-batches of whole groups); 1 makes ratio = 1 always")
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
                     "generation_batch_size", "threads", "rollout_model"}
AT_LEAST_1 = ("prompts_per_step", "num_generations", "max_completion_length", "steps_per_generation", "num_iterations",
              "micro_batch_size", "max_steps", "logging_steps", "eval_steps", "save_steps", "generation_batch_size",
              "max_prompt_length", "lora_r", "lora_alpha")


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
    for name in ("beta1", "beta2", "sft_coef", "weight_decay", "warmup_steps", "eval_limit", "threads"):
        need(getattr(cfg, name) >= 0, name, "must be >= 0")
    for name in ("epsilon_low", "epsilon_high"):
        need(0 <= getattr(cfg, name) < 1, name, "must be in [0, 1)")
    need(cfg.dual_clip == 0 or cfg.dual_clip > 1, "dual_clip", "must be 0 (off) or greater than 1")
    need(0 < cfg.top_p <= 1, "top_p", "must be in (0, 1]")
    need(cfg.temperature > 0, "temperature", "RL sampling needs a temperature > 0")
    need(cfg.learning_rate > 0, "learning_rate", "must be > 0")
    need(cfg.max_grad_norm > 0, "max_grad_norm", "must be > 0")
    if cfg.dtype == "bf16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise UserError("--dtype bf16: this GPU has no bf16; use --dtype fp16 (loss-scaled) or auto")


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


# ----------------------------------------------------------------------------------------------
# The step's phases, in order
# ----------------------------------------------------------------------------------------------
def sample_prompts(prompts, state, cfg):
    """1a. The next P prompts of a seeded shuffle; a new shuffle each epoch (resumable from state)."""
    batch = []
    while len(batch) < cfg.prompts_per_step:
        if state.pos == len(prompts):
            state.epoch, state.pos = state.epoch + 1, 0
        order = list(range(len(prompts)))
        random.Random(cfg.seed + state.epoch).shuffle(order)
        batch.append(prompts[order[state.pos]])
        state.pos += 1
    return batch


def score(texts, answers):
    """2. The verifiable reward of every completion: [B] floats."""
    return torch.tensor([cegppo.math_reward(c, a) for c, a in zip(texts, answers)])


def trim(ids, amask, cmask, prompt_len):
    """Drop the columns that are padding in every row of this micro-batch (saves compute)."""
    start = int((amask.sum(0) > 0).nonzero()[0])       # first column any row attends to
    T = int(cmask.sum(1).max())
    return ids[:, start:prompt_len + T], amask[:, start:prompt_len + T], cmask[:, :T], prompt_len - start


def micro_batch(ro, idx):
    """The rows idx of a rollout, trimmed: (input_ids, attention_mask, completion_mask, prompt_len)."""
    return trim(ro["input_ids"][idx], ro["attention_mask"][idx], ro["completion_mask"][idx], ro["prompt_len"])


@torch.no_grad()
def old_logprobs(model, ro, cfg, with_entropy=True):
    """4. log pi_old and the entropy of every sampled token, micro-batch by micro-batch: [B, T] each, on the CPU."""
    B, T = ro["completion_mask"].shape
    old_logp, entropy = torch.zeros(B, T), torch.zeros(B, T)
    for s in range(0, B, cfg.micro_batch_size):
        ids, amask, _, p = micro_batch(ro, slice(s, s + cfg.micro_batch_size))
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
    log = {"loss": [], "sft_loss": [], "grad_norm": [], "ratio/max": [], "stat_sums": {}, "stat_tokens": 0}
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


def metrics_row(state, cfg, ro, rewards, old_logp, entropy, adv, zero_std, kept_groups, upd, times, scaler):
    """6. One row of metrics.jsonl; names follow TRL's GRPOTrainer where it logs the same quantity.
    The log-probs live on the CPU (old_logprobs), so the mask is brought there too."""
    cmask, G = ro["completion_mask"].cpu(), cfg.num_generations
    lengths = cmask.sum(1).float()
    trained = (kept_groups[:, None] * G + torch.arange(G)).flatten()
    return {
        "step": state.step,
        "reward": rewards.mean().item(),
        "reward_std": rewards.view(-1, G).std(1).mean().item(),
        "frac_reward_zero_std": zero_std.float().mean().item(),
        "entropy": entropy[cmask.bool()].mean().item(),
        **{k: upd["stat_sums"].get(k, 0.0) / max(1, upd["stat_tokens"]) for k in TOKEN_STATS},
        "clip_ratio/region_mean": sum(upd["stat_sums"].get(k, 0.0) for k in
                                      ("clip_ratio/low_mean", "clip_ratio/high_mean")) / max(1, upd["stat_tokens"]),
        "ratio/max": max(upd["ratio/max"], default=1.0),
        "completions/mean_length": lengths.mean().item(),
        "completions/max_length": lengths.max().item(),
        "completions/clipped_ratio": ro["truncated"].float().mean().item(),
        "num_tokens": int(cmask.sum()),
        "update_tokens": int(cmask[trained].sum()) * cfg.num_iterations,
        "trained_responses": len(trained),
        "updates": len(upd["loss"]),
        "skipped_updates": state.skipped_updates,
        "loss": _mean(upd["loss"]),
        "sft_loss": _mean(upd["sft_loss"]),
        "grad_norm": _mean(upd["grad_norm"]),
        "learning_rate": lr_at(state.step, cfg),
        "epoch": state.epoch,
        **({"loss_scale": scaler.get_scale()} if scaler.is_enabled() else {}),
        **cegppo.token_quadrants(old_logp, entropy, adv, cmask),
        **{f"time/{k}_s": v for k, v in times.items()},
    }


def log_step(out, row, ro, batch, answers, rewards, cfg, wandb_run, bar):
    """6. Append the row, print one line, write samples and redraw the curves every logging_steps."""
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")
    if wandb_run:
        wandb_run.log(row, step=row["step"])
    bar.update(1)
    ev = f" | eval {row['eval/accuracy']:.3f}" if "eval/accuracy" in row else ""
    tqdm.write(f"step {row['step']:4d} | reward {row['reward']:.3f} | entropy {row['entropy']:.3f} | clip low "
               f"{row['clip_ratio/low_mean']:.3f} high {row['clip_ratio/high_mean']:.3f} | kl {row['approx_kl']:.1e} | "
               f"len {row['completions/mean_length']:.0f} | {row['updates']} upd | {row['time/step_s']:.1f}s{ev}")
    if row["step"] % cfg.logging_steps and row["step"] != cfg.max_steps:
        return
    G = cfg.num_generations
    with open(os.path.join(out, "samples.jsonl"), "a") as f:
        for j in range(min(4, len(ro["texts"]))):
            f.write(json.dumps({"step": row["step"], "prompt": batch[j // G][0], "completion": ro["texts"][j],
                                "answer": answers[j], "reward": rewards[j].item()}) + "\n")
    plot.plot_runs([out], os.path.join(out, "curves.png"))


# ----------------------------------------------------------------------------------------------
# Checkpoints, peak memory, Ctrl-C
# ----------------------------------------------------------------------------------------------
def rng_state():
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s):
    random.setstate(s["python"])
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


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
    st = torch.load(os.path.join(ckpt, "state.pt"), weights_only=False)
    optimizer.load_state_dict(st["optimizer"])
    if scaler.is_enabled() and st["scaler"]:     # a run saved without fp16 (or moved to fp16) starts a fresh scale
        scaler.load_state_dict(st["scaler"])
    set_rng_state(st["rng"])
    state = State(**{k: st[k] for k in ("step", "epoch", "pos", "skipped_updates")})
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
    """Start a new peak: CUDA's peak allocated, or on Linux the process's peak RSS (VmHWM)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                    # Linux >= 4.0: resets VmHWM to the current RSS
    except OSError:
        pass                                # elsewhere the peak stays the process's lifetime peak


def peak_mem_gb():
    """Peak memory since reset_peak_mem(): CUDA allocated, or RSS on CPU (model loading included
    otherwise, whose transient peak would hide the training step's)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    try:
        with open("/proc/self/status") as f:
            return int(next(line.split()[1] for line in f if line.startswith("VmHWM:"))) / 1e6   # kB
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6    # Linux reports KiB


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
        if rc:
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
    """fn(*args), its wall time added to times[name]."""
    t = time.time()
    out = fn(*args)
    times[name] = times.get(name, 0.0) + time.time() - t
    return out


def rollout_step(model, tok, batch, rollout_mode, gen_bs, cfg, times):
    """1. G samples for each prompt from the current policy (= pi_old for this step); on a GPU by default
    through a dense copy of it (4-bit dequantised, LoRA merged: rollout_copy.py), freed before the updates.
    Returns the rollout and, from a copy, log pi_sample of its tokens (for the mismatch metric)."""
    sampler = timed(times, "rollout_copy", rollout_copy.dense_copy, model) if rollout_mode == "dense" else model
    ro = timed(times, "rollout", cegppo.rollout, sampler, tok, [p for p, _ in batch], cfg.num_generations,
               cfg.max_completion_length, cfg.temperature, cfg.top_p, gen_bs)
    sample_logp = None if sampler is model else timed(times, "sampling_logprob", old_logprobs, sampler, ro, cfg, False)[0]
    return ro, sample_logp


def due(step, every, cfg):
    """Evaluation and checkpoints run every N steps and at the last step."""
    return step % every == 0 or step == cfg.max_steps


def train(cfg):
    """One run: setup, then per RL step the seven steps below, then the final adapter."""
    model, tok, params, optimizer, scaler, prompts, eval_rows, state = setup(cfg)
    out, G, gen_bs = cfg.output_dir, cfg.num_generations, cfg.generation_batch_size
    rollout_mode = rollout_copy.choose(cfg.rollout_model, model, min(gen_bs, cfg.prompts_per_step * G),
                                       cfg.max_prompt_length + cfg.max_completion_length)
    wandb_run, stop = start_wandb(cfg), catch_ctrl_c()
    bar = tqdm(total=cfg.max_steps, initial=state.step, desc="steps", dynamic_ncols=True)
    while state.step < cfg.max_steps and not stop["asked"]:
        state.step += 1
        times, t0 = {}, time.time()
        reset_peak_mem()                                 # peak_mem_gb is this step's peak
        for g in optimizer.param_groups:
            g["lr"] = lr_at(state.step, cfg)
        # 1. rollout: P prompts, G completions each
        batch = sample_prompts(prompts, state, cfg)
        ro, sample_logp = rollout_step(model, tok, batch, rollout_mode, gen_bs, cfg, times)
        gen_bs = ro["gen_batch_size"]
        # 2. reward
        answers = [a for _, a in batch for _ in range(G)]
        rewards = timed(times, "reward", score, ro["texts"], answers)
        # 3. advantages; groups whose G rewards are all equal carry no signal and are dropped
        adv, zero_std = cegppo.group_advantages(rewards, G)
        kept_groups = (~zero_std).nonzero()[:, 0]        # [K] prompts to train on
        # 4. old log-probs and entropy under the sampling policy, no gradient, once per step
        old_logp, entropy = timed(times, "old_logprob", old_logprobs, model, ro, cfg)
        # 5. several optimizer updates on mini-batches of the kept groups
        upd = timed(times, "update", update_policy, model, optimizer, scaler, params, ro, old_logp, adv,
                    rewards >= 1.0, kept_groups, cfg, state)
        # 6. log (and evaluate)
        row = metrics_row(state, cfg, ro, rewards, old_logp, entropy, adv, zero_std, kept_groups, upd, times, scaler)
        if sample_logp is not None:                      # how far the copy's sampling is from pi_old
            row.update(rollout_copy.sampling_mismatch(sample_logp, old_logp, ro["completion_mask"].cpu()))
        if eval_rows and (state.step == 1 or due(state.step, cfg.eval_steps, cfg)):
            res = evaluate(model, tok, eval_rows, max_new_tokens=cfg.max_completion_length, batch_size=gen_bs)
            row.update({"eval/accuracy": res["accuracy"], "eval/mean_length": res["mean_response_length"]})
            model.train()
        row.update({"time/step_s": time.time() - t0, "peak_mem_gb": peak_mem_gb()})
        log_step(out, row, ro, batch, answers, rewards, cfg, wandb_run, bar)
        # 7. checkpoint
        if due(state.step, cfg.save_steps, cfg) or stop["asked"]:
            save_checkpoint(out, model, optimizer, scaler, state)
    bar.close()
    return finish(model, tok, state, stop, out)


def finish(model, tok, state, stop, out):
    """The final adapter and tokenizer, or after Ctrl-C the way to resume (exit code 130)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if stop["asked"]:
        print(f"stopped at step {state.step}; checkpoint saved in {out}/checkpoint; continue with --resume",
              file=sys.stderr)
        return 130
    model.save_pretrained(out)
    tok.save_pretrained(out)
    print(f"done: {state.step} steps; adapter and tokenizer in {out}, curves in {out}/curves.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    loading.run_script(main)
