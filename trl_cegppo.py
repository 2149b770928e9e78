"""CE-GPPO on TRL's GRPOTrainer: the same loss, when one GPU is not enough.

What this is. train.py is a single-GPU loop written out in full. When a run needs several GPUs,
vLLM generation or DeepSpeed/FSDP, re-implementing all of that here would bury the algorithm, so
this module lends CE-GPPO to TRL instead: `CEGPPOTrainer` is TRL's `GRPOTrainer` whose loss is
`cegppo.cegppo_loss` (the very function train.py calls, imported, not a copy), plus the authors'
positive-sample SFT term `cegppo.positive_sft_loss`. Generation (transformers or vLLM), reward
functions, group advantages, batching, accelerate/DeepSpeed/FSDP, logging and checkpoints stay
TRL's.

How to run (examples/trl_gsm8k.py is the full script):

    pip install -r requirements-scale.txt
    accelerate launch --num_processes 4 examples/trl_gsm8k.py --output_dir runs/trl
    python examples/trl_gsm8k.py --model tiny --dataset tiny --max_steps 2     # CPU, offline smoke test

In code:

    from trl_cegppo import CEGPPOConfig, CEGPPOTrainer
    args = CEGPPOConfig(output_dir="runs/x", beta1=0.5, beta2=1.0, sft_coef=0.1,
                        steps_per_generation=4, gradient_accumulation_steps=1)
    CEGPPOTrainer(model="Qwen/Qwen2.5-1.5B-Instruct", reward_funcs=[my_reward], args=args,
                  train_dataset=ds).train()

The knobs. `beta1`, `beta2`, `dual_clip` are new fields; the clip range is GRPOConfig's own
`epsilon` (= epsilon_low) and `epsilon_high`. Their defaults come from cegppo.ALGOS["cegppo"], the
one home of the defaults; GRPO is `beta1 = beta2 = 0`, DAPO adds `epsilon_high = 0.28`.
`sft_coef` (default 0, the authors' scripts use 0.1) adds the SFT term on positive completions.

How the pieces plug into TRL 1.16 (private methods: hence the version pin, TESTED_TRL):
  * `_compute_loss` is replaced: TRL's own forward pass gives per-token log-probs and entropies,
    `old_per_token_logps` (absent when each generation gets exactly one update: then the ratio is 1,
    as in train.py) and the advantages; `trl_loss` hands them to `cegppo_loss`.
  * The SFT term needs to know which completions earned the full reward, and TRL's loss never sees
    rewards. `_calculate_rewards` is wrapped to keep the (all-process) rewards, and
    `_generate_and_score_completions` adds a per-completion `positive` flag and the batch's count of
    positive tokens to the batch dict; TRL shuffles and splits every per-sample tensor of that dict
    together, so the flags stay with their completions.
  * Metrics go through TRL's logger (`self._metrics[mode][name]`), reduced over processes:
    `clip_ratio/low_mean`, `clip_ratio/high_mean`, `clip_ratio/region_mean` (TRL's names, the same
    definitions), `clip_ratio/dual_mean`, `approx_kl`, `ratio/mean`, `ratio/max`, `entropy`,
    `policy_loss`, `sft/loss`, `sft/positive_frac`, and the paper's token quadrants `quadrants/...`.

What differs from train.py (the loss per token is identical; what feeds it is TRL's):
  * Aggregation: a token mean over each optimizer update, whose denominator is TRL's "dapo"
    normalizer: the generation batch's token count (all processes) spread evenly over its updates.
    train.py divides by the exact token count of each update's mini-batch; the two agree when the
    mini-batches of one generation hold equally many tokens.
  * Groups whose rewards are all equal are not dropped: their advantages are zero, so they add
    nothing to the policy gradient, but their tokens still count in the denominator (train.py and
    the authors' dynamic sampling drop them, so its steps are slightly larger).
  * Advantages are TRL's: (r - mean) / (std + 1e-4) per group (train.py: + 1e-6). Same direction.
  * Positive completions for the SFT term: total reward (TRL's weighted sum over the reward
    functions) >= `sft_full_reward` (1.0, math_reward's full reward), and only in groups whose rewards
    are not all equal, as in train.py where all-equal groups are dropped before the update.
  * Generation is TRL's (transformers generate, or vLLM with `--use_vllm`). With vLLM, TRL corrects
    the vLLM/trainer mismatch by weighting each token's loss with a bounded, non-negative importance
    ratio (per token or per sequence); the bridge folds that weight into the advantage, which for
    every term of cegppo_loss is the same (the clip regions depend only on the sign of A, the
    dual-clip cap scales with A). Tested on CPU against TRL's own loss, not with a real vLLM.
  * Steps: TRL's max_steps, warmup_steps, save_steps and logging_steps count optimizer updates;
    train.py's count generations (RL steps) of --steps_per_generation updates each (in TRL a
    generation feeds steps_per_generation / gradient_accumulation_steps updates).
  * No 4-bit in the example: each GPU holds a bf16 copy of the model (LoRA on top, as train.py).
  * TRL options that would change the loss and that cegppo_loss does not express are refused with a
    clear error (a KL term, sequence-level ratios, INTELLECT-2's delta, entropy masks or bonuses,
    off-policy masks, other loss types, MoE auxiliary losses); the paper uses none of them.
"""

import os
from dataclasses import dataclass, field

import torch
from packaging.specifiers import SpecifierSet
from packaging.version import Version

import cegppo

TESTED_TRL = ">=1.16,<1.17"          # the TRL releases this bridge was run against (also requirements-scale.txt)
ALLOW_UNTESTED_ENV = "CEGPPO_ALLOW_UNTESTED_TRL"


def check_trl_version(version):
    """Raise ImportError, with the fix in the message, unless TRL `version` is in TESTED_TRL.

    The bridge overrides private GRPOTrainer methods whose signatures change between TRL
    releases; failing here, in one line, beats a KeyError deep inside a training step.
    """
    if SpecifierSet(TESTED_TRL).contains(Version(version), prereleases=True):
        return
    if os.environ.get(ALLOW_UNTESTED_ENV) == "1":
        return
    raise ImportError(
        f"trl_cegppo needs trl{TESTED_TRL} but trl {version} is installed: the bridge overrides private "
        f"GRPOTrainer methods that change between TRL releases. Install the tested range with "
        f"`pip install -r requirements-scale.txt`, or set {ALLOW_UNTESTED_ENV}=1 to try this version anyway.")


try:
    import trl
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("trl_cegppo needs TRL: pip install -r requirements-scale.txt") from e
check_trl_version(trl.__version__)

from trl import GRPOConfig, GRPOTrainer  # noqa: E402  (after the version check, on purpose)

_DEFAULTS = cegppo.ALGOS["cegppo"]

TOKEN_MEAN_STATS = cegppo.TOKEN_MEAN_STATS      # averaged over processes weighted by token count

# Extra inputs TRL's forward pass takes for vision-language models, passed through untouched.
_FORWARD_KEYS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
                 "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")


@dataclass
class CEGPPOConfig(GRPOConfig):
    """GRPOConfig plus the CE-GPPO knobs; `epsilon` / `epsilon_high` are GRPOConfig's own fields."""

    beta1: float = field(default=_DEFAULTS["beta1"], metadata={
        "help": "CE-GPPO gradient scale of the low clip region (ratio < 1 - epsilon, A < 0; NA&LP tokens). "
                "Larger: entropy falls faster. 0 with beta2 = 0 is GRPO's PPO-clip."})
    beta2: float = field(default=_DEFAULTS["beta2"], metadata={
        "help": "CE-GPPO gradient scale of the high clip region (ratio > 1 + epsilon_high, A > 0; PA&LP tokens). "
                "Larger: entropy stays higher."})
    dual_clip: float = field(default=_DEFAULTS["dual_clip"], metadata={
        "help": "Dual clip c for A < 0: each token's loss is capped at -c * A. 0 switches it off."})
    sft_coef: float = field(default=0.0, metadata={
        "help": "Weight of the authors' SFT term: token-mean NLL of the completions that earned the full "
                "reward (their scripts use 0.1; the paper does not describe it). 0 switches it off."})
    sft_full_reward: float = field(default=1.0, metadata={
        "help": "A completion is positive for the SFT term when its total reward reaches this (1.0 is "
                "cegppo.math_reward's full reward), in a group whose rewards are not all equal."})
    log_quadrants: bool = field(default=True, metadata={
        "help": "Log the paper's token quadrants (quadrants/pa_hp_frac, ..._drive) every step."})
    # GRPOConfig's own clip range, with our defaults (GRPOConfig: 0.2 and None).
    epsilon: float = field(default=_DEFAULTS["epsilon_low"], metadata={
        "help": "Lower clip range epsilon_low: the low region is ratio < 1 - epsilon."})
    epsilon_high: float | None = field(default=_DEFAULTS["epsilon_high"], metadata={
        "help": "Upper clip range: the high region is ratio > 1 + epsilon_high (DAPO: 0.28)."})

    def __post_init__(self):
        super().__post_init__()
        problems = unsupported_options(self)
        if problems:
            raise ValueError("CEGPPOConfig: " + "; ".join(problems))

    def loss_knobs(self):
        """The keyword arguments of cegppo.cegppo_loss, from this config."""
        return dict(epsilon_low=self.epsilon,
                    epsilon_high=self.epsilon if self.epsilon_high is None else self.epsilon_high,
                    beta1=self.beta1, beta2=self.beta2, dual_clip=self.dual_clip)


def unsupported_options(args):
    """The TRL options that would change the loss in ways cegppo_loss does not express, as messages."""
    checks = [
        (args.loss_type != "dapo", f"loss_type={args.loss_type!r}: the loss is CE-GPPO's; loss_type must stay "
                                   "'dapo', whose token normalizer the bridge uses"),
        (args.beta != 0.0, f"beta={args.beta}: no KL term (the paper uses none)"),
        (args.importance_sampling_level != "token", "importance_sampling_level must be 'token'"),
        (args.delta is not None, "delta (two-sided clipping) is not part of CE-GPPO"),
        (args.top_entropy_quantile < 1.0, "top_entropy_quantile < 1 is not supported"),
        (args.off_policy_mask_threshold is not None, "off_policy_mask_threshold is not supported"),
        (args.entropy_coef != 0.0 or args.use_adaptive_entropy, "no entropy bonus (the paper uses none)"),
        (args.beta1 < 0 or args.beta2 < 0, "beta1 and beta2 must be >= 0"),
        (bool(args.dual_clip) and args.dual_clip <= 1.0, "dual_clip must be 0 (off) or > 1"),
        (args.sft_coef < 0, "sft_coef must be >= 0"),
    ]
    return [msg for bad, msg in checks if bad]


def positive_mask(rewards, num_generations, full_reward=1.0):
    """Which completions get the SFT term: full reward, in a group whose rewards are not all equal.

    rewards: [N] total reward per completion, the G completions of a prompt next to each other.
    All-equal groups are excluded because train.py (and the authors' dynamic sampling) drop them
    before the update, so the SFT term sees the same completions in both. Returns [N] bool.
    """
    r = rewards.float().view(-1, num_generations)                # [P, G]
    mixed = (r.amax(dim=1) != r.amin(dim=1))[:, None]            # [P, 1]
    return ((r >= full_reward) & mixed).view(-1)                 # [N]


def trl_loss(per_token_logps, old_per_token_logps, advantages, mask, args, num_tokens=None,
             positive=None, num_positive_tokens=None):
    """TRL's tensors -> cegppo_loss (+ sft_coef * positive_sft_loss). Returns (loss, stats).

    per_token_logps: [B, T] with gradient; old_per_token_logps: [B, T] or None (TRL leaves it out
    when each generation gets a single update: then pi_old = pi, ratio 1); advantages: [B] or
    [B, T]; mask: [B, T]; args: a CEGPPOConfig; num_tokens / num_positive_tokens: denominators of
    the two token means (None: this batch's own counts); positive: [B] bool or None.
    """
    old = per_token_logps.detach() if old_per_token_logps is None else old_per_token_logps
    loss, stats = cegppo.cegppo_loss(per_token_logps, old, advantages, mask, num_tokens=num_tokens,
                                     **args.loss_knobs())
    stats["policy_loss"] = loss.item()
    if args.sft_coef > 0 and positive is not None:
        sft = cegppo.positive_sft_loss(per_token_logps, mask, positive, num_tokens=num_positive_tokens)
        loss = loss + args.sft_coef * sft
        stats["sft/loss"] = sft.item()
    return loss, stats


class CEGPPOTrainer(GRPOTrainer):
    """GRPOTrainer with the CE-GPPO loss (cegppo.cegppo_loss) and the optional positive-sample SFT term."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, CEGPPOConfig):
            raise TypeError(f"CEGPPOTrainer needs a CEGPPOConfig, got {type(self.args).__name__}")
        if self.aux_loss_enabled:
            raise ValueError("CEGPPOTrainer: MoE router auxiliary losses are not supported; set router_aux_loss_coef=0")
        self._rewards_per_func = None

    # --- rewards -> a per-completion "positive" flag in the batch dict --------------------------
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        # TRL returns the rewards of all processes ([N_all, n_funcs]); keep them for the flags below.
        self._rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        return self._rewards_per_func

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        mode = "train" if self.model.training else "eval"
        group = self.num_generations if mode == "train" else self.num_generations_eval
        per_func = self._rewards_per_func
        total = (per_func * self.reward_weights.to(per_func.device)[None]).nansum(dim=1)      # as TRL sums them
        total[torch.isnan(per_func).all(dim=1)] = float("nan")      # unscorable: never positive
        positive_all = positive_mask(total, group, self.args.sft_full_reward)                # [N_all]
        n = output["completion_ids"].size(0)                          # this process's slice, as TRL cuts it
        i = self.accelerator.process_index
        positive = positive_all[i * n:(i + 1) * n].to(output["completion_mask"].device)
        mask = self._loss_mask(output)
        output["positive"] = positive
        output["num_positive_tokens"] = self.accelerator.gather((mask * positive[:, None]).sum()).sum()
        self._metrics[mode]["sft/positive_frac"].append(positive_all.float().mean().item())
        return output

    # --- the loss ----------------------------------------------------------------------------
    @staticmethod
    def _loss_mask(inputs):
        mask = inputs["completion_mask"]
        return mask if inputs.get("tool_mask") is None else mask * inputs["tool_mask"]

    def _denominator(self, count, mode):
        """TRL's "dapo" normalizer: the generation batch's token count per process and per update.

        DDP averages gradients over processes, hence / num_processes; a generation batch feeds
        steps_per_generation / gradient_accumulation_steps updates, hence the last factor.
        """
        n = count.float().clamp(min=1.0) / self.accelerator.num_processes
        if mode == "train":
            n = n * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        return n.item()

    def _compute_loss(self, model, inputs):
        mode = "train" if self.model.training else "eval"
        completion_ids = inputs["completion_ids"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        logps, entropies, _ = self._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, completion_ids.size(1), compute_entropy=True,
            **{k: inputs.get(k) for k in _FORWARD_KEYS})
        mask = self._loss_mask(inputs)

        raw = inputs["advantages"]
        advantages = raw[:, None] if raw.dim() == 1 else raw                                # [B, 1] or [B, T]
        if self.use_vllm and self.vllm_importance_sampling_correction:
            # TRL multiplies each token's loss by this detached, non-negative vLLM/trainer ratio;
            # scaling A by it is the same for every term of cegppo_loss (see the module docstring).
            advantages = advantages * inputs["importance_sampling_ratio"]

        positive = inputs.get("positive")
        num_pos = inputs.get("num_positive_tokens")
        loss, stats = trl_loss(
            logps, inputs.get("old_per_token_logps"), advantages, mask, self.args,
            num_tokens=self._denominator(inputs["num_items_in_batch"], mode),
            positive=positive, num_positive_tokens=None if num_pos is None else self._denominator(num_pos, mode))
        self._log_loss_stats(mode, stats, logps.detach(), entropies.detach(), raw, mask)
        return loss

    def _log_loss_stats(self, mode, stats, logps, entropies, advantages, mask):
        """Stats of this micro-batch -> TRL's metrics, reduced over processes (two collectives)."""
        m = mask.float()
        n = m.sum()
        means = {k: stats[k] for k in TOKEN_MEAN_STATS}
        means["clip_ratio/region_mean"] = stats["clip_ratio/low_mean"] + stats["clip_ratio/high_mean"]
        means["entropy"] = ((entropies * m).sum() / n.clamp(min=1.0)).item()
        sums = torch.tensor([v * n.item() for v in means.values()] + [n.item()], device=mask.device)
        sums = self.accelerator.reduce(sums, reduction="sum")   # token-weighted over all processes
        for k, s in zip(means, sums[:-1]):
            self._metrics[mode][k].append((s / sums[-1].clamp(min=1.0)).item())

        # Per-process values averaged over processes (ratio/max: the maximum).
        other = {"ratio/max": stats["ratio/max"], "policy_loss": stats["policy_loss"]}
        if "sft/loss" in stats:
            other["sft/loss"] = stats["sft/loss"]
        if self.args.log_quadrants:     # under the current policy: the sampling one on a generation's first update
            other.update(cegppo.token_quadrants(logps, entropies, advantages, mask))
        vals = self.accelerator.gather(torch.tensor([list(other.values())], device=mask.device))   # [procs, K]
        for j, k in enumerate(other):
            col = vals[:, j]
            self._metrics[mode][k].append((col.max() if k == "ratio/max" else col.mean()).item())
