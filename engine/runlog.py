"""The bookkeeping around train.py's loop: what a step logs, how long it took and how much memory it held,
Ctrl-C, wandb, and how a run ends. Nothing here changes what the loop computes.

    Run                           one run's step bar and line, its rows and samples, Ctrl-C, wandb, its end
    Clock                         a step's phases timed (on a GPU once its queued work has run), its peak memory
    Sampled, Updates, metrics_row what a step's rounds sampled and its updates did, and its metrics.jsonl row
    timed, sync, reset_peak_mem, peak_mem_gb, peak_mem_reserved_gb   the pieces
"""

import dataclasses
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
from tqdm import tqdm

import cegppo
from engine import rows, runfiles, token_page
from engine.errors import UserError


# ----------------------------------------------------------------------------------------------
# One run
# ----------------------------------------------------------------------------------------------
class Run:
    """The bookkeeping of one train.py run: Ctrl-C caught (the step in progress finishes, then a checkpoint),
    wandb started where asked, a bar over the steps; write() logs a step, end() ends the run."""

    def __init__(self, cfg, step):
        self.cfg, self.out = cfg, cfg.output_dir
        self.wandb, self.stop = start_wandb(cfg), catch_ctrl_c()
        self.bar = tqdm(total=cfg.max_steps, initial=step, desc="steps", dynamic_ncols=True)

    def stop_asked(self):
        return self.stop["asked"]

    def start_step(self):
        """A Clock for the step that starts: its phases' times, and its peak memory from now."""
        return Clock()

    def write(self, row, sampled, tokens=None, samples=False, skipped=0):
        """Append the row to metrics.jsonl (and wandb), print the step's line (and a warning for `skipped`
        updates); with `samples`, the first four completions to samples.jsonl; with `tokens`
        (token_page.step_record), the step to tokens.jsonl and tokens.html (appended: O(the step), however
        many steps the page holds)."""
        with open(os.path.join(self.out, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb:
            self.wandb.log(row, step=row["step"])
        self.bar.update(1)
        for so_far in range(row["skipped_updates"] - skipped + 1, row["skipped_updates"] + 1):
            tqdm.write(f"warning: step {row['step']}: non-finite loss or gradient, update skipped ({so_far} so far)")
        tqdm.write(step_line(row, self.cfg))
        if samples:
            G, rewards = self.cfg.num_generations, torch.cat(sampled.rewards)
            with open(os.path.join(self.out, "samples.jsonl"), "a") as f:
                for j in range(min(4, len(sampled.texts))):
                    prompt, answer = sampled.prompts[j // G]
                    f.write(json.dumps({"step": row["step"], "prompt": prompt, "completion": sampled.texts[j],
                                        "answer": answer, "reward": rewards[j].item()}) + "\n")
        if tokens:
            record = {"step": row["step"], **tokens}
            with open(os.path.join(self.out, "tokens.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")
            token_page.add_step(self.out, record, lambda: rows.token_steps(self.out))

    def end(self, model, tokenizer, state, stopped, row=None):
        """The final adapter and tokenizer (runfiles.save_final), or after Ctrl-C the way to resume (exit code
        130), or the line of a run stopped for lack of signal (no_signal_line: exit code 3 collapsed, 4 split)."""
        self.bar.close()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if stopped:
            rc = no_signal_line(stopped, state, self.cfg, row)
            if rc:
                return rc
        if self.stop["asked"]:
            print(f"stopped at step {state.step}; checkpoint saved in {self.out}/checkpoint; continue with --resume",
                  file=sys.stderr)
            return 130
        runfiles.save_final(self.out, model, tokenizer)
        curves = f", curves in {self.out}/curves.png" if os.path.exists(os.path.join(self.out, "curves.png")) else ""
        print(f"done: {state.step} steps; adapter and tokenizer in {self.out}{curves}", file=sys.stderr)
        return 0


def step_line(row, cfg):
    """The one line a step prints; it says when fewer groups or updates than asked were possible."""
    updates = f"{row['updates']} upd" if row["updates"] == row["updates_asked"] else \
        f"{row['updates']}/{row['updates_asked']} upd"
    rounds = f" ({row['generation/rounds']} rounds)" if row["generation/rounds"] > 1 else ""
    if row["generation/groups_kept"] < cfg.prompts_per_step:       # the rounds ran out first
        rounds += f" | groups {row['generation/groups_kept']}/{cfg.prompts_per_step}"
    evaluation = f" | eval {row['eval/accuracy']:.3f}" if "eval/accuracy" in row else ""
    if cfg.entropy_target:                      # the betas cegppo.steer_betas holds the entropy with
        evaluation += f" | b1 {row['cegppo/beta1']:.2f} b2 {row['cegppo/beta2']:.2f}"
    return (f"step {row['step']:4d} | reward {row['reward']:.3f} | entropy {row['entropy']:.3f} | clip low "
            f"{row['clip_ratio/low_mean']:.3f} high {row['clip_ratio/high_mean']:.3f} | kl {row['approx_kl']:.1e} | "
            f"len {row['completions/mean_length']:.0f} | {updates}{rounds} | {row['time/step_s']:.1f}s{evaluation}")


def no_signal_line(kind, state, cfg, row):
    """The one line a run stopped by --collapse_patience ends with (after its checkpoint is saved), and its
    exit code: 0 saturated (the adapter is saved too), 3 collapsed, 4 split."""
    since = f"since step {state.last_signal_step} ({state.step - state.last_signal_step} steps"
    reward = row["reward"] if row else float("nan")
    if kind == "saturated":
        print(f"saturated: every group has scored all right {since}; last reward {reward:.3f}); stopped at "
              f"step {state.step}: these prompts have nothing left to teach (harder data, or a larger "
              "--num_generations)", file=sys.stderr)
        return 0
    if kind == "split":
        right, wrong = (row or {}).get("generation/groups_all_right", 0), (row or {}).get("generation/groups_all_wrong", 0)
        print(f"split: every group has scored all right or all wrong {since}; the last step: {right} groups all "
              f"right, {wrong} all wrong); stopped at step {state.step}, checkpoint in {cfg.output_dir}/checkpoint: "
              "the model always solves some prompts and never the others. A larger --num_generations, or data "
              "nearer its level, gives it a signal again.", file=sys.stderr)
        return SPLIT
    print(f"collapsed: no group has carried a reward signal {since}; last reward {reward:.3f}); stopped at step "
          f"{state.step}, checkpoint in {cfg.output_dir}/checkpoint. Try a lower --beta1 or --learning_rate.",
          file=sys.stderr)
    return COLLAPSED


# ----------------------------------------------------------------------------------------------
# A step's metrics
# ----------------------------------------------------------------------------------------------
@dataclass
class Sampled:
    """What every round of a step sampled, the groups later dropped included: the step's reward, entropy and
    length metrics, and the no-signal bookkeeping (collapse_patience)."""
    rewards: list = field(default_factory=list)       # [n*G] per round
    entropy: list = field(default_factory=list)       # the sampled tokens' entropies per round
    lengths: list = field(default_factory=list)
    truncated: list = field(default_factory=list)
    prompts: list = field(default_factory=list)       # (prompt, answer) of every round's prompts
    texts: list = field(default_factory=list)
    rounds: int = 0
    all_wrong: int = 0                                # groups whose G rewards were all 0
    all_right: int = 0
    surplus: int = 0                                  # informative groups beyond P, dropped
    thrown_away_s: float = 0.0                        # rollout time spent on groups not trained on
    dense_fallback: int = 0                           # the dense copy given up this step (engine/sampler.py)
    non_finite_rounds: int = 0

    def add_round(self, rollout, round_prompts, rewards, zero_std, surplus, thrown_away_s):
        """What one round sampled: rewards, entropy, lengths, the dropped groups."""
        mask = rollout.completion_mask.cpu()
        group_mean = rewards.view(len(round_prompts), -1).mean(1)
        self.rewards.append(rewards)
        self.entropy.append(rollout.sample_entropy.cpu()[mask.bool()])
        self.lengths.append(mask.sum(1).float())
        self.truncated.append(rollout.truncated.cpu())
        self.prompts += round_prompts
        self.texts += rollout.texts
        self.rounds += 1
        self.all_wrong += int((zero_std & (group_mean == 0)).sum())
        self.all_right += int((zero_std & (group_mean > 0)).sum())
        self.surplus += surplus
        self.thrown_away_s += thrown_away_s          # the round's time times its share not trained on


@dataclass
class Updates:
    """train.py's step 5's result: per optimizer update made, its losses and gradient norm; the loss's statistics
    summed over the tokens of every update (add_loss_stats); what the loss did to the recorded tokens."""
    loss: list = field(default_factory=list)
    sft_loss: list = field(default_factory=list)
    grad_norm: list = field(default_factory=list)
    ratio_max: list = field(default_factory=list)
    stat_sums: dict = field(default_factory=dict)          # cegppo.TOKEN_MEAN_STATS, each times its tokens
    stat_tokens: int = 0
    first: dict = field(default_factory=lambda: {"tokens": 0, "clipped": 0.0, "diff_sum": 0.0, "diff_max": 0.0})
    tokens: dict = field(default_factory=dict)             # row -> its tokens' log pi, ratio, region and F
    micro_batches: int = 0
    packed: int = 0                                        # micro-batches whose groups' prompts ran once
    skipped: int = 0                                       # updates not made: a non-finite loss or gradient
    learning_rate: float = 0.0
    loss_scale: Optional[float] = None                     # fp16's, after the step (None: no loss scaling)


def add_loss_stats(updates, stats, mask, logp, sample_logp):
    """A micro-batch's loss statistics into train.py's Updates, weighted by its tokens; before the first update
    is applied (the policy is still the sampler's) also how far the policy's log pi is from the sampler's
    numbers, and what the first update clipped."""
    n = int(mask.sum())
    updates.stat_tokens += n
    for k in cegppo.TOKEN_MEAN_STATS:
        updates.stat_sums[k] = updates.stat_sums.get(k, 0.0) + stats[k] * n
    updates.ratio_max.append(stats["ratio/max"])
    if not updates.loss and sample_logp is not None:           # no update applied yet: still the sampling policy
        first = updates.first
        diff = (logp.detach().float() - sample_logp.to(logp.device)).abs()[mask.bool()]
        first["tokens"] += n
        first["clipped"] += (stats["clip_ratio/low_mean"] + stats["clip_ratio/high_mean"]) * n
        first["diff_sum"] += diff.sum().item()
        first["diff_max"] = max(first["diff_max"], diff.max().item() if n else 0.0)


def metrics_row(state, cfg, groups, sampled, old, updates, knobs, clock):
    """One row of metrics.jsonl from train.py's step records; names follow TRL's GRPOTrainer where it logs the
    same quantity. Over everything sampled in the step (all rounds): reward, reward_std, frac_reward_zero_std,
    entropy, completions/*. Over the trained tokens (the kept groups): the clip ratios, approx_kl, the
    quadrants (their four fractions add up to 1), update_tokens."""
    G, n_stat, first = cfg.num_generations, max(1, updates.stat_tokens), updates.first
    rewards, lengths = torch.cat(sampled.rewards), torch.cat(sampled.lengths)
    trained = groups.rollout.completion_mask.cpu() if groups.rollout is not None else torch.zeros(0, 0)
    clipped = sum(updates.stat_sums.get(k, 0.0) for k in ("clip_ratio/low_mean", "clip_ratio/high_mean"))
    return {
        "step": state.step,
        "reward": rewards.mean().item(),
        "reward_std": rewards.view(-1, G).std(1).mean().item(),
        "frac_reward_zero_std": (sampled.all_wrong + sampled.all_right) / len(sampled.prompts),
        "entropy": torch.cat(sampled.entropy).mean().item(),
        **{k: updates.stat_sums.get(k, 0.0) / n_stat for k in cegppo.TOKEN_MEAN_STATS},
        "clip_ratio/region_mean": clipped / n_stat,
        "clip_ratio/first_update": first["clipped"] / max(1, first["tokens"]),
        "ratio/max": max(updates.ratio_max, default=1.0),
        "sampling/sampling_logp_difference/mean": first["diff_sum"] / max(1, first["tokens"]),
        "sampling/sampling_logp_difference/max": first["diff_max"],
        "sampling/old_logprobs_from_sampler": int(old.from_sampler),
        "sampling/dense_fallback": sampled.dense_fallback,
        "sampling/non_finite_rounds": sampled.non_finite_rounds,
        "shared_prefix/packed_share": updates.packed / max(1, updates.micro_batches),
        "completions/mean_length": lengths.mean().item(),
        "completions/max_length": lengths.max().item(),
        "completions/clipped_ratio": torch.cat(sampled.truncated).float().mean().item(),
        "num_tokens": int(lengths.sum()),
        "generation/rounds": sampled.rounds,
        "generation/prompts": len(sampled.prompts),
        "generation/groups_all_wrong": sampled.all_wrong,
        "generation/groups_all_right": sampled.all_right,
        "generation/groups_surplus": sampled.surplus,
        "generation/groups_kept": len(groups.prompts),
        "time/thrown_away_rollout_s": sampled.thrown_away_s,
        "update_tokens": int(trained.sum()) * cfg.num_iterations,
        "trained_responses": trained.shape[0],
        "updates": len(updates.loss),
        "updates_asked": cfg.steps_per_generation * cfg.num_iterations,
        "skipped_updates": state.skipped_updates,
        "loss": mean(updates.loss),
        "sft_loss": mean(updates.sft_loss),
        "grad_norm": mean(updates.grad_norm),
        "learning_rate": updates.learning_rate,
        **({"cegppo/beta1": knobs["beta1"], "cegppo/beta2": knobs["beta2"]} if knobs["beta1"] is not None else {}),
        "epoch": state.epoch,
        **({"loss_scale": updates.loss_scale} if updates.loss_scale is not None else {}),
        **cegppo.token_quadrants(old.logp, old.entropy, groups.advantages, trained),
        **{f"time/{k}_s": v for k, v in clock.times.items()},
        **old.correction,
    }


def mean(xs):
    return sum(xs) / max(1, len(xs))


class Clock:
    """One step's clock: time(name, fn, *args) adds fn's wall time to times[name] (on a GPU once its queued work
    has run); step_totals() the step's whole time and its peak memory. Starts the step's memory peak."""

    def __init__(self):
        sync()
        self.t0, self.times = time.time(), {}
        reset_peak_mem()                                 # peak_mem_gb is this step's peak

    def time(self, name, fn, *args):
        return timed(self.times, name, fn, *args)

    def now(self):
        return time.time()

    def step_totals(self):
        sync()
        return {"time/step_s": time.time() - self.t0, "peak_mem_gb": peak_mem_gb(),
                "peak_mem_reserved_gb": peak_mem_reserved_gb()}


# ----------------------------------------------------------------------------------------------
# Time and memory of a step
# ----------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------
# Ctrl-C and wandb
# ----------------------------------------------------------------------------------------------
def catch_ctrl_c():
    """Ctrl-C finishes the step in progress (a half-updated step cannot be checkpointed), then saves.
    A seed's process started by --jobs does the same when the process that started it is gone."""
    stop = {"asked": False}

    def on_sigint(signum, frame):
        if stop["asked"]:
            raise KeyboardInterrupt
        stop["asked"] = True
        tqdm.write("Ctrl-C: finishing this step, then saving a checkpoint (Ctrl-C again to abort)")
    signal.signal(signal.SIGINT, on_sigint)
    if hasattr(signal, "SIGBREAK"):         # Windows: how run_seed_processes passes a Ctrl-C on
        signal.signal(signal.SIGBREAK, on_sigint)
    parent = os.environ.pop(PARENT_PID, None)
    if parent:
        threading.Thread(target=_watch_parent, args=(int(parent), stop), daemon=True).start()
    return stop


PARENT_PID = "CEGPPO_JOBS_PARENT"        # set by run_seed_processes for the processes it starts
# train.py's exit codes for a run stopped by --collapse_patience whose groups were all wrong (collapsed)
# or each all right or all wrong (split): results, not failures (--seeds runs the next seed)
COLLAPSED, SPLIT = 3, 4
NO_SIGNAL_EXIT = (COLLAPSED, SPLIT)


def _watch_parent(pid, stop, every_s=1.0):
    """Ask the loop to stop (finish the step, save) once the --jobs process that started this one has
    died (killed, say): a seed must not run on unseen and then collide with a --resume. The parent's
    death shows as a new parent id (POSIX: the orphan is adopted; not on Windows, where it runs on)."""
    while os.getppid() == pid:
        time.sleep(every_s)
    stop["asked"] = True


def start_wandb(cfg):
    if not cfg.wandb:
        return None
    try:
        import wandb            # optional: only for --wandb
    except ImportError:
        raise UserError("--wandb: wandb is not installed (pip install wandb)") from None
    return wandb.init(project="cegppo", name=os.path.basename(cfg.output_dir), config=dataclasses.asdict(cfg))
