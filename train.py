"""Train a Qwen2.5 model (4-bit NF4 + LoRA) on verifiable math with CE-GPPO, on one GPU.

    python train.py                                      # CE-GPPO, Qwen2.5-1.5B-Instruct, GSM8K
    python train.py --model Qwen/Qwen2.5-0.5B-Instruct --beta1 0.75 --beta2 1.0
    python train.py --algo grpo                          # the same loop with beta1 = beta2 = 0
    python train.py --preset lab                         # CPU lab: a tiny model learns arithmetic
    python train.py --model tiny --dataset tiny          # offline smoke run (seconds, CPU)

One step, in the order the code below runs it:
  1. rollout     P prompts x G completions each, sampled at temperature T   (cegppo.rollout)
  2. reward      1 if the last \\boxed{} equals the reference, else 0         (cegppo.math_reward)
  3. advantages  z-score within each group; all-equal groups are dropped      (cegppo.group_advantages)
  4. old logp    log pi_old of every sampled token, once, with no gradient    (cegppo.completion_logprobs)
  5. updates     the rollout is split into `steps_per_generation` mini-batches, one optimizer
                 update each: after the first, the policy has moved, ratios leave 1 and the clip
                 regions fill up. That is where CE-GPPO and GRPO differ (cegppo.cegppo_loss).
  6. log, evaluate, checkpoint.

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
from cegppo import UserError


def _f(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    # model
    model: str = _f("Qwen/Qwen2.5-1.5B-Instruct", "Hub name or local folder of a causal LM; 'tiny' and 'lab' are built in code")
    load_in_4bit: bool = _f(True, "load the base weights in 4-bit NF4 (bitsandbytes); --no_load_in_4bit for bf16/fp32")
    lora_r: int = _f(16, "LoRA rank (LoRA on all linear layers, dropout 0)")
    lora_alpha: int = _f(32, "LoRA alpha")
    gradient_checkpointing: bool = _f(True, "recompute activations in the backward pass (saves memory)")
    # data
    dataset: str = _f("gsm8k", "gsm8k | math | tiny | lab | a local .jsonl/.json/.parquet file")
    question_field: Optional[str] = _f(None, "question field of a local file (default 'question')")
    answer_field: Optional[str] = _f(None, "answer field of a local file (default 'answer'; GSM8K '#### x' understood)")
    eval_dataset: Optional[str] = _f(None, "held-out set; default: the named dataset's test split, none for a local file")
    max_prompt_length: int = _f(512, "prompts longer than this (tokens) are skipped and counted")
    # algorithm
    algo: Literal["cegppo", "grpo", "dapo"] = _f("cegppo", "sets the defaults of the five knobs below")
    beta1: Optional[float] = _f(None, "gradient scale for ratio < 1-eps_low, A < 0 (NA&LP: lowers entropy); cegppo 0.5")
    beta2: Optional[float] = _f(None, "gradient scale for ratio > 1+eps_high, A > 0 (PA&LP: raises entropy); cegppo 1.0")
    epsilon_low: Optional[float] = _f(None, "lower clip range: 0.2 for all three algorithms")
    epsilon_high: Optional[float] = _f(None, "upper clip range: 0.2 (cegppo, grpo), 0.28 (dapo clip-higher)")
    dual_clip: Optional[float] = _f(None, "dual clip c for A < 0 (loss <= -c*A); 10 as in the authors' scripts; 0 = off")
    # rollout
    prompts_per_step: int = _f(8, "P: prompts per RL step")
    num_generations: int = _f(8, "G: sampled completions per prompt (the group)")
    max_completion_length: int = _f(512, "max new tokens per completion")
    temperature: float = _f(1.0, "sampling temperature (the log-probs use the same one)")
    top_p: float = _f(1.0, "nucleus sampling for the rollout (1.0 = the plain softmax, as in the paper)")
    generation_batch_size: int = _f(64, "sequences per generate() call; halves itself on out-of-memory")
    # optimisation
    steps_per_generation: int = _f(4, "optimizer updates per rollout (mini-batches); 1 would make ratio = 1 always")
    num_iterations: int = _f(1, "passes over each rollout (the paper: 1)")
    micro_batch_size: int = _f(8, "responses per forward/backward (gradient accumulation inside a mini-batch)")
    learning_rate: float = _f(1e-5, "AdamW learning rate (constant after warm-up)")
    warmup_steps: int = _f(5, "linear warm-up, in RL steps")
    weight_decay: float = _f(0.1, "AdamW weight decay (paper: 0.1)")
    max_grad_norm: float = _f(1.0, "gradient clipping")
    max_steps: int = _f(200, "RL steps")
    seed: int = _f(42, "seed for data order, sampling and LoRA init")
    # logging, evaluation, checkpoints
    output_dir: str = _f("runs/cegppo", "metrics.jsonl, samples.jsonl, curves.png, checkpoint/, final adapter")
    logging_steps: int = _f(1, "write samples.jsonl and redraw curves.png every N steps")
    eval_steps: int = _f(25, "greedy accuracy on the held-out subset every N steps (and at step 1 and the end)")
    eval_limit: int = _f(64, "size of the fixed held-out subset")
    save_steps: int = _f(25, "checkpoint every N steps (and at the end and on Ctrl-C)")
    resume: bool = _f(False, "continue from output_dir/checkpoint")
    wandb: bool = _f(False, "also log to Weights & Biases (pip install wandb)")
    preset: Optional[str] = _f(None, "'lab': the CPU lab's settings (other flags still apply on top)")


# --algo sets these five knobs unless a flag gives them explicitly. beta1 = beta2 = 0 is PPO-clip;
# with group advantages that is GRPO, and with eps_high 0.28 it is DAPO's clip-higher.
ALGOS = {
    "cegppo": dict(beta1=0.5, beta2=1.0, epsilon_low=0.2, epsilon_high=0.2, dual_clip=10.0),
    "grpo": dict(beta1=0.0, beta2=0.0, epsilon_low=0.2, epsilon_high=0.2, dual_clip=10.0),
    "dapo": dict(beta1=0.0, beta2=0.0, epsilon_low=0.2, epsilon_high=0.28, dual_clip=10.0),
}

# --preset NAME changes the defaults; flags on the command line still win.
PRESETS = {
    # the offline smoke run; `--model tiny` picks it when no other preset is named
    "tiny": dict(model="tiny", dataset="tiny", lora_r=8, lora_alpha=16, prompts_per_step=4, num_generations=4,
                 max_completion_length=28, steps_per_generation=2, micro_batch_size=8, learning_rate=5e-3,
                 warmup_steps=1, weight_decay=0.0, max_steps=4, eval_steps=2, eval_limit=8, save_steps=2,
                 output_dir="runs/tiny"),
    "lab": dict(model="lab", dataset="lab", lora_r=32, lora_alpha=64, gradient_checkpointing=False,
                prompts_per_step=8, num_generations=8, max_completion_length=24, max_prompt_length=256,
                steps_per_generation=8, num_iterations=2, micro_batch_size=32, learning_rate=1e-4, warmup_steps=10,
                weight_decay=0.0, max_steps=120, eval_steps=10, eval_limit=64, save_steps=40, logging_steps=10,
                output_dir="runs/lab"),
}

# Flags that may change between a run and its --resume; any other difference is refused.
RESUME_MAY_CHANGE = {"resume", "max_steps", "save_steps", "eval_steps", "logging_steps", "wandb", "generation_batch_size"}


def parse_config(argv=None):
    from transformers import HfArgumentParser
    parser = HfArgumentParser(Config)
    args = sys.argv[1:] if argv is None else argv
    cfg, = parser.parse_args_into_dataclasses(args=args)
    if cfg.preset is None and cfg.model == "tiny":
        cfg.preset = "tiny"
        args = [*args, "--preset", "tiny"]
    if cfg.preset:
        if cfg.preset not in PRESETS:
            raise UserError(f"--preset {cfg.preset}: unknown; use one of {', '.join(PRESETS)}")
        parser.set_defaults(**PRESETS[cfg.preset])
        cfg, = parser.parse_args_into_dataclasses(args=args)
    for k, v in ALGOS[cfg.algo].items():
        if getattr(cfg, k) is None:
            setattr(cfg, k, v)
    for name in ("prompts_per_step", "num_generations", "max_completion_length", "steps_per_generation",
                 "num_iterations", "micro_batch_size", "max_steps", "logging_steps", "eval_steps", "save_steps",
                 "generation_batch_size", "max_prompt_length"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name} {getattr(cfg, name)}: must be at least 1")
    if cfg.num_generations < 2:
        raise UserError(f"--num_generations {cfg.num_generations}: a group needs at least 2 completions")
    if cfg.temperature <= 0:
        raise UserError(f"--temperature {cfg.temperature}: RL sampling needs a temperature > 0")
    return cfg


def resolve_model(name):
    """'tiny' and 'lab' are built locally (lab.py); anything else is a Hub name or a folder."""
    import lab
    if name in ("tiny", "lab"):
        return lab.warm_start_path(name)
    return name


def lr_at(step, cfg):
    """Linear warm-up over warmup_steps RL steps, then constant (the paper's schedule)."""
    return cfg.learning_rate * min(1.0, step / max(1, cfg.warmup_steps))


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


def trim(ids, amask, cmask, P):
    """Drop the columns that are padding in every row of this micro-batch (saves compute)."""
    start = int((amask.sum(0) > 0).nonzero()[0])       # first column any row attends to
    T = int(cmask.sum(1).max())
    return ids[:, start:P + T], amask[:, start:P + T], cmask[:, :T], P - start


def rng_state():
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s):
    random.setstate(s["python"])
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save_checkpoint(out, model, optimizer, state):
    """Adapter + optimizer + step, RNG and data position, written to a temp folder and renamed."""
    final, tmp, old = (os.path.join(out, n) for n in ("checkpoint", "checkpoint.tmp", "checkpoint.old"))
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(os.path.join(tmp, "adapter"))
    torch.save({"optimizer": optimizer.state_dict(), "rng": rng_state(), **state}, os.path.join(tmp, "state.pt"))
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


def write_rows(path, rows):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(tmp, path)


def main(argv=None):
    cfg = parse_config(argv)
    out = cfg.output_dir
    os.makedirs(out, exist_ok=True)
    metrics_path = os.path.join(out, "metrics.jsonl")

    ckpt = None
    if cfg.resume:
        ckpt = find_checkpoint(out)
        if ckpt is None:
            raise UserError(f"--resume: no checkpoint in {out}")
        saved = json.load(open(os.path.join(out, "config.json")))
        for k, v in dataclasses.asdict(cfg).items():
            if k not in RESUME_MAY_CHANGE and saved.get(k) != v:
                raise UserError(f"--resume: --{k} is {v!r} here but {saved.get(k)!r} in {out}/config.json")
    elif os.path.exists(metrics_path):
        raise UserError(f"--output_dir {out}: holds a run already; pass --resume to continue it or pick a new folder")
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=2)

    # ---- data -------------------------------------------------------------------------------
    model_path = resolve_model(cfg.model)
    train_rows = cegppo.load_rows(cfg.dataset, "train", cfg.question_field, cfg.answer_field)
    eval_name = cfg.eval_dataset or (cfg.dataset if not cfg.dataset.endswith((".jsonl", ".json", ".parquet")) else None)
    eval_rows = cegppo.load_rows(eval_name, "test", cfg.question_field, cfg.answer_field, cfg.eval_limit) if eval_name else []

    # ---- model: 4-bit base + a LoRA adapter (fresh, or the checkpoint's) ----------------------
    if not torch.cuda.is_available() and cfg.model not in ("tiny", "lab"):
        print("No CUDA GPU found: running on the CPU, which is very slow for real models. "
              "For a CPU run use `python train.py --preset lab` (see README).", file=sys.stderr)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)                  # LoRA init, then sampling
    model, tok = cegppo.load_model(model_path, four_bit=cfg.load_in_4bit, lora_rank=cfg.lora_r,
                                   lora_alpha=cfg.lora_alpha, adapter=ckpt and os.path.join(ckpt, "adapter"),
                                   trainable=True, gradient_checkpointing=cfg.gradient_checkpointing)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    # fused: one kernel for all LoRA tensors instead of a few small ops per tensor (CPU and CUDA)
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=True)

    formatted = [(cegppo.format_prompt(tok, q), a) for q, a in train_rows]
    prompts = [(p, a) for p, a in formatted if len(tok(p)["input_ids"]) <= cfg.max_prompt_length]
    n_long = len(formatted) - len(prompts)
    if n_long:
        print(f"skipped {n_long} prompts longer than --max_prompt_length {cfg.max_prompt_length}", file=sys.stderr)
    if not prompts:
        raise UserError(f"--dataset {cfg.dataset}: no usable prompts")

    # ---- state that a checkpoint restores ----------------------------------------------------
    step, epoch, pos, skipped_updates = 0, 0, 0, 0
    if ckpt:
        st = torch.load(os.path.join(ckpt, "state.pt"), weights_only=False)
        optimizer.load_state_dict(st["optimizer"])
        step, epoch, pos, skipped_updates = st["step"], st["epoch"], st["pos"], st["skipped_updates"]
        set_rng_state(st["rng"])
        # rows written after the checkpoint (a crash) are redone: drop them
        rows = [json.loads(line) for line in open(metrics_path)] if os.path.exists(metrics_path) else []
        write_rows(metrics_path, [r for r in rows if r["step"] <= step])
        print(f"resumed from {ckpt} at step {step}", file=sys.stderr)
    order = list(range(len(prompts)))
    random.Random(cfg.seed + epoch).shuffle(order)

    wandb_run = None
    if cfg.wandb:
        try:
            import wandb
        except ImportError:
            raise UserError("--wandb: wandb is not installed (pip install wandb)")
        wandb_run = wandb.init(project="cegppo", name=os.path.basename(out), config=dataclasses.asdict(cfg))

    # Ctrl-C: finish the step in progress (a half-updated step cannot be checkpointed), then save.
    stop = {"asked": False}

    def on_sigint(signum, frame):
        if stop["asked"]:
            raise KeyboardInterrupt
        stop["asked"] = True
        tqdm.write("Ctrl-C: finishing this step, then saving a checkpoint (Ctrl-C again to abort)")
    signal.signal(signal.SIGINT, on_sigint)

    from eval import evaluate
    gen_bs = cfg.generation_batch_size
    G = cfg.num_generations
    bar = tqdm(total=cfg.max_steps, initial=step, desc="steps", dynamic_ncols=True)
    while step < cfg.max_steps and not stop["asked"]:
        step += 1
        t0 = time.time()
        reset_peak_mem()                             # peak_mem_gb is this step's peak
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step, cfg)

        # 1. rollout: P prompts, G samples each, from the current policy (= pi_old for this step)
        batch = []
        while len(batch) < cfg.prompts_per_step:
            if pos == len(order):
                epoch, pos = epoch + 1, 0
                order = list(range(len(prompts)))
                random.Random(cfg.seed + epoch).shuffle(order)
            batch.append(prompts[order[pos]])
            pos += 1
        ro = cegppo.rollout(model, tok, [p for p, _ in batch], G, cfg.max_completion_length,
                            cfg.temperature, cfg.top_p, gen_bs)
        gen_bs = ro["gen_batch_size"]
        t_rollout = time.time() - t0

        # 2. reward
        t1 = time.time()
        answers = [a for _, a in batch for _ in range(G)]
        rewards = torch.tensor([cegppo.math_reward(c, a) for c, a in zip(ro["texts"], answers)])
        t_reward = time.time() - t1

        # 3. advantages; groups whose G rewards are all equal carry no signal and are dropped
        adv, zero_std = cegppo.group_advantages(rewards, G)
        kept_groups = (~zero_std).nonzero()[:, 0]                          # [K] prompts to train on

        # 4. log-probs and entropy under the sampling policy, no gradient, once per step
        t2 = time.time()
        ids, amask, cmask, P = ro["input_ids"], ro["attention_mask"], ro["completion_mask"], ro["prompt_len"]
        T = cmask.shape[1]
        old_logp = torch.zeros(ids.shape[0], T)
        entropy = torch.zeros(ids.shape[0], T)
        with torch.no_grad():
            for s in range(0, ids.shape[0], cfg.micro_batch_size):
                i, a, c, p = trim(ids[s:s + cfg.micro_batch_size], amask[s:s + cfg.micro_batch_size],
                                  cmask[s:s + cfg.micro_batch_size], P)
                lp, ent = cegppo.completion_logprobs(model, i, a, p, cfg.temperature)
                old_logp[s:s + len(i), :lp.shape[1]] = lp.float().cpu()
                entropy[s:s + len(i), :lp.shape[1]] = ent.float().cpu()
        t_old = time.time() - t2

        # 5. several optimizer updates on mini-batches of the kept responses
        t3 = time.time()
        upd = {"loss": [], "grad_norm": [], "ratio_max": []}
        tok_stats, n_stat_tokens = {}, 0
        device = ids.device
        for _ in range(cfg.num_iterations):
            # Mini-batches of whole groups: a group's advantages sum to zero, so an update that saw
            # only its wrong answers would push down the tokens that right and wrong answers share.
            for groups in torch.tensor_split(kept_groups, min(cfg.steps_per_generation, max(1, len(kept_groups)))):
                if len(groups) == 0:
                    continue
                mb = (groups[:, None] * G + torch.arange(G)).flatten()         # the responses of those groups
                mb_tokens = int(cmask[mb].sum())
                loss_sum, finite = 0.0, True
                for s in range(0, len(mb), cfg.micro_batch_size):
                    idx = mb[s:s + cfg.micro_batch_size]
                    i, a, c, p = trim(ids[idx], amask[idx], cmask[idx], P)
                    lp, _ = cegppo.completion_logprobs(model, i, a, p, cfg.temperature, with_entropy=False)
                    loss, st = cegppo.cegppo_loss(
                        lp, old_logp[idx, :c.shape[1]].to(device), adv[idx].to(device), c,
                        eps_low=cfg.epsilon_low, eps_high=cfg.epsilon_high, beta1=cfg.beta1, beta2=cfg.beta2,
                        dual_clip=cfg.dual_clip, num_tokens=mb_tokens)
                    if not torch.isfinite(loss):
                        finite = False
                        break
                    loss.backward()
                    loss_sum += loss.item()
                    n = int(c.sum())
                    n_stat_tokens += n
                    for k in ("clip_frac_low", "clip_frac_high", "dual_clip_frac", "approx_kl", "ratio_mean"):
                        tok_stats[k] = tok_stats.get(k, 0.0) + st[k] * n
                    upd["ratio_max"].append(st["ratio_max"])
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm) if finite else None
                if not finite or not torch.isfinite(grad_norm):
                    # never let a nan/inf reach the weights: drop this update, keep going
                    skipped_updates += 1
                    tqdm.write(f"warning: step {step}: non-finite loss or gradient, update skipped "
                               f"({skipped_updates} so far)")
                    optimizer.zero_grad(set_to_none=True)
                    continue
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                upd["loss"].append(loss_sum)
                upd["grad_norm"].append(grad_norm.item())
        t_update = time.time() - t3

        # 6. log: one row per step, in one place
        cm = cmask.bool()
        row = {
            "step": step,
            "reward": rewards.mean().item(),
            "accuracy": (rewards > 0.5).float().mean().item(),
            "entropy": entropy[cm].mean().item(),
            **{k: tok_stats.get(k, 0.0) / max(1, n_stat_tokens)
               for k in ("clip_frac_low", "clip_frac_high", "dual_clip_frac", "approx_kl", "ratio_mean")},
            "ratio_max": max(upd["ratio_max"], default=1.0),
            "response_length": cmask.sum(1).float().mean().item(),
            "completion_tokens": int(cmask.sum()),
            "update_tokens": int(cmask[(kept_groups[:, None] * G + torch.arange(G)).flatten()].sum()) * cfg.num_iterations,
            "truncated_frac": ro["truncated"].float().mean().item(),
            "zero_std_groups": int(zero_std.sum()),
            "trained_responses": len(kept_groups) * G,
            "updates": len(upd["loss"]),
            "skipped_updates": skipped_updates,
            "loss": sum(upd["loss"]) / max(1, len(upd["loss"])),
            "grad_norm": sum(upd["grad_norm"]) / max(1, len(upd["grad_norm"])),
            "lr": lr_at(step, cfg),
            "epoch": epoch,
            **cegppo.token_quadrants(old_logp, entropy, adv, cmask),
            "rollout_time_s": t_rollout,
            "reward_time_s": t_reward,
            "old_logprob_time_s": t_old,
            "update_time_s": t_update,
        }
        if eval_rows and (step == 1 or step % cfg.eval_steps == 0 or step == cfg.max_steps):
            res = evaluate(model, tok, eval_rows, max_new_tokens=cfg.max_completion_length, batch_size=gen_bs)
            row.update({"eval/accuracy": res["accuracy"], "eval/response_length": res["mean_response_length"]})
            model.train()
        row["step_time_s"] = time.time() - t0
        row["peak_mem_gb"] = peak_mem_gb()
        with open(metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if wandb_run:
            wandb_run.log(row, step=step)
        bar.update(1)
        bar.set_postfix(reward=f"{row['reward']:.2f}", H=f"{row['entropy']:.2f}")
        ev = f" eval {row['eval/accuracy']:.3f}" if "eval/accuracy" in row else ""
        tqdm.write(f"step {step:4d} | reward {row['reward']:.3f} | entropy {row['entropy']:.3f} | "
                   f"clip low {row['clip_frac_low']:.3f} high {row['clip_frac_high']:.3f} | kl {row['approx_kl']:.1e} | "
                   f"len {row['response_length']:.0f} | {row['updates']} upd | {row['step_time_s']:.1f}s{ev}")
        if step % cfg.logging_steps == 0 or step == cfg.max_steps:
            with open(os.path.join(out, "samples.jsonl"), "a") as f:
                for j in range(min(4, len(ro["texts"]))):
                    f.write(json.dumps({"step": step, "prompt": batch[j // G][0], "completion": ro["texts"][j],
                                        "answer": answers[j], "reward": rewards[j].item()}) + "\n")
            import plot
            plot.plot_runs([out], os.path.join(out, "curves.png"))

        # 7. checkpoint
        if step % cfg.save_steps == 0 or step == cfg.max_steps or stop["asked"]:
            save_checkpoint(out, model, optimizer, {"step": step, "epoch": epoch, "pos": pos,
                                                    "skipped_updates": skipped_updates})
    bar.close()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if stop["asked"]:
        print(f"stopped at step {step}; checkpoint saved in {out}/checkpoint; continue with --resume", file=sys.stderr)
        return 130
    model.save_pretrained(out)
    tok.save_pretrained(out)
    print(f"done: {step} steps; adapter and tokenizer in {out}, curves in {out}/curves.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    cegppo.run_script(main)
