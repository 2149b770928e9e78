"""Train a Qwen2.5 model (4-bit NF4 + LoRA) on verifiable math with CE-GPPO, on one GPU.

    python train.py                                      # CE-GPPO, Qwen2.5-1.5B-Instruct, GSM8K
    python train.py --model Qwen/Qwen2.5-0.5B-Instruct --beta1 0.75 --beta2 1.0
    python train.py --algo grpo                          # the same loop with beta1 = beta2 = 0
    python train.py --preset lab                         # CPU lab: a small model learns arithmetic
    python train.py --model tiny --dataset tiny          # offline smoke run (seconds, CPU)

The file reads in the order it runs: the Config, then train() with its loop, then the step's
phases in the loop's order (their labels match the loop's comments), then setup. Checkpoints,
timing, peak memory and Ctrl-C live in runtime.py. One RL step:
  1. rollout      P prompts x G completions each, sampled at the temperature, with the sampler's
                  own log pi of every token                                    (cegppo.rollout)
  2. reward       1 if the last \\boxed{} equals the reference, else 0            (cegppo.math_reward)
  3. advantages   z-score within each group; a group whose G rewards are all equal carries no
                  signal and is dropped. Steps 1-3 repeat on further prompts until P groups
                  carry a signal (the authors' dynamic sampling; --max_generation_rounds)
  4. old log-probs  log pi_old of every kept token: the sampler's own numbers on a CPU in float32,
                  else one no-grad pass through the policy (on a GPU, in any dtype)
  5. updates      the kept groups in `steps_per_generation` mini-batches, one optimizer update each:
                  after the first, the policy has moved, ratios leave 1 and the clip regions fill
                  up. That is where CE-GPPO and GRPO differ                   (cegppo.cegppo_loss)
  6. log          one metrics row, samples and curves; evaluation every `eval_steps`
  7. checkpoint   atomic; --resume continues exactly. A run in which no group has carried a
                  signal for --collapse_patience steps saves, says why (collapsed, saturated or split)
                  and stops

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
import shared_prefix
import sizes
import token_page
from eval import evaluate
from loading import UserError
from runtime import (COLLAPSED, NO_SIGNAL_EXIT, SPLIT, GenerationProgress, catch_ctrl_c, check_resume, find_checkpoint, peak_mem_gb, peak_mem_reserved_gb, reset_peak_mem,
                     restore, run_seed_processes, save_checkpoint, save_final, start_wandb, sync, timed, write_json)


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
    algo: Literal["cegppo", "grpo", "dapo", "gppo", "cispo"] = _f("cegppo", "sets the defaults of the five loss knobs below; cispo: its own loss, which uses only --epsilon_high (weight cap 1 + eps)")
    beta1: Optional[float] = _f(None, "gradient scale in the low clip region (ratio < 1-eps_low, A < 0; NA&LP): lowers entropy")
    beta2: Optional[float] = _f(None, "gradient scale in the high clip region (ratio > 1+eps_high, A > 0; PA&LP): raises entropy")
    epsilon_low: Optional[float] = _f(None, "clip range below 1")
    epsilon_high: Optional[float] = _f(None, "clip range above 1 (DAPO's clip-higher raises it; CISPO caps its weight at 1 + it)")
    dual_clip: Optional[float] = _f(None, "dual clip c for A < 0 (loss <= -c*A), as in the authors' scripts; 0 = off")
    sft_coef: float = _f(0.0, "weight of the authors' SFT term on fully rewarded responses (their scripts: 0.1; the paper: 0)")
    # rollout
    prompts_per_step: int = _f(8, "P: prompts per RL step")
    num_generations: int = _f(8, "G: sampled completions per prompt (the group)")
    max_completion_length: int = _f(512, "max new tokens per completion")
    temperature: float = _f(1.0, "sampling temperature (the log-probs use the same one)")
    top_p: float = _f(1.0, "nucleus sampling for the rollout (1.0 = the plain softmax, as in the paper)")
    generation_batch_size: int = _f(64, "sequences per generate() call; halves itself on out-of-memory")
    rollout_model: Literal["auto", "dense", "policy"] = _f("auto", "sample from a dense copy of the policy (4-bit dequantised; LoRA merged in float32, kept apart in half precision; held while sampling) or through its 4-bit + LoRA layers; auto: dense on a GPU where it fits, else policy")
    old_logprobs: Literal["auto", "sampler", "policy"] = _f("auto", "pi_old of the sampled tokens: the sampler's own log-probs (no extra pass) or a pass through the policy; auto: the sampler's on a CPU in float32, else (any GPU) the policy's")
    sampler_correction: Literal["off", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"] = _f("sequence_mask", "where pi_old is recomputed (--old_logprobs policy, a GPU's default), weight each token's loss by pi_old / pi_sample from the sampler's own log-probs, per token or per response, truncated at the cap or set to 0 above it (TRL's default for its vLLM sampler); exactly 1 where the sampler's numbers are pi_old")
    sampler_correction_cap: float = _f(3.0, "the cap of --sampler_correction (TRL: vllm_importance_sampling_clip_max 3.0)")
    max_generation_rounds: int = _f(4, "dynamic sampling: generate again (more prompts) until P groups carry a signal, at most this many rounds per step; 1 = off")
    collapse_patience: int = _f(20, "stop (saved) after this many steps in a row in which no group carried a signal; 0 = never")
    # optimisation
    steps_per_generation: int = _f(4, "optimizer updates per pass over a rollout (mini-batches of whole groups); with 1 update in all (and num_iterations 1) the ratio is always 1 and nothing is clipped")
    num_iterations: int = _f(1, "passes over each rollout (the paper: 1)")
    micro_batch_size: int = _f(8, "responses per forward/backward (gradient accumulation inside a mini-batch)")
    shared_prefix: bool = _f(True, "encode each group's prompt once in the rollout's prefill, the old log-probs and the updates, its G completions packed behind it (the same numbers, to rounding, with less work); false: every row its own prompt")
    learning_rate: float = _f(1e-5, "AdamW learning rate (constant after warm-up)")
    warmup_steps: int = _f(5, "linear warm-up, in RL steps")
    weight_decay: float = _f(0.1, "AdamW weight decay (paper: 0.1)")
    max_grad_norm: float = _f(1.0, "gradient clipping")
    max_steps: int = _f(200, "RL steps")
    seed: int = _f(42, "seed for data order, sampling and LoRA init")
    seeds: Optional[str] = _f(None, "comma-separated seeds, e.g. 1,2,3: one run per seed, in output_dir/seed-<n>")
    jobs: int = _f(1, "with --seeds: run this many seeds at once, each in its own process, the CPU threads divided among them")
    threads: int = _f(0, "CPU threads for torch; 0 = $OMP_NUM_THREADS, else one per core")
    progress: Literal["auto", "on", "off"] = _f("auto", "a progress bar inside each rollout's and evaluation's generate() call (sequences finished, tokens): auto = on a terminal once a call has run 2 s")
    # logging, evaluation, checkpoints
    output_dir: str = _f("runs/cegppo", "metrics.jsonl, samples.jsonl, curves.png, checkpoint/, final adapter (presets: runs/<preset>)")
    logging_steps: int = _f(1, "write samples.jsonl and tokens.jsonl, redraw curves.png and add the step to tokens.html every N steps")
    token_groups: int = _f(2, "kept groups whose every token (what the update did to it) goes to tokens.jsonl / tokens.html at each logging step; 0 = none")
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
                steps_per_generation=8, num_iterations=2, micro_batch_size=32, learning_rate=5e-5, warmup_steps=10,
                epsilon_low=0.1, epsilon_high=0.1, weight_decay=0.0, max_steps=200, eval_steps=25, eval_limit=140,
                save_steps=50, logging_steps=10, output_dir="runs/lab"),
}

# Flags that may change between a run and its --resume (a run folder may move); any other difference is refused.
RESUME_MAY_CHANGE = {"resume", "seeds", "jobs", "output_dir", "max_steps", "save_steps", "eval_steps", "logging_steps", "wandb",
                     "generation_batch_size", "threads", "rollout_model", "dtype",
                     "collapse_patience", "progress", "token_groups"}
AT_LEAST_1 = ("prompts_per_step", "num_generations", "max_completion_length", "steps_per_generation", "num_iterations",
              "micro_batch_size", "max_steps", "logging_steps", "eval_steps", "save_steps", "generation_batch_size",
              "max_prompt_length", "lora_r", "lora_alpha", "max_generation_rounds", "jobs")


@dataclass
class State:
    """Where the loop is: everything a checkpoint restores besides the adapter and the optimizer."""
    step: int = 0
    epoch: int = 0                 # passes over the shuffled training prompts
    pos: int = 0                   # the next prompt of this epoch's shuffle
    skipped_updates: int = 0       # updates dropped for a non-finite gradient (fp16 overflow)
    last_signal_step: int = 0      # the last step in which some group's rewards differed (collapse_patience)
    last_no_signal: str = ""       # why the steps since last_signal_step had none: "collapsed", "saturated", "split"


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------
def train(cfg):
    """One run: setup, then per RL step the seven steps of the module docstring, then the final adapter."""
    model, tok, params, optimizer, scaler, prompts, eval_rows, state = setup(cfg)
    out, gen_batch, source = cfg.output_dir, cfg.generation_batch_size, old_logprob_source(cfg)
    sampler_kind = choose_sampler(model, cfg, source)
    wandb_run, stop = start_wandb(cfg), catch_ctrl_c()
    bar = tqdm(total=cfg.max_steps, initial=state.step, desc="steps", dynamic_ncols=True)
    row = None
    while state.step < cfg.max_steps and not stop["asked"] and not no_signal(state, cfg):   # (a resumed stop)
        state.step += 1
        sync()
        times, t0 = {}, time.time()
        reset_peak_mem()                                 # peak_mem_gb is this step's peak
        for g in optimizer.param_groups:
            g["lr"] = lr_at(state.step, cfg)
        # 1-3. rollout, reward, advantages, in rounds of prompts until P groups carry a signal
        kept, sampled = collect_groups(model, tok, prompts, sampler_kind, gen_batch, state, cfg, times)
        gen_batch, sampler_kind = sampled["gen_batch_size"], sampled["sampler_kind"]
        # 4. old log-probs and entropy of the kept tokens under the sampling policy, no gradient, and the
        #    weights that correct for the sampler's own numbers differing from them (1 where they are pi_old)
        old_logp, entropy = timed(times, "old_logprob", old_logprobs_of, model, kept["rollout"], source, cfg)
        weights, correction = sampler_weights(kept["rollout"], old_logp, cfg)
        # 5. several optimizer updates on mini-batches of the kept groups
        update_log = timed(times, "update", update_policy, model, optimizer, scaler, params, kept["rollout"],
                           old_logp, weights, kept["advantages"], kept["rewards"] >= 1.0, cfg, state)
        # 6. log (and evaluate)
        row = metrics_row(state, cfg, kept, sampled, old_logp, entropy, update_log, times, scaler, source)
        row.update(correction)
        if eval_rows and (state.step == 1 or due(state.step, cfg.eval_steps, cfg)):
            row.update(evaluate_policy(model, tok, eval_rows, gen_batch, sampler_kind, cfg))
        sync()
        row.update({"time/step_s": time.time() - t0, "peak_mem_gb": peak_mem_gb(),
                    "peak_mem_reserved_gb": peak_mem_reserved_gb()})
        state.last_signal_step = state.step if kept["prompts"] else state.last_signal_step
        state.last_no_signal = "" if kept["prompts"] else no_signal_kind(sampled, state.last_no_signal)
        stopped = no_signal(state, cfg)                  # a policy with nothing left to learn from stops
        if stopped:
            row["stopped"] = stopped                     # "collapsed", "saturated" or "split" (no_signal_kind)
        log_step(out, row, sampled, cfg, wandb_run, bar, token_record(tok, kept, old_logp, entropy, update_log, cfg))
        # 7. checkpoint
        if due(state.step, cfg.save_steps, cfg) or stop["asked"] or stopped:
            save_checkpoint(out, model, optimizer, scaler, state)
        if stopped:
            break
    bar.close()
    return finish(model, tok, state, stop, out, row, cfg)


def main(argv=None):
    """Parse the flags and train once, or once per seed of --seeds (each in output_dir/seed-<n>),
    one after another or, with --jobs N, N at a time in processes of their own."""
    cfg = parse_config(argv)
    if not cfg.seeds:
        return train(cfg)
    runs = seed_configs(cfg)
    if cfg.jobs > 1 and len(runs) > 1:
        threads = max(1, loading.thread_count(cfg.threads) // min(cfg.jobs, len(runs)))
        rc = run_seed_processes([(c.seed, [sys.executable, os.path.abspath(__file__), *config_flags(c, threads)],
                                  c.output_dir) for c in runs], cfg.jobs, cfg.max_steps)
    else:
        for c in runs:
            rc = train(c)
            if rc and rc not in NO_SIGNAL_EXIT:         # a collapsed seed is a result: the next seeds still run
                return rc
        rc = 0
    if rc == 0:
        print(f"compare the seeds with: python plot.py {cfg.output_dir}/seed-* --output seeds.png --table",
              file=sys.stderr)
    return rc


def seed_configs(cfg):
    """One Config per seed of --seeds, each in output_dir/seed-<n>; with --resume, the seeds that had
    not started yet start now. Refuses, before anything runs, a seed folder that holds a run already."""
    runs = []
    for seed in seed_list(cfg.seeds):
        out = os.path.join(cfg.output_dir, f"seed-{seed}")
        started = find_checkpoint(out) or os.path.exists(os.path.join(out, "metrics.jsonl"))
        if started and not cfg.resume:
            raise UserError(f"--output_dir {out}: holds a run already; pass --resume to continue it or pick a new folder")
        runs.append(dataclasses.replace(cfg, seed=seed, seeds=None, jobs=1, output_dir=out,
                                        resume=bool(cfg.resume and started)))
    return runs


def config_flags(cfg, threads):
    """The command-line flags that give back exactly `cfg` (every field, unset ones left out), on
    `threads` CPU threads: how --jobs starts a seed's process."""
    flags = []
    for f in dataclasses.fields(Config):
        value = threads if f.name == "threads" else getattr(cfg, f.name)
        if value is not None:
            flags += [f"--{f.name}", str(value).lower() if isinstance(value, bool) else str(value)]
    return flags


# ----------------------------------------------------------------------------------------------
# Steps 1-3: rollout, reward, advantages (in rounds: dynamic sampling)
# ----------------------------------------------------------------------------------------------
def collect_groups(model, tok, prompts, sampler_kind, gen_batch, state, cfg, times):
    """1-3. Rollout, reward and advantages, in rounds, until P groups carry a signal.

    A group whose G rewards are all equal has advantage 0 everywhere: no gradient. The authors
    (DAPO's dynamic sampling, which CE-GPPO's runs use) sample more prompts and generate again
    until the step holds P groups that do carry a signal; here at most max_generation_rounds
    rounds, each on the next prompts of the seeded order. An extra round asks for as many prompts
    as the missing groups need at the signal rate seen so far (at most P); informative groups
    beyond P are dropped. Returns the kept groups (one rollout, with their prompts, rewards and
    advantages) and what was sampled in all rounds (for the metrics).
    """
    P, G = cfg.prompts_per_step, cfg.num_generations
    groups = []                                          # (rollout, group index, prompt, rewards, advantages)
    sampled = {"rewards": [], "entropy": [], "lengths": [], "truncated": [], "prompts": [], "texts": [],
               "rounds": 0, "all_wrong": 0, "all_right": 0, "surplus": 0, "thrown_away_s": 0.0, "dense_fallback": 0,
               "non_finite_rounds": 0}
    sampler, failure = model, None
    if sampler_kind == "dense":
        try:
            sampler = timed(times, "rollout_copy", rollout_copy.dense_copy, model)
        except torch.OutOfMemoryError as e:
            failure = without_frames(e)
    if failure is not None:                              # outside the except: the half-built copy is gone
        give_up_dense_copy(failure, None, state.step)
        sampled["dense_fallback"] = 1
    while len(groups) < P and sampled["rounds"] < cfg.max_generation_rounds:
        signal_rate = len(groups) / max(1, len(sampled["prompts"]))
        n = P if not sampled["rounds"] else min(P, math.ceil((P - len(groups)) / max(signal_rate, 1 / P)))
        t0 = time.time()
        # 1. rollout: n prompts, G completions each (a dense copy that fails is given up for the policy)
        round_prompts = sample_prompts(prompts, state, cfg, n)
        rollout, sampler = sample_round(model, sampler, tok, round_prompts, gen_batch, cfg, times, sampled, state.step)
        if rollout is None:            # non-finite through the policy: these prompts skipped, the round not used up
            continue
        gen_batch = rollout["gen_batch_size"]
        # 2. reward
        answers = [a for _, a in round_prompts for _ in range(G)]
        rewards = timed(times, "reward", score, rollout["texts"], answers)                  # [n*G]
        # 3. advantages: a z-score within each group; all-equal groups get 0 and are dropped
        advantages, zero_std = cegppo.group_advantages(rewards, G)                          # [n*G], [n]
        informative = (~zero_std).nonzero()[:, 0].tolist()
        take = informative[:P - len(groups)]
        groups += [(rollout, g, round_prompts[g], rewards[g * G:(g + 1) * G], advantages[g * G:(g + 1) * G])
                   for g in take]
        count_round(sampled, rollout, round_prompts, rewards, zero_std, len(informative) - len(take),
                    (time.time() - t0) * (1 - len(take) / n))
    if sampler is not model:
        rollout_copy.release(sampler)                   # its memory goes back before the updates
    del sampler
    sampled.update({k: torch.cat(sampled[k]) for k in ("rewards", "entropy", "lengths", "truncated")},
                   gen_batch_size=gen_batch, sampler_kind="policy" if sampled["dense_fallback"] else sampler_kind)
    kept = {"rollout": merge_groups([(r, g) for r, g, *_ in groups], G, tok.pad_token_id),
            "prompts": [p for _, _, p, _, _ in groups],
            "rewards": torch.cat([r for *_, r, _ in groups]) if groups else torch.zeros(0),
            "advantages": torch.cat([a for *_, a in groups]) if groups else torch.zeros(0)}
    return kept, sampled


NON_FINITE_ROUNDS = 3   # non-finite rounds through the policy in one step before the run stops


def sample_round(model, sampler, tok, round_prompts, gen_batch, cfg, times, sampled, step):
    """1. One round's rollout, and the sampler for the next: a dense copy that runs out of memory or
    gives non-finite probabilities is given up for the policy (said once, sampling/dense_fallback);
    through the policy non-finite logits (an fp16 overflow) skip the round's prompts (None, counted
    in sampling/non_finite_rounds; the round is not used up), and NON_FINITE_ROUNDS in one step stop
    the run with one line, since the overflow is then the model's, not a sample's."""
    for attempt in range(2):                            # the sampler, then the policy if that was a copy
        failure = None
        try:
            return rollout_step(model, sampler, tok, round_prompts, gen_batch, cfg, times), sampler
        except (torch.OutOfMemoryError, cegppo.NonFiniteLogits) as e:
            if sampler is model and isinstance(e, torch.OutOfMemoryError):
                raise
            failure = without_frames(e)
        if sampler is not model:       # outside the except: the failed generate()'s frames are gone
            give_up_dense_copy(failure, sampler, step)
            sampler, sampled["dense_fallback"] = model, 1
            continue
        break
    sampled["non_finite_rounds"] += 1
    if sampled["non_finite_rounds"] >= NON_FINITE_ROUNDS:
        raise UserError(f"step {step}: the policy's sampling logits were not finite in {NON_FINITE_ROUNDS} rounds "
                        "(an fp16 overflow); --resume (from the last checkpoint) with --dtype bf16 on a GPU that has "
                        "it, or --dtype fp32")
    tqdm.write(f"warning: step {step}: the policy's sampling logits are not finite (an fp16 overflow?); "
               "this round's prompts are skipped")
    return None, sampler


def sample_prompts(prompts, state, cfg, n):
    """1. The next n prompts of a seeded shuffle; a new shuffle each epoch (resumable from state)."""
    picked = []
    while len(picked) < n:
        if state.pos == len(prompts):
            state.epoch, state.pos = state.epoch + 1, 0
        order = list(range(len(prompts)))
        random.Random(cfg.seed + state.epoch).shuffle(order)
        picked.append(prompts[order[state.pos]])
        state.pos += 1
    return picked


def rollout_step(model, sampler, tok, round_prompts, gen_batch, cfg, times):
    """1. G samples for each prompt from the current policy (= pi_old for this step), with the
    sampler's own log-probs of its tokens. `sampler` is the policy itself or, on a GPU by default,
    a dense copy of it (rollout_copy.py). A copy that runs out of memory is given up at once
    (freeing it gives back far more than halving the generation batch would)."""
    ticker = GenerationProgress("rollout", len(round_prompts) * cfg.num_generations, cegppo.eos_ids(tok, sampler),
                                cfg.progress)
    try:
        with loading.model_autocast(model):        # the policy's compute dtype on a GPU, also for the copy
            return timed(times, "rollout", cegppo.rollout, sampler, tok, [p for p, _ in round_prompts],
                         cfg.num_generations, cfg.max_completion_length, cfg.temperature, cfg.top_p, gen_batch,
                         sampler is model, ticker.processors(), cfg.shared_prefix)
    finally:
        ticker.close()                             # also when generate() fails (the copy's fallback retries)


def without_frames(error):
    """The exception without its traceback. A traceback holds the frames of the call that failed, and
    with them every tensor that call had allocated (a half-built copy, a generate()'s cache): kept
    beside the fallback, they would stay allocated while it runs, and empty_cache() could not return them."""
    return error.with_traceback(None)


def give_up_dense_copy(error, copy, step):
    """The dense copy ran out of memory or produced non-finite probabilities (fp16 overflow): free
    it and sample through the 4-bit policy from now on. Said once; counted in sampling/dense_fallback."""
    why = "out of memory" if isinstance(error, torch.OutOfMemoryError) else "non-finite probabilities"
    tqdm.write(f"warning: step {step}: the dense rollout copy hit {why}; sampling through the 4-bit policy "
               "from now on (as --rollout_model policy)")
    if copy is not None:
        rollout_copy.release(copy)
    elif torch.cuda.is_available():
        torch.cuda.empty_cache()                       # what a half-built copy had allocated


def score(texts, answers):
    """2. The verifiable reward of every completion: [B] floats."""
    return torch.tensor([cegppo.math_reward(c, a) for c, a in zip(texts, answers)])


def count_round(sampled, rollout, round_prompts, rewards, zero_std, surplus, thrown_away_s):
    """What one round sampled, for the metrics: rewards, entropy, lengths, the dropped groups."""
    mask = rollout["completion_mask"].cpu()
    group_mean = rewards.view(len(round_prompts), -1).mean(1)
    sampled["rewards"].append(rewards)
    sampled["entropy"].append(rollout["sample_entropy"].cpu()[mask.bool()])
    sampled["lengths"].append(mask.sum(1).float())
    sampled["truncated"].append(rollout["truncated"].cpu())
    sampled["prompts"] += round_prompts
    sampled["texts"] += rollout["texts"]
    sampled["rounds"] += 1
    sampled["all_wrong"] += int((zero_std & (group_mean == 0)).sum())
    sampled["all_right"] += int((zero_std & (group_mean > 0)).sum())
    sampled["surplus"] += surplus
    sampled["thrown_away_s"] += thrown_away_s          # the round's time times its share not trained on


def merge_groups(parts, G, pad):
    """One rollout of the groups [(rollout, group index)], possibly from several rounds: prompts
    left-padded to the longest prompt, completions right-padded to the longest completion."""
    if not parts:
        return None
    L = max(r["prompt_len"] for r, _ in parts)
    T = max(r["completion_mask"].shape[1] for r, _ in parts)
    cols = {k: [] for k in ("input_ids", "attention_mask", "completion_mask", "truncated", "sample_logp",
                            "sample_entropy", "texts")}
    for r, g in parts:
        rows, p, t = slice(g * G, (g + 1) * G), r["prompt_len"], r["completion_mask"].shape[1]
        for k, value in (("input_ids", pad), ("attention_mask", 0)):
            cols[k].append(torch.cat([F.pad(r[k][rows, :p], (L - p, 0), value=value),
                                      F.pad(r[k][rows, p:], (0, T - t), value=value)], 1))
        for k in ("completion_mask", "sample_logp", "sample_entropy"):
            cols[k].append(F.pad(r[k][rows], (0, T - t)))
        cols["truncated"].append(r["truncated"][rows])
        cols["texts"] += r["texts"][rows]
    return {**{k: v if k == "texts" else torch.cat(v) for k, v in cols.items()}, "prompt_len": L}


# ----------------------------------------------------------------------------------------------
# Step 4: old log-probs
# ----------------------------------------------------------------------------------------------
def old_logprob_source(cfg):
    """'sampler' or 'policy' for --old_logprobs. auto: the sampler's own log-probs where it computes in
    float32 (a CPU), where they equal the policy's to rounding (measured: at most a few 1e-6 in
    log-prob, so the first update's ratio is 1 to 1e-5, far inside any clip range); the policy's
    where half-precision decoding differs from the training forward by far more (a GPU)."""
    if cfg.old_logprobs != "auto":
        return cfg.old_logprobs
    on_cpu_in_fp32 = not torch.cuda.is_available() and loading.compute_dtype(cfg.dtype) == torch.float32
    return "sampler" if on_cpu_in_fp32 else "policy"


def old_logprobs_of(model, rollout, source, cfg):
    """4. log pi_old and the entropy of every kept token, [K*G, T] each on the CPU: the sampler's own
    numbers (no pass at all), or one no-grad pass through the policy (old_logprobs)."""
    if rollout is None:
        return torch.zeros(0, 0), torch.zeros(0, 0)
    if source == "sampler":
        return rollout["sample_logp"].float().cpu(), rollout["sample_entropy"].float().cpu()
    return old_logprobs(model, rollout, cfg)


@torch.no_grad()
def old_logprobs(model, rollout, cfg, with_entropy=True):
    """4. log pi_old and the entropy of every sampled token through the policy, in exactly the
    micro-batches the updates will score (update_partition): [B, T] each, on the CPU."""
    B, T = rollout["completion_mask"].shape
    old_logp, entropy = torch.zeros(B, T), torch.zeros(B, T)
    for idx in (idx for mini_batch in update_partition(rollout, cfg) for idx in mini_batch):
        with loading.model_autocast(model):            # the same precision path as the updates': ratio 1
            logp, ent, _ = micro_batch_logprobs(model, micro_batch(rollout, idx), cfg, with_entropy)
        old_logp[idx, :logp.shape[1]] = logp.float().cpu()
        entropy[idx, :logp.shape[1]] = ent.float().cpu()
    return old_logp, entropy


def micro_batch_logprobs(model, batch, cfg, with_entropy):
    """(log pi, entropy, packed): a micro-batch's completion tokens, [b, T] each, and whether they were
    packed. With --shared_prefix each group's prompt once (shared_prefix.py: the same numbers, to
    rounding, for less work) where that costs at most 0.9 of the plain layout, else the plain
    definition (cegppo.completion_logprobs). The old log-probs and the updates score the same
    micro-batches, so they take the same path."""
    input_ids, attention_mask, completion_mask, prompt_len = batch
    if cfg.shared_prefix:
        why = shared_prefix.unsupported(model.config)
        if why is None:
            packed = shared_prefix.pack(input_ids, attention_mask, completion_mask, prompt_len)
            if shared_prefix.worth_it(packed, input_ids, model.config):
                return (*shared_prefix.completion_logprobs(model, packed, completion_mask, cfg.temperature,
                                                           with_entropy=with_entropy), True)
            why = "packing does not pay for some micro-batches (prompts short beside long completions)"
        if (cfg.output_dir, why) not in _PLAIN_SAID:
            _PLAIN_SAID.add((cfg.output_dir, why))
            tqdm.write(f"shared prefix: {why}; those micro-batches are scored in the plain layout "
                       "(shared_prefix/packed_share)")
    return (*cegppo.completion_logprobs(model, input_ids, attention_mask, prompt_len, cfg.temperature,
                                        with_entropy=with_entropy), False)


_PLAIN_SAID = set()      # (output folder, why): said once per run


def update_partition(rollout, cfg):
    """The kept rows as the updates take them: a list of mini-batches (whole groups, steps_per_generation
    of them), each a list of micro-batches (micro_batch_size rows of it, as index tensors). The old
    log-probs are scored in exactly these micro-batches: on a GPU the kernels, and so the rounding,
    depend on a batch's shape, and only the same shapes make the first update's ratio 1 exactly."""
    G = cfg.num_generations
    groups = torch.arange(0 if rollout is None else rollout["input_ids"].shape[0] // G)
    return [list(torch.split((mini_batch[:, None] * G + torch.arange(G)).flatten(), cfg.micro_batch_size))
            for mini_batch in torch.tensor_split(groups, min(cfg.steps_per_generation, max(1, len(groups))))
            if len(mini_batch)]


def sampler_weights(rollout, old_logp, cfg):
    """4. The weights [B, T] of each kept token's loss term that correct for the sampler's numbers
    differing from pi_old (cegppo.sampler_correction; --sampler_correction), and their statistics."""
    if rollout is None:
        return torch.zeros(0, 0), {}
    sample = rollout["sample_logp"].float().cpu()
    return cegppo.sampler_correction(old_logp, sample[:, :old_logp.shape[1]], rollout["completion_mask"].cpu(),
                                     cfg.sampler_correction, cfg.sampler_correction_cap)


def micro_batch(rollout, rows):
    """The rows of a rollout, without the columns that are padding in all of them (saves compute):
    (input_ids, attention_mask, completion_mask, prompt_len)."""
    input_ids, attention_mask = rollout["input_ids"][rows], rollout["attention_mask"][rows]
    completion_mask, prompt_len = rollout["completion_mask"][rows], rollout["prompt_len"]
    start = int((attention_mask.sum(0) > 0).nonzero()[0])     # the first column any row attends to
    T = int(completion_mask.sum(1).max())
    return (input_ids[:, start:prompt_len + T], attention_mask[:, start:prompt_len + T], completion_mask[:, :T],
            prompt_len - start)


# ----------------------------------------------------------------------------------------------
# Step 5: the updates
# ----------------------------------------------------------------------------------------------
def update_policy(model, optimizer, scaler, params, rollout, old_logp, weights, advantages, positive, cfg, state):
    """5. `steps_per_generation` optimizer updates per pass over the kept groups, `num_iterations` passes.

    Mini-batches are whole groups: a group's advantages sum to zero, so an update that saw only its
    wrong answers would push down the tokens that right and wrong answers share.
    Returns the per-update losses and grad norms and the token-weighted loss statistics.
    """
    log = {"loss": [], "sft_loss": [], "grad_norm": [], "ratio/max": [], "stat_sums": {}, "stat_tokens": 0,
           "first_update": {"tokens": 0, "clipped": 0.0, "diff_sum": 0.0, "diff_max": 0.0}, "tokens": {},
           "micro_batches": 0, "packed": 0}
    model.train()          # whatever ran before (a rollout cut short): checkpointing works in train mode only
    for it in range(cfg.num_iterations):
        for micro_batches in update_partition(rollout, cfg):      # a mini-batch: whole groups
            # tokens.jsonl: what the last pass's update did to each token of the first token_groups groups
            record = logged(state.step, cfg) and it == cfg.num_iterations - 1
            losses = accumulate_gradients(model, scaler, rollout, micro_batches, old_logp, weights, advantages, positive,
                                          cfg, log, cfg.token_groups * cfg.num_generations if record else 0)
            if optimizer_step(optimizer, scaler, params, cfg, losses, log):
                continue
            for row in torch.cat(micro_batches).tolist():      # what the loss did, for an update not made
                log["tokens"].pop(row, None)
            state.skipped_updates += 1
            tqdm.write(f"warning: step {state.step}: non-finite loss or gradient, update skipped "
                       f"({state.skipped_updates} so far)")
    return log


def accumulate_gradients(model, scaler, rollout, micro_batches, old_logp, weights, advantages, positive, cfg, log,
                         record_below=0):
    """Forward and backward over one mini-batch, micro-batch by micro-batch (update_partition); returns
    (policy, sft) loss sums or None. The rows below `record_below` leave what the loss did to each of
    their tokens in log["tokens"]."""
    mask, rows = rollout["completion_mask"], torch.cat(micro_batches)
    mini_batch_tokens, positive_tokens = int(mask[rows].sum()), int(mask[rows][positive[rows]].sum())
    device = rollout["input_ids"].device
    policy_sum, sft_sum = 0.0, 0.0
    for idx in micro_batches:
        batch = micro_batch(rollout, idx)
        completion_mask = batch[2]
        T = completion_mask.shape[1]
        with loading.model_autocast(model):            # the forward in half precision on a GPU; the loss in fp32
            logp, _, packed = micro_batch_logprobs(model, batch, cfg, with_entropy=False)
        log["micro_batches"], log["packed"] = log["micro_batches"] + 1, log["packed"] + packed
        record = [j for j, row in enumerate(idx.tolist()) if row < record_below]
        loss, stats, *details = cegppo.policy_loss(cfg.algo, logp, old_logp[idx, :T].to(device), advantages[idx].to(device),
                                                   completion_mask, num_tokens=mini_batch_tokens, tokens=bool(record),
                                                   token_weights=weights[idx, :T].to(device), **loss_knobs(cfg))
        sft = cegppo.positive_sft_loss(logp, completion_mask, positive[idx].to(device), num_tokens=positive_tokens,
                                       token_weights=weights[idx, :T].to(device))
        total = loss + cfg.sft_coef * sft if cfg.sft_coef else loss
        if not torch.isfinite(total):
            return None
        scaler.scale(total).backward()
        policy_sum, sft_sum = policy_sum + loss.item(), sft_sum + sft.item()
        n = int(completion_mask.sum())
        log["stat_tokens"] += n
        for k in cegppo.TOKEN_MEAN_STATS:
            log["stat_sums"][k] = log["stat_sums"].get(k, 0.0) + stats[k] * n
        log["ratio/max"].append(stats["ratio/max"])
        for j in record:                                 # the loss's own numbers, no extra pass
            log["tokens"][int(idx[j])] = {"logp": logp[j].detach().float().cpu(),
                                          **{k: v[j].float().cpu() for k, v in details[0].items()}}
        if not log["loss"] and "sample_logp" in rollout:   # no update applied yet: still the sampling policy
            first, sample_logp = log["first_update"], rollout["sample_logp"][idx, :T].to(device)
            diff = (logp.detach().float() - sample_logp).abs()[completion_mask.bool()]
            first["tokens"] += n
            first["clipped"] += (stats["clip_ratio/low_mean"] + stats["clip_ratio/high_mean"]) * n
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


# ----------------------------------------------------------------------------------------------
# Step 6: log and evaluate
# ----------------------------------------------------------------------------------------------
def metrics_row(state, cfg, kept, sampled, old_logp, entropy, update_log, times, scaler, source):
    """6. One row of metrics.jsonl; names follow TRL's GRPOTrainer where it logs the same quantity.

    Over everything sampled in the step (all rounds): reward, reward_std, frac_reward_zero_std,
    entropy, completions/*. Over the trained tokens (the kept groups): the clip ratios, approx_kl,
    the quadrants (their four fractions add up to 1), update_tokens."""
    G, rewards, upd = cfg.num_generations, sampled["rewards"], update_log
    trained = kept["rollout"]["completion_mask"].cpu() if kept["rollout"] is not None else torch.zeros(0, 0)
    first, n_stat = upd["first_update"], max(1, upd["stat_tokens"])
    return {
        "step": state.step,
        "reward": rewards.mean().item(),
        "reward_std": rewards.view(-1, G).std(1).mean().item(),
        "frac_reward_zero_std": (sampled["all_wrong"] + sampled["all_right"]) / len(sampled["prompts"]),
        "entropy": sampled["entropy"].mean().item(),
        **{k: upd["stat_sums"].get(k, 0.0) / n_stat for k in cegppo.TOKEN_MEAN_STATS},
        "clip_ratio/region_mean": sum(upd["stat_sums"].get(k, 0.0) for k in
                                      ("clip_ratio/low_mean", "clip_ratio/high_mean")) / n_stat,
        "clip_ratio/first_update": first["clipped"] / max(1, first["tokens"]),
        "ratio/max": max(upd["ratio/max"], default=1.0),
        "sampling/sampling_logp_difference/mean": first["diff_sum"] / max(1, first["tokens"]),
        "sampling/sampling_logp_difference/max": first["diff_max"],
        "sampling/old_logprobs_from_sampler": int(source == "sampler"),
        "sampling/dense_fallback": sampled["dense_fallback"],
        "sampling/non_finite_rounds": sampled["non_finite_rounds"],
        "shared_prefix/packed_share": upd["packed"] / max(1, upd["micro_batches"]),
        "completions/mean_length": sampled["lengths"].mean().item(),
        "completions/max_length": sampled["lengths"].max().item(),
        "completions/clipped_ratio": sampled["truncated"].float().mean().item(),
        "num_tokens": int(sampled["lengths"].sum()),
        "generation/rounds": sampled["rounds"],
        "generation/prompts": len(sampled["prompts"]),
        "generation/groups_all_wrong": sampled["all_wrong"],
        "generation/groups_all_right": sampled["all_right"],
        "generation/groups_surplus": sampled["surplus"],
        "generation/groups_kept": len(kept["prompts"]),
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
        **cegppo.token_quadrants(old_logp, entropy, kept["advantages"], trained),
        **{f"time/{k}_s": v for k, v in times.items()},
    }


def _mean(xs):
    return sum(xs) / max(1, len(xs))


def evaluate_policy(model, tok, eval_rows, gen_batch, sampler_kind, cfg):
    """6. Greedy accuracy on the fixed held-out subset, generated by what the rollout samples from: the
    dense copy where it is used (built for the evaluation and freed after it), else the policy; a copy
    that runs out of memory or overflows is given up for the policy (rollout_copy.with_fallback). Logits
    that are not finite through the policy too are not scored: said, and counted in eval/non_finite."""
    try:
        res = rollout_copy.with_fallback(
            model, sampler_kind == "dense",
            lambda m: evaluate(m, tok, eval_rows, max_new_tokens=cfg.max_completion_length, batch_size=gen_batch,
                               generation_progress=cfg.progress),
            lambda line: tqdm.write(f"warning: evaluation: {line}"))
    except cegppo.NonFiniteLogits as e:
        tqdm.write(f"warning: evaluation: {e}")
        return {"eval/non_finite": len(e.rows)}
    return {"eval/accuracy": res["accuracy"], "eval/mean_length": res["mean_response_length"]}


def token_record(tok, kept, old_logp, entropy, update_log, cfg):
    """6. tokens.jsonl's row of a logging step, or None: every token of the groups the update recorded
    (update_policy; whole groups), with what the loss did to it (cegppo.token_details) and its quadrant."""
    recorded, G, ro = update_log["tokens"], cfg.num_generations, kept["rollout"]
    if not recorded:
        return None
    adv = kept["advantages"][:, None].expand_as(old_logp)                                # [B, T]
    quadrant = cegppo.quadrant_of(old_logp, entropy, adv)                               # [B, T]
    groups = []
    for g in sorted({b // G for b in recorded}):        # whole groups: mini-batches are (update_policy)
        completions = []
        for b in range(g * G, (g + 1) * G):
            n, r = int(ro["completion_mask"][b].sum()), recorded[b]
            ids = ro["input_ids"][b, ro["prompt_len"]:ro["prompt_len"] + n].tolist()
            completions.append({"reward": kept["rewards"][b].item(), "advantage": round(kept["advantages"][b].item(), 4),
                                "tokens": tok.batch_decode([[i] for i in ids]),
                                "old_logp": _rounded(old_logp[b, :n], 6), "logp": _rounded(r["logp"][:n], 6),
                                "ratio": _rounded(r["ratio"][:n]), "entropy": _rounded(entropy[b, :n]),
                                "quadrant": quadrant[b, :n].tolist(), "region": r["region"][:n].int().tolist(),
                                "F": _rounded(r["weight"][:n])})
        prompt, answer = kept["prompts"][g]
        groups.append({"prompt": prompt, "answer": answer, "completions": completions})
    return {"algo": cfg.algo, "beta1": cfg.beta1, "beta2": cfg.beta2, "epsilon_low": cfg.epsilon_low,
            "epsilon_high": cfg.epsilon_high, "num_iterations": cfg.num_iterations, "groups": groups}


def _rounded(t, digits=4):
    """`digits` significant digits (6 for the log-probs, whose difference is the ratio's log): what a
    page shows, at a third of the size of full floats."""
    return [float(f"{x:.{digits}g}") for x in t.tolist()]


def log_step(out, row, sampled, cfg, wandb_run, bar, tokens=None):
    """6. Append the row, print one line; every logging_steps write samples and tokens, redraw the curves
    and add the step to the token page (appended: O(the step), however many steps it holds)."""
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")
    if wandb_run:
        wandb_run.log(row, step=row["step"])
    bar.update(1)
    tqdm.write(step_line(row, cfg))
    if not logged(row["step"], cfg):
        return
    G = cfg.num_generations
    with open(os.path.join(out, "samples.jsonl"), "a") as f:
        for j in range(min(4, len(sampled["texts"]))):
            prompt, answer = sampled["prompts"][j // G]
            f.write(json.dumps({"step": row["step"], "prompt": prompt, "completion": sampled["texts"][j],
                                "answer": answer, "reward": sampled["rewards"][j].item()}) + "\n")
    plot.plot_runs([out], os.path.join(out, "curves.png"))
    if tokens:
        record = {"step": row["step"], **tokens}
        with open(os.path.join(out, "tokens.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        token_page.add_step(out, record, lambda: plot.token_steps(out))


def logged(step, cfg):
    """Do samples, tokens and the pictures get written at this step (every logging_steps, and the last)?"""
    return step % cfg.logging_steps == 0 or step == cfg.max_steps


def step_line(row, cfg):
    """The one line a step prints; it says when fewer groups or updates than asked were possible."""
    updates = f"{row['updates']} upd" if row["updates"] == row["updates_asked"] else \
        f"{row['updates']}/{row['updates_asked']} upd"
    rounds = f" ({row['generation/rounds']} rounds)" if row["generation/rounds"] > 1 else ""
    if row["generation/groups_kept"] < cfg.prompts_per_step:       # the rounds ran out first
        rounds += f" | groups {row['generation/groups_kept']}/{cfg.prompts_per_step}"
    evaluation = f" | eval {row['eval/accuracy']:.3f}" if "eval/accuracy" in row else ""
    return (f"step {row['step']:4d} | reward {row['reward']:.3f} | entropy {row['entropy']:.3f} | clip low "
            f"{row['clip_ratio/low_mean']:.3f} high {row['clip_ratio/high_mean']:.3f} | kl {row['approx_kl']:.1e} | "
            f"len {row['completions/mean_length']:.0f} | {updates}{rounds} | {row['time/step_s']:.1f}s{evaluation}")


# ----------------------------------------------------------------------------------------------
# Step 7 and the end of a run (the checkpoint itself: runtime.save_checkpoint)
# ----------------------------------------------------------------------------------------------
def due(step, every, cfg):
    """Evaluation and checkpoints run every N steps and at the last step."""
    return step % every == 0 or step == cfg.max_steps


def no_signal_kind(sampled, before=""):
    """Why the steps without a signal had none, this step's groups added to what the steps `before` it
    (since the last signal) had: every group all wrong ("collapsed": nothing is ever rewarded), all
    right ("saturated": nothing left to learn), or each group one or the other ("split": the prompts
    it always solves and the ones it never does), in one step or across them."""
    this = "collapsed" if not sampled["all_right"] else "saturated" if not sampled["all_wrong"] else "split"
    return this if before in ("", this) else "split"


def no_signal(state, cfg):
    """None, or why the run stops: no group has carried a signal for collapse_patience steps (their
    no_signal_kind)."""
    if not cfg.collapse_patience or state.step - state.last_signal_step < cfg.collapse_patience:
        return None
    return state.last_no_signal or "collapsed"


def collapse(state, cfg, row):
    """The one line a run stopped by collapse_patience ends with (after its checkpoint is saved), and
    its exit code: 0 saturated (the adapter is saved too), 3 collapsed, 4 split."""
    since = f"since step {state.last_signal_step} ({state.step - state.last_signal_step} steps"
    reward = row["reward"] if row else float("nan")
    kind = no_signal(state, cfg)
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


def finish(model, tok, state, stop, out, row=None, cfg=None):
    """The final adapter and tokenizer, or after Ctrl-C the way to resume (exit code 130), or the
    line of a run stopped by collapse_patience (exit code 3 when it collapsed, 4 when it split)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if cfg is not None and no_signal(state, cfg):
        rc = collapse(state, cfg, row)
        if rc:
            return rc
    if stop["asked"]:
        print(f"stopped at step {state.step}; checkpoint saved in {out}/checkpoint; continue with --resume",
              file=sys.stderr)
        return 130
    save_final(out, model, tok)
    curves = f", curves in {out}/curves.png" if os.path.exists(os.path.join(out, "curves.png")) else ""
    print(f"done: {state.step} steps; adapter and tokenizer in {out}{curves}", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------------------------
# Setup: flags -> Config (checked before anything is loaded or written), data, model, optimizer
# ----------------------------------------------------------------------------------------------
def loss_knobs(cfg):
    """The five loss knobs of cfg (cegppo.ALGOS' keys), as the loss takes them."""
    return {k: getattr(cfg, k) for k in cegppo.ALGOS["cegppo"]}


def _default_text(f):
    """What --help shows as a flag's default: the algorithms' values for the loss knobs (- where unused)."""
    if f.name in cegppo.ALGOS["cegppo"]:
        return ", ".join(f"{a} {'-' if v[f.name] is None else format(v[f.name], 'g')}" for a, v in cegppo.ALGOS.items())
    return "unset" if f.default is None else str(f.default)


def parse_config(argv=None):
    """Config from flags: a preset's defaults, then the flags, then --algo's loss knobs, then checks."""
    parser = loading.dataclass_parser(Config, __doc__.splitlines()[0], _default_text, {"preset": list(PRESETS)})
    given = vars(parser.parse_args(sys.argv[1:] if argv is None else argv))
    preset = given.get("preset") or ("tiny" if given.get("model") == "tiny" else None)
    cfg = Config(**{**PRESETS.get(preset, {}), **given, "preset": preset})
    for k, v in cegppo.ALGOS[cfg.algo].items():
        if v is None and k in given:                     # a knob this algorithm's loss does not have
            raise UserError(f"--{k}: --algo {cfg.algo} has no such knob (its loss uses only "
                            f"{', '.join('--' + n for n, x in cegppo.ALGOS[cfg.algo].items() if x is not None)})")
        if v is None or getattr(cfg, k) is None:         # unused knobs stay unset, even where a preset sets them
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
        need(getattr(cfg, name) is None or getattr(cfg, name) >= 0, name, "must be >= 0")   # None: unused
    for name in ("epsilon_low", "epsilon_high"):
        need(getattr(cfg, name) is None or 0 <= getattr(cfg, name) < 1 or cfg.algo == "cispo", name,
             "must be in [0, 1)")
    need(cfg.algo != "cispo" or cfg.epsilon_high > 0, "epsilon_high", "CISPO's weight cap 1 + eps must be above 1")
    need(cfg.dual_clip is None or cfg.dual_clip == 0 or cfg.dual_clip > 1, "dual_clip",
         "must be 0 (off) or greater than 1")
    need(0 < cfg.top_p <= 1, "top_p", "must be in (0, 1]")
    need(cfg.temperature > 0, "temperature", "RL sampling needs a temperature > 0")
    need(cfg.learning_rate > 0, "learning_rate", "must be > 0")
    need(cfg.max_grad_norm > 0, "max_grad_norm", "must be > 0")
    need(cfg.sampler_correction_cap >= 1, "sampler_correction_cap", "must be at least 1 (1 = no mismatch allowed)")
    if cfg.dtype == "bf16" and torch.cuda.is_available() and not loading.native_bf16():   # the rule of compute_dtype
        raise UserError("--dtype bf16: this GPU has no native bf16 (compute capability below 8.0); "
                        "use --dtype fp16 (loss-scaled) or auto")


def seed_list(text):
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds {text}: expected comma-separated integers, e.g. 1,2,3") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds {text}: expected distinct comma-separated integers, e.g. 1,2,3")
    return seeds


def setup(cfg):
    """Everything before the first step: the checks, the data, the policy, the output folder, the saved state."""
    loading.set_threads(cfg.threads)
    ckpt = check_resume(cfg, RESUME_MAY_CHANGE)
    if not torch.cuda.is_available() and cfg.model not in ("tiny", "lab"):
        print(f"No CUDA GPU found: a real model trains very slowly on the CPU; {loading.CPU_HINT}.", file=sys.stderr)
    if cfg.model not in ("tiny", "lab"):
        loading.check_model_source(cfg.model)            # a wrong name or no Hub: one line, before anything slow
    train_rows, eval_rows = load_data(cfg)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)                          # LoRA init, then sampling
    model, tok, params, optimizer, scaler = policy_and_optimizer(cfg, ckpt)
    prompts = usable_prompts(cfg, tok, train_rows)
    os.makedirs(cfg.output_dir, exist_ok=True)           # only now: every input was good
    write_json(os.path.join(cfg.output_dir, "config.json"), dataclasses.asdict(cfg))   # whole, or the old one
    state = restore(ckpt, cfg.output_dir, optimizer, scaler, State) if ckpt else State()
    if cfg.resume and os.path.exists(os.path.join(cfg.output_dir, "tokens.jsonl")):  # the rows after the checkpoint
        token_page.write_page(cfg.output_dir, plot.token_steps(cfg.output_dir))     # are gone: the page follows
    return model, tok, params, optimizer, scaler, prompts, eval_rows, state


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


def policy_and_optimizer(cfg, ckpt):
    """The policy (its LoRA fresh, or the checkpoint's), its trainable parameters, AdamW and the loss scaler."""
    model, tok = policy_model(cfg, ckpt and os.path.join(ckpt, "adapter"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    # fused: one kernel for all LoRA tensors instead of a few small ops per tensor (CPU and CUDA)
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=True)
    # fp16 gradients underflow without loss scaling; bf16 and fp32 need none (the scaler is then a no-op)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    scaler = torch.amp.GradScaler(device, enabled=loading.compute_dtype(cfg.dtype) == torch.float16)
    if scaler.is_enabled():
        why = "no native bf16 on this GPU" if cfg.dtype == "auto" else "--dtype fp16"
        print(f"fp16 compute ({why}): dynamic loss scaling on", file=sys.stderr)
    return model, tok, params, optimizer, scaler


def choose_sampler(model, cfg, source):
    """'dense' or 'policy' for the rollout (rollout_copy.choose), said once with where pi_old comes from."""
    kind = rollout_copy.choose(cfg.rollout_model, model, min(cfg.generation_batch_size,
                                                             cfg.prompts_per_step * cfg.num_generations),
                               cfg.max_prompt_length + cfg.max_completion_length,
                               prompt_tokens=cfg.max_prompt_length, micro_batch=cfg.micro_batch_size,
                               top_p=cfg.top_p, prompts=shared_prompts(cfg))
    print(f"sampling through the {'dense copy' if kind == 'dense' else '4-bit policy'}; pi_old from the "
          f"{'sampler' if source == 'sampler' else 'policy (one no-grad pass)'}", file=sys.stderr)
    dtype = loading.model_compute_dtype(model)
    if source == "sampler" and dtype != torch.float32:
        print(f"warning: --old_logprobs sampler with {str(dtype).split('.')[-1]} compute: the sampler's rounded "
              "numbers stand in for pi_old, so the first update's ratio is not 1 and --sampler_correction has "
              "nothing to correct (its weights are 1); --old_logprobs auto recomputes pi_old", file=sys.stderr)
    return kind


def shared_prompts(cfg):
    """The distinct prompts one generate() sub-batch's shared prefill encodes (cegppo._generate), or
    None: without --shared_prefix, or with one completion per prompt. memory.py counts the same."""
    if not cfg.shared_prefix or cfg.num_generations == 1:
        return None
    gen_batch = min(cfg.generation_batch_size, cfg.prompts_per_step * cfg.num_generations)
    return min(cfg.prompts_per_step, sizes.sub_batch_prompts(gen_batch, cfg.num_generations))


def lr_at(step, cfg):
    """Linear warm-up over warmup_steps RL steps, then constant (the paper's schedule)."""
    return cfg.learning_rate * min(1.0, step / max(1, cfg.warmup_steps))


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
