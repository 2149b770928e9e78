"""Train a Qwen2.5 model (4-bit NF4 + LoRA) on verifiable math with CE-GPPO, on one GPU.

    python train.py                                      # CE-GPPO, Qwen2.5-1.5B-Instruct, GSM8K
    python train.py --model Qwen/Qwen2.5-0.5B-Instruct --beta1 0.75 --beta2 1.0
    python train.py --algo grpo                          # the same loop with beta1 = beta2 = 0
    python train.py --preset lab                         # CPU lab: a small model learns arithmetic
    python train.py --model tiny --dataset tiny          # offline smoke run (seconds, CPU)

The file reads in the order it runs: the Config, the records the steps hand each other, train() with
its loop, then the steps in the loop's order (their labels match the loop's comments). What they call
for speed, memory and bookkeeping lives in engine/. One RL step:
  1. rollout      P prompts x G completions, with the sampler's own log pi of every token (cegppo.rollout)
  2. reward       1 if the last \\boxed{} equals the reference, else 0            (cegppo.math_reward)
  3. advantages   z-score within each group; an all-equal group carries no signal and is dropped, and
                  steps 1-3 repeat on further prompts until P groups carry one (dynamic sampling)
  4. old log-probs  the sampler's own numbers on a CPU in float32, else a no-grad pass through the policy
  5. updates      `steps_per_generation` mini-batches of the kept groups, one optimizer update each: after
                  the first, ratios leave 1 and the clip regions fill up, where CE-GPPO and GRPO differ
  6. log          one metrics row, samples and curves; evaluation every `eval_steps`
  7. checkpoint   atomic; --resume continues exactly. A run in which no group has carried a signal for
                  --collapse_patience steps saves, says why (collapsed, saturated or split) and stops

Deviations from the paper (besides those listed in cegppo.py): LoRA on a 4-bit model instead of
full fine-tuning (hence a larger learning rate, 1e-5 instead of 1e-6), far smaller batches and
response lengths (one consumer GPU instead of a cluster), Qwen2.5-Instruct instead of
DeepSeek-R1-Distill-Qwen, GSM8K / MATH instead of KlearReasoner-MathSub-30K.
"""

import math
import random
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch

import cegppo
import plot
from engine import cli, data, errors, logprobs, models, runfiles, runlog, seeds, token_page
from engine.sampler import Sampler
from eval import evaluate


def knob(default, help):
    """A Config field: its default and its one line of --help."""
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    # model
    model: str = knob("Qwen/Qwen2.5-1.5B-Instruct", "Hub id or local folder of a causal LM; 'tiny', 'lab' and 'carry' are built in code")
    load_in_4bit: bool = knob(True, "load the base weights in 4-bit NF4 (bitsandbytes)")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = knob("auto", "compute dtype; auto: bf16 on GPUs with native bf16 (compute capability 8.0+), fp16 with loss scaling on older GPUs (T4, V100, RTX 20xx), fp32 on CPU")
    lora_r: int = knob(16, "LoRA rank (LoRA on all linear layers, dropout 0)")
    lora_alpha: int = knob(32, "LoRA alpha")
    gradient_checkpointing: bool = knob(True, "recompute activations in the backward pass (saves memory)")
    # data
    dataset: str = knob("gsm8k", "gsm8k | math | tiny | lab | carry | a local .jsonl/.json/.parquet file")
    question_field: Optional[str] = knob(None, "question field of a local file; unset: 'question'")
    answer_field: Optional[str] = knob(None, "answer field of a local file; unset: 'answer' (GSM8K '#### x' understood)")
    eval_dataset: Optional[str] = knob(None, "held-out set; unset: the named dataset's test split, none for a local file")
    max_prompt_length: int = knob(512, "prompts longer than this (tokens) are skipped and counted")
    # algorithm: --algo (one of cegppo.ALGOS) fills in the five knobs below that are not given
    algo: str = knob("cegppo", "sets the defaults of the five loss knobs below; cispo: its own loss, which uses only --epsilon_high (weight cap 1 + eps)")
    beta1: Optional[float] = knob(None, "gradient scale in the low clip region (ratio < 1-eps_low, A < 0; NA&LP): lowers entropy")
    beta2: Optional[float] = knob(None, "gradient scale in the high clip region (ratio > 1+eps_high, A > 0; PA&LP): raises entropy")
    epsilon_low: Optional[float] = knob(None, "clip range below 1")
    epsilon_high: Optional[float] = knob(None, "clip range above 1 (DAPO's clip-higher raises it; CISPO caps its weight at 1 + it)")
    dual_clip: Optional[float] = knob(None, "dual clip c for A < 0 (loss <= -c*A), as in the authors' scripts; 0 = off")
    sft_coef: float = knob(0.0, "weight of the authors' SFT term on fully rewarded responses (their scripts: 0.1; the paper: 0)")
    entropy_target: Optional[float] = knob(None, "hold the policy's mean token entropy at this value: after each step beta1 and beta2 move toward it, from --beta1 / --beta2 (cegppo.steer_betas); unset: fixed betas")
    # rollout
    prompts_per_step: int = knob(8, "P: prompts per RL step")
    num_generations: int = knob(8, "G: sampled completions per prompt (the group)")
    max_completion_length: int = knob(512, "max new tokens per completion")
    temperature: float = knob(1.0, "sampling temperature (the log-probs use the same one)")
    top_p: float = knob(1.0, "nucleus sampling for the rollout (1.0 = the plain softmax, as in the paper)")
    generation_batch_size: int = knob(64, "sequences per generate() call; halves itself on out-of-memory")
    rollout_model: Literal["auto", "dense", "policy"] = knob("auto", "sample from a dense copy of the policy (4-bit dequantised; LoRA merged in float32, kept apart in half precision; held while sampling) or through its 4-bit + LoRA layers; auto: dense on a GPU where it fits, else policy")
    old_logprobs: Literal["auto", "sampler", "policy"] = knob("auto", "pi_old of the sampled tokens: the sampler's own log-probs (no extra pass) or a pass through the policy; auto: the sampler's on a CPU in float32, else (any GPU) the policy's")
    sampler_correction: str = knob("sequence_mask", "where pi_old is recomputed (--old_logprobs policy, a GPU's default), weight each token's loss by pi_old / pi_sample from the sampler's own log-probs, per token or per response, truncated at the cap or set to 0 above it (TRL's default for its vLLM sampler); exactly 1 where the sampler's numbers are pi_old")
    sampler_correction_cap: float = knob(3.0, "the cap of --sampler_correction (TRL: vllm_importance_sampling_clip_max 3.0)")
    max_generation_rounds: int = knob(4, "dynamic sampling: generate again (more prompts) until P groups carry a signal, at most this many rounds per step; 1 = off")
    collapse_patience: int = knob(20, "stop (saved) after this many steps in a row in which no group carried a signal; 0 = never")
    # optimisation
    steps_per_generation: int = knob(4, "optimizer updates per pass over a rollout (mini-batches of whole groups); with 1 update in all (and num_iterations 1) the ratio is always 1 and nothing is clipped")
    num_iterations: int = knob(1, "passes over each rollout (the paper: 1)")
    micro_batch_size: int = knob(8, "responses per forward/backward (gradient accumulation inside a mini-batch)")
    shared_prefix: bool = knob(True, "encode each group's prompt once in the rollout's prefill, the old log-probs and the updates, its G completions packed behind it (the same numbers, to rounding, with less work); false: every row its own prompt")
    learning_rate: float = knob(1e-5, "AdamW learning rate (constant after warm-up)")
    warmup_steps: int = knob(5, "linear warm-up, in RL steps")
    weight_decay: float = knob(0.1, "AdamW weight decay (paper: 0.1)")
    max_grad_norm: float = knob(1.0, "gradient clipping")
    max_steps: int = knob(200, "RL steps")
    seed: int = knob(42, "seed for data order, sampling and LoRA init")
    seeds: Optional[str] = knob(None, "comma-separated seeds, e.g. 1,2,3: one run per seed, in output_dir/seed-<n>")
    jobs: int = knob(1, "with --seeds: run this many seeds at once, each in its own process, the CPU threads divided among them")
    threads: int = knob(0, "CPU threads for torch; 0 = $OMP_NUM_THREADS, else one per core")
    progress: Literal["auto", "on", "off"] = knob("auto", "a progress bar inside each rollout's and evaluation's generate() call (sequences finished, tokens): auto = on a terminal once a call has run 2 s")
    # logging, evaluation, checkpoints
    output_dir: str = knob("runs/cegppo", "metrics.jsonl, samples.jsonl, curves.png, checkpoint/, final adapter (presets: runs/<preset>)")
    logging_steps: int = knob(1, "write samples.jsonl and tokens.jsonl, redraw curves.png and add the step to tokens.html every N steps")
    token_groups: int = knob(2, "kept groups whose every token (what the update did to it) goes to tokens.jsonl / tokens.html at each logging step; 0 = none")
    eval_steps: int = knob(25, "greedy accuracy on the held-out subset every N steps (and at step 1 and the end)")
    eval_limit: int = knob(64, "size of the fixed held-out subset; 0 = no evaluation")
    eval_samples: int = knob(0, "also sample this many completions per held-out question at each evaluation, for eval/pass@k (from a random stream of its own: training is unchanged); 0 = greedy accuracy only")
    eval_temperature: float = knob(1.0, "the sampling temperature of --eval_samples")
    eval_pass_k: Optional[str] = knob(None, "the k logged as eval/pass@k, e.g. 1,16 (each at most --eval_samples); unset: 1, 2, 4, ... and --eval_samples")
    save_steps: int = knob(25, "checkpoint every N steps (and at the end and on Ctrl-C)")
    resume: bool = knob(False, "continue from output_dir/checkpoint")
    wandb: bool = knob(False, "also log to Weights & Biases (pip install wandb)")
    preset: Optional[str] = knob(None, "tiny | lab | carry: other defaults for the offline smoke run, the CPU lab or the lab with headroom (engine/cli.py PRESETS); flags still win")


@dataclass
class State:
    """Where the loop is: everything a checkpoint restores besides the adapter and the optimizer."""
    step: int = 0
    epoch: int = 0                 # passes over the shuffled training prompts
    pos: int = 0                   # the next prompt of this epoch's shuffle
    skipped_updates: int = 0       # updates dropped for a non-finite gradient (fp16 overflow)
    last_signal_step: int = 0      # the last step in which some group's rewards differed (collapse_patience)
    last_no_signal: str = ""       # why the steps since last_signal_step had none: "collapsed", "saturated", "split"
    beta1: Optional[float] = None  # --entropy_target: the betas in force, and the smoothed entropy (cegppo.steer_betas)
    beta2: Optional[float] = None
    entropy_smoothed: Optional[float] = None


@dataclass
class Groups:
    """Steps 1-3's result, what the updates train on: the K <= P groups that carry a signal."""
    rollout: Optional[cegppo.Rollout]   # their K*G rows, merged from the rounds (None: no group had a signal)
    prompts: list                       # K (prompt, answer)
    rewards: torch.Tensor               # [K*G]
    advantages: torch.Tensor            # [K*G] z-scores within each group


@dataclass
class OldLogProbs:
    """Step 4's result, [K*G, T] each (on the CPU): log pi_old and the entropy of every kept token, and the weight
    of each token's loss term that corrects for the sampler's numbers differing from pi_old."""
    logp: torch.Tensor
    entropy: torch.Tensor
    token_weights: torch.Tensor
    correction: dict                    # the weights' statistics, under TRL's names
    from_sampler: bool = True           # log pi_old is the sampler's own numbers (else a pass through the policy)


# -------------------- The loop ----------------------------------------------------------------
def train(cfg):
    """One run: setup, then per RL step the seven steps of the module docstring, then the final adapter."""
    policy, tok, optimizer, prompts, eval_rows, state = setup(cfg)
    sampler = Sampler(policy, tok, cfg, old_logprobs_from(cfg))  # the dense copy or the policy (steps 1, 6)
    scorer = logprobs.Scorer(cfg.temperature, cfg.shared_prefix)  # log pi of the kept tokens (steps 4, 5)
    run = runlog.Run(cfg, state.step)                             # the step line, files, Ctrl-C, wandb
    row = None
    while state.step < cfg.max_steps and not run.stop_asked() and not no_signal(state, cfg):   # (a resumed stop)
        state.step += 1
        clock = run.start_step()                                  # this step's times and peak memory
        optimizer.set_lr(lr_at(state.step, cfg))
        # 1-3. rollout, reward, advantages, in rounds of prompts until P groups carry a signal
        groups, sampled = collect_groups(sampler, prompts, state, cfg, clock)
        # 4. old log-probs and entropy of the kept tokens under the sampling policy, no gradient, and the
        #    weights that correct for the sampler's own numbers differing from them (1 where they are pi_old)
        old = clock.time("old_logprob", old_logprobs, scorer, policy, groups, cfg)
        # 5. several optimizer updates on mini-batches of the kept groups, with the betas in force
        knobs = loss_knobs(cfg, state)
        updates = clock.time("update", update_policy, scorer, policy, optimizer, groups, old, knobs, cfg, state.step)
        state.skipped_updates += updates.skipped
        # 6. log (and evaluate)
        row = runlog.metrics_row(state, cfg, groups, sampled, old, updates, knobs, clock)
        if eval_rows and (state.step == 1 or every(state.step, cfg.eval_steps, cfg)):
            row.update(evaluate_policy(sampler, tok, eval_rows, cfg, state.step))
        row.update(clock.step_totals())                           # time/step_s and the step's peak memory
        if cfg.entropy_target:                                    # the betas of the next step
            state.beta1, state.beta2, state.entropy_smoothed = cegppo.steer_betas(
                state.beta1, state.beta2, state.entropy_smoothed, row["entropy"], cfg.entropy_target)
        state.last_signal_step = state.step if groups.prompts else state.last_signal_step
        state.last_no_signal = "" if groups.prompts else no_signal_kind(sampled, state.last_no_signal)
        stopped = no_signal(state, cfg)                           # a policy with nothing left to learn from stops
        if stopped:
            row["stopped"] = stopped                              # "collapsed", "saturated" or "split" (no_signal_kind)
        log_step(run, row, sampled, updates, token_page.step_record(tok, groups, old, updates, cfg), cfg)
        # 7. checkpoint
        if every(state.step, cfg.save_steps, cfg) or run.stop_asked() or stopped:
            runfiles.save_checkpoint(cfg.output_dir, policy, optimizer.adamw, optimizer.scaler, state)
        if stopped:
            break
    return run.end(policy, tok, state, no_signal(state, cfg), row)


def main(argv=None):
    """Parse the flags and train once, or once per seed of --seeds (each in output_dir/seed-<n>),
    one after another or, with --jobs N, N at a time in processes of their own."""
    cfg = parse_config(argv)
    return seeds.run_seeds(cfg, train, __file__) if cfg.seeds else train(cfg)


def parse_config(argv=None):
    """Config from flags: a preset's defaults, then the flags, then --algo's loss knobs, then checks (engine/cli.py)."""
    return cli.parse_config(Config, argv)


# -------------------- Steps 1-3: rollout, reward, advantages (in rounds: dynamic sampling) ----
def collect_groups(sampler, prompts, state, cfg, clock):
    """1-3. Rollout, reward and advantages, in rounds, until P groups carry a signal.

    A group whose G rewards are all equal has advantage 0 everywhere: no gradient. The authors (DAPO's
    dynamic sampling) sample more prompts until the step holds P groups that carry a signal; here at most
    max_generation_rounds rounds, each asking for as many of the next prompts as the missing groups need
    at the signal rate seen so far (at most P); groups beyond P are dropped. Returns the kept groups and
    what every round sampled (for the metrics)."""
    P, G = cfg.prompts_per_step, cfg.num_generations
    kept, sampled = [], runlog.Sampled()                 # kept: (rollout, group index, prompt, rewards, advantages)
    with sampler.rounds(state.step, clock):              # a dense copy, where used, is held for the step's rounds
        while len(kept) < P and sampled.rounds < cfg.max_generation_rounds:
            signal_rate = len(kept) / max(1, len(sampled.prompts))
            n = P if not sampled.rounds else min(P, math.ceil((P - len(kept)) / max(signal_rate, 1 / P)))
            started = clock.now()
            # 1. rollout: the next n prompts, G completions each
            round_prompts, state.epoch, state.pos = next_prompts(prompts, cfg.seed, state.epoch, state.pos, n)
            rollout = sampler.rollout([p for p, _ in round_prompts], clock)
            if rollout is None:          # non-finite through the policy: these prompts skipped, the round not used up
                continue
            # 2. reward
            answers = [a for _, a in round_prompts for _ in range(G)]
            rewards = clock.time("reward", score, rollout.texts, answers)                  # [n*G]
            # 3. advantages: a z-score within each group; all-equal groups get 0 and are dropped
            advantages, zero_std = cegppo.group_advantages(rewards, G)                      # [n*G], [n]
            informative = (~zero_std).nonzero()[:, 0].tolist()
            take = informative[:P - len(kept)]
            kept += [(rollout, g, round_prompts[g], rewards[g * G:(g + 1) * G], advantages[g * G:(g + 1) * G])
                     for g in take]
            sampled.add_round(rollout, round_prompts, rewards, zero_std, len(informative) - len(take),
                              (clock.now() - started) * (1 - len(take) / n))
    sampled.dense_fallback, sampled.non_finite_rounds = sampler.dense_fallback, sampler.non_finite_rounds
    return Groups(rollout=sampler.merge([(r, g) for r, g, *_ in kept]), prompts=[p for _, _, p, _, _ in kept],
                  rewards=torch.cat([r for *_, r, _ in kept]) if kept else torch.zeros(0),
                  advantages=torch.cat([a for *_, a in kept]) if kept else torch.zeros(0)), sampled


def next_prompts(prompts, seed, epoch, pos, n):
    """1. The next n prompts of a seeded shuffle, a new shuffle each epoch, from position (epoch, pos):
    (the prompts, and the position after them)."""
    picked = []
    while len(picked) < n:
        if pos == len(prompts):
            epoch, pos = epoch + 1, 0
        order = list(range(len(prompts)))
        random.Random(seed + epoch).shuffle(order)
        picked.append(prompts[order[pos]])
        pos += 1
    return picked, epoch, pos


def score(texts, answers):
    """2. The verifiable reward of every completion: [B] floats."""
    return torch.tensor([cegppo.math_reward(c, a) for c, a in zip(texts, answers)])


# -------------------- Step 4: old log-probs ---------------------------------------------------
def old_logprobs_from(cfg):
    """'sampler' or 'policy' for --old_logprobs. auto: the sampler's own numbers where it computes in float32
    (a CPU: they equal the policy's to a few 1e-6, a first ratio 1 to 1e-5); the policy's where half-precision
    decoding differs from the training forward by far more (a GPU)."""
    if cfg.old_logprobs != "auto":
        return cfg.old_logprobs
    return "sampler" if models.float32_on_cpu(cfg.dtype) else "policy"


def old_logprobs(scorer, policy, groups, cfg):
    """4. log pi_old and the entropy of every kept token: the sampler's own numbers, or one no-grad pass through
    the policy in the updates' own micro-batches (only the same shapes give the first ratio 1 exactly on a
    GPU); and the sampler correction's weights of each token's loss (cegppo.sampler_correction)."""
    rollout = groups.rollout
    from_sampler = old_logprobs_from(cfg) == "sampler"
    if rollout is None:
        return OldLogProbs(torch.zeros(0, 0), torch.zeros(0, 0), torch.zeros(0, 0), {}, from_sampler)
    if from_sampler:
        logp, entropy = rollout.sample_logp.cpu(), rollout.sample_entropy.cpu()
    else:
        logp, entropy = scorer.no_grad(policy, rollout, logprobs.update_partition(rollout, cfg))
    weights, correction = cegppo.sampler_correction(logp, rollout.sample_logp.cpu(), rollout.completion_mask.cpu(),
                                                    cfg.sampler_correction, cfg.sampler_correction_cap)
    return OldLogProbs(logp, entropy, weights, correction, from_sampler)


# -------------------- Step 5: the updates -----------------------------------------------------
def loss_knobs(cfg, state):
    """5. The loss's five knobs (cegppo.ALGOS' keys) from the Config; with --entropy_target the betas in force."""
    knobs = {k: getattr(cfg, k) for k in cegppo.ALGOS[cfg.algo]}
    if cfg.entropy_target:
        knobs.update(beta1=state.beta1, beta2=state.beta2)
    return knobs


def update_policy(scorer, policy, optimizer, groups, old, knobs, cfg, step):
    """5. `steps_per_generation` optimizer updates per pass over the kept groups, `num_iterations` passes.

    Mini-batches are whole groups: a group's advantages sum to zero, so an update that saw only its
    wrong answers would push down the tokens that right and wrong answers share. An update whose loss
    or gradient is not finite is not made (counted in Updates.skipped; fp16's loss scale drops).
    """
    updates = runlog.Updates(learning_rate=optimizer.lr)
    policy.train()          # whatever ran before (a rollout cut short): checkpointing works in train mode only
    for it in range(cfg.num_iterations):
        for micro_batches in logprobs.update_partition(groups.rollout, cfg):      # a mini-batch: whole groups
            # tokens.jsonl: what the last pass's update did to each token of the first token_groups groups
            record = cfg.token_groups * cfg.num_generations if logged(step, cfg) and it == cfg.num_iterations - 1 else 0
            losses = accumulate_gradients(scorer, policy, optimizer, groups, old, knobs, micro_batches, cfg, updates,
                                          record)
            grad_norm = optimizer.step(finite=losses is not None)       # None: nothing applied
            if grad_norm is None:
                updates.skipped += 1
                for row in torch.cat(micro_batches).tolist():             # what the loss did, for an update not made
                    updates.tokens.pop(row, None)
                continue
            updates.loss.append(losses[0])
            updates.sft_loss.append(losses[1])
            updates.grad_norm.append(grad_norm)
    updates.loss_scale = optimizer.loss_scale()
    return updates


def accumulate_gradients(scorer, policy, optimizer, groups, old, knobs, micro_batches, cfg, updates, record_below=0):
    """Forward and backward over one mini-batch, micro-batch by micro-batch (logprobs.update_partition); returns
    (policy, sft) loss sums, or None where a loss is not finite. The rows below `record_below` leave what the
    loss did to each of their tokens (cegppo.token_details) in updates.tokens."""
    rollout = groups.rollout
    rows = torch.cat(micro_batches)
    positive = groups.rewards >= 1.0                                   # [K*G] the SFT term's responses
    mini_batch_tokens, positive_tokens = int(rollout.completion_mask[rows].sum()), int(rollout.completion_mask[rows][positive[rows]].sum())
    device = rollout.input_ids.device
    policy_sum, sft_sum = 0.0, 0.0
    for idx in micro_batches:
        logp, mask, packed = scorer.with_grad(policy, rollout, idx)           # [b, T] log pi, and its completion mask
        T = mask.shape[1]
        updates.micro_batches, updates.packed = updates.micro_batches + 1, updates.packed + packed
        old_logp, adv, weights = old.logp[idx, :T].to(device), groups.advantages[idx].to(device), old.token_weights[idx, :T].to(device)
        loss, stats = cegppo.policy_loss(cfg.algo, logp, old_logp, adv, mask, num_tokens=mini_batch_tokens,
                                         token_weights=weights, **knobs)
        sft = cegppo.positive_sft_loss(logp, mask, positive[idx].to(device), num_tokens=positive_tokens,
                                       token_weights=weights)
        total = loss + cfg.sft_coef * sft if cfg.sft_coef else loss
        if not torch.isfinite(total):
            return None
        optimizer.backward(total)                                        # (scaled under fp16)
        policy_sum, sft_sum = policy_sum + loss.item(), sft_sum + sft.item()
        runlog.add_loss_stats(updates, stats, mask, logp, rollout.sample_logp[idx, :T] if rollout.sample_logp is not None else None)
        recorded = [j for j, row in enumerate(idx.tolist()) if row < record_below]
        if recorded:                                                     # the loss's own numbers, no extra pass
            details = cegppo.token_details(cfg.algo, logp[recorded].detach(), old_logp[recorded], adv[recorded],
                                           token_weights=weights[recorded], **knobs)
            for k, j in enumerate(recorded):
                updates.tokens[int(idx[j])] = {"logp": logp[j].detach().cpu(), **{n: v[k].cpu() for n, v in details.items()}}
    return policy_sum, sft_sum


# -------------------- Step 6: log and evaluate ------------------------------------------------
def evaluate_policy(sampler, tok, eval_rows, cfg, step):
    """6. Greedy accuracy on the fixed held-out subset, generated by what the rollout samples from (the dense
    copy where it is used, else the policy); with --eval_samples n, pass@k from n samples of each question
    (eval.pass_at_k), drawn from a random stream of their own. Logits that are not finite (an fp16
    overflow) are not scored: eval/non_finite counts the questions where they appeared (a warning names them)."""
    def held_out(n, temperature, pass_k=(), seed=None):
        return sampler.evaluate(lambda model: evaluate(
            model, tok, eval_rows, cfg.max_completion_length, sampler.generate.batch_size, n, temperature,
            generation_progress=cfg.progress, pass_k=pass_k, seed=seed))
    result, overflow = held_out(1, 0.0)
    if overflow is not None:
        return {"eval/non_finite": len(overflow.rows)}
    row = {"eval/accuracy": result["accuracy"], "eval/mean_length": result["mean_response_length"]}
    if cfg.eval_samples:
        pass_k = cli.pass_k_list(cfg.eval_pass_k, cfg.eval_samples, "--eval_pass_k")
        result, overflow = held_out(cfg.eval_samples, cfg.eval_temperature, pass_k, seed=cfg.seed * 100003 + step)
        row.update({"eval/non_finite": len(overflow.rows)} if overflow is not None else
                   {f"eval/pass@{k}": result["pass@k"][str(k)] for k in pass_k})
    return row


def log_step(run, row, sampled, updates, tokens, cfg):
    """6. The row in metrics.jsonl (and wandb) and the step's line; every logging_steps its samples, what the
    update did to its recorded tokens (tokens.jsonl, tokens.html) and the curves."""
    run.write(row, sampled, tokens, samples=logged(row["step"], cfg), skipped=updates.skipped)
    if logged(row["step"], cfg):
        plot.plot_runs([cfg.output_dir], f"{cfg.output_dir}/curves.png")


def logged(step, cfg):
    """Samples, tokens and the pictures are written every logging_steps, and at the last step."""
    return every(step, cfg.logging_steps, cfg)


# -------------------- Step 7, and when a run stops --------------------------------------------
def every(step, n, cfg):
    """Logging, evaluation and checkpoints happen every n steps, and at the last step."""
    return step % n == 0 or step == cfg.max_steps


def no_signal_kind(sampled, before=""):
    """Why the steps without a signal had none, this step's groups added to what the steps `before` it
    (since the last signal) had: every group all wrong ("collapsed": nothing is ever rewarded), all
    right ("saturated": nothing left to learn), or each group one or the other ("split": the prompts
    it always solves and the ones it never does), in one step or across them."""
    this = "collapsed" if not sampled.all_right else "saturated" if not sampled.all_wrong else "split"
    return this if before in ("", this) else "split"


def no_signal(state, cfg):
    """None, or why the run stops: no group has carried a signal for collapse_patience steps (their
    no_signal_kind)."""
    if not cfg.collapse_patience or state.step - state.last_signal_step < cfg.collapse_patience:
        return None
    return state.last_no_signal or "collapsed"


# -------------------- Setup: the data, the policy and its optimizer, the run folder -----------------
def setup(cfg):
    """Everything before the first step: the checks, the data, the policy and its optimizer, the run folder, the
    saved state (a resumed run's)."""
    models.set_threads(cfg.threads)
    ckpt = runfiles.check_resume(cfg, cli.RESUME_MAY_CHANGE)
    models.check_model_source(cfg.model, say_cpu=True)      # a wrong name or no Hub: one line, before anything slow
    train_rows, eval_rows = data.load_data(cfg)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)                              # LoRA init, then sampling
    policy, tok = models.policy_model(cfg, ckpt and f"{ckpt}/adapter")
    optimizer = models.Optimizer(policy, cfg)
    prompts = data.usable_prompts(cfg, tok, train_rows)
    fresh = State(beta1=cfg.beta1, beta2=cfg.beta2) if cfg.entropy_target else State()   # --entropy_target's start
    state = runfiles.open_run(cfg, ckpt, optimizer.adamw, optimizer.scaler, fresh)
    return policy, tok, optimizer, prompts, eval_rows, state


def lr_at(step, cfg):
    """Linear warm-up over warmup_steps RL steps, then constant (the paper's schedule)."""
    return cfg.learning_rate * min(1.0, step / max(1, cfg.warmup_steps))


if __name__ == "__main__":
    errors.run_script(main)
