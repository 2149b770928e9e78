"""CE-GPPO in one file: the loss, the advantages, the token quadrants, the reward, the rollout and the log-probs.

CE-GPPO (Su et al., 2025, arXiv 2509.20712, Eq. 8-10) is PPO-clip with one change. Plain PPO
clipping zeroes the gradient of every token whose importance ratio r = pi / pi_old has left
[1 - eps, 1 + eps]. Those tokens are mostly low-probability ones, and they steer the policy's
entropy. CE-GPPO puts their gradient back, scaled by beta1 (the low clip region) and beta2 (the
high clip region) and bounded, through a stop-gradient: the equation is written out once, above
cegppo_loss. beta1 = beta2 = 0 is exactly PPO-clip (GRPO with group advantages).

The file in reading order; the first section is the whole of CE-GPPO's change to PPO, the others
are what any GRPO-style trainer needs around it (this file imports nothing of the project; what
makes a real run fast and fit in memory lives in engine/, tested against the definitions here):
    cegppo_loss, ALGOS      the objective and the algorithms' settings (the file's heart)
    steer_betas             the betas moved to hold the policy's entropy at a target (--entropy_target)
    cispo_loss, policy_loss  a baseline that keeps the clipped gradients another way; --algo's loss
    positive_sft_loss       the authors' optional SFT term on fully rewarded responses
    group_advantages        GRPO's group z-score, and which groups carry no signal
    sampler_correction      importance weights where the sampler's numbers are not pi_old (TRL's, TIS)
    token_quadrants         the paper's PA/NA x HP/LP analysis as per-step metrics
    math_reward             the verifiable reward (math-verify decides equality)
    rollout                 G completions per prompt, with the sampler's own log-probs (a Rollout)
    token_logprobs, completion_logprobs   per-token log pi and entropy of the sampled tokens

Where this implementation deviates from the paper, and why:
    * Aggregation is a token mean over all response tokens of the batch (the authors' verl code),
      not the per-sequence mean of the paper's Eq. 8: long responses are not down-weighted.
    * In the two clip regions the loss *value* is PPO-clip's value (bound * A) and only the
      *gradient* carries beta. The paper writes beta * bound * r / sg(r) * A, whose value is
      beta * bound * A; the difference is a constant with no gradient, so training is identical,
      and beta1 = beta2 = 0 reproduces PPO-clip in value as well as in gradient.
    * Dual clip for A < 0 (Ye et al. 2020) with c = 10, as in the authors' training scripts.
    * No KL term and no entropy bonus. The authors' scripts add an SFT term on fully rewarded
      responses (coefficient 0.1) that the paper does not describe: positive_sft_loss, off by
      default (train.py --sft_coef) so that the default objective is the paper's.
    * Rewards are 1 / 0 (the paper uses +1 / -1); after the group z-score the two are identical.
"""

import contextlib
import logging
import math
import re
import threading
from dataclasses import dataclass
from typing import Optional

import torch
from math_verify import parse, verify
from math_verify.errors import TimeoutException
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList


# -------------------- The loss ----------------------------------------------------------------
# Paper Eq. 8-10, per response token t of response i, with the ratio r = pi_theta / pi_old and
# sg = stop-gradient:
#
#   J(theta) = E[ 1/G sum_i 1/|y_i| sum_t l_it ]
#   l = beta1 * (1 - eps) / sg(r) * r * A    if r < 1 - eps and A < 0    low clip region  (NA&LP: lowers entropy)
#   l = beta2 * (1 + eps) / sg(r) * r * A    if r > 1 + eps and A > 0    high clip region (PA&LP: raises entropy)
#   l = r * A                                otherwise                   PPO
#
# r / sg(r) equals 1 in value and has gradient grad(log pi): the clipped tokens get a gradient of
# fixed size beta * bound * A * grad(log pi) that does not grow with how far the ratio has drifted,
# which is what keeps the update bounded. We minimise loss = -l, averaged over tokens.
def cegppo_loss(logp, old_logp, advantages, mask, *, epsilon_low, epsilon_high, beta1, beta2, dual_clip,
                num_tokens=None, token_weights=None):
    """CE-GPPO policy loss (token mean) and its statistics (floats, under the names train.py logs).
    logp [B, T] (with gradient), old_logp [B, T], advantages [B] or [B, T]; mask [B, T]: 1 on completion
    tokens up to and including the first EOS. dual_clip: c (term <= -c * A for A < 0), 0 or None: off.
    num_tokens: the token mean's denominator (default mask.sum(); a mini-batch's count when accumulating
    its micro-batches). token_weights [B, T] or None: sampler_correction's. Defaults: ALGOS; what the loss
    did to each token: token_details."""
    mask = mask.to(logp.dtype)                                   # [B, T]
    adv = per_token(advantages, logp)                            # [B, T]
    log_ratio = logp - old_logp.detach()                         # [B, T]
    # exp of a large log-ratio overflows (inf * 0 = nan in the masked sum); e^20 is far outside any clip range
    ratio = torch.exp(log_ratio.clamp(-20.0, 20.0))              # [B, T] r
    low, high, dual = clip_regions(ratio.detach(), adv, epsilon_low, epsilon_high, dual_clip)   # [B, T] each

    # carrier: value 0, gradient d(log pi). Adding beta * bound * carrier to the clipped constant
    # gives PPO-clip's value and CE-GPPO's gradient (see the module docstring).
    carrier = ratio / ratio.detach() - 1.0                       # [B, T]
    coef = torch.where(low, (1.0 - epsilon_low) * (1.0 + beta1 * carrier),
           torch.where(high, (1.0 + epsilon_high) * (1.0 + beta2 * carrier), ratio))   # [B, T]
    per_token_loss = -coef * adv                                 # [B, T]
    if dual_clip:                # where the cap binds the term is the constant -c * A: no gradient
        per_token_loss = torch.where(dual, -dual_clip * adv, per_token_loss)
    if token_weights is not None:
        per_token_loss = per_token_loss * token_weights.detach()

    # Token mean over the whole batch (verl's "token-mean", the authors' choice).
    denom = mask.sum().clamp(min=1.0) if num_tokens is None else float(max(num_tokens, 1))
    loss = (per_token_loss * mask).sum() / denom
    return loss, _loss_stats(ratio, log_ratio, mask, low, high, dual)


def clip_regions(ratio, adv, epsilon_low, epsilon_high, dual_clip):
    """The masks, built once for the loss and token_details; ratio, adv: [B, T]. low: r < 1 - eps_low and
    A < 0 (beta1); high: r > 1 + eps_high and A > 0 (beta2); dual: A < 0 and PPO's term -r * A, which
    grows without bound with r, above the cap -c * A (Ye et al. 2020): there the term is a constant."""
    low = (ratio < 1.0 - epsilon_low) & (adv < 0)                # [B, T]
    high = (ratio > 1.0 + epsilon_high) & (adv > 0)              # [B, T]
    if not dual_clip:
        return low, high, torch.zeros_like(low)
    value = torch.where(low, 1.0 - epsilon_low, torch.where(high, 1.0 + epsilon_high, ratio))   # the term's r, in value
    return low, high, (adv < 0) & (-value * adv > -dual_clip * adv)


def per_token(advantages, like):
    """Advantages [B] (one per response) or [B, T], as [B, T] in like's dtype."""
    adv = advantages if advantages.dim() == 2 else advantages[:, None]
    return adv.to(like.dtype).expand_as(like)


REGIONS = ("none", "low", "high", "dual")       # token_details' region codes 0-3


@torch.no_grad()
def token_details(algo, logp, old_logp, advantages, *, token_weights=None, **knobs):
    """What --algo's loss does to each token, [B, T] each: its ratio r, region (REGIONS' index) and F, the
    weight of its gradient, d loss / d log pi = -F * A / (token count): r inside the clip range, beta *
    bound in a clip region, 0 where the dual clip binds (CISPO: min(r, 1 + eps_high), region 2 where the
    cap binds, either sign of A); times the token's weight. A test checks F against autograd."""
    adv = per_token(advantages, logp)                                            # [B, T]
    ratio = torch.exp((logp - old_logp).clamp(-20.0, 20.0))                      # [B, T]
    if algo == "cispo":
        cap = 1.0 + knobs["epsilon_high"]
        weight, region = ratio.clamp(max=cap), torch.where(ratio > cap, 2, 0)
    else:
        eps_low, eps_high, beta1, beta2 = (knobs[k] for k in ("epsilon_low", "epsilon_high", "beta1", "beta2"))
        low, high, dual = clip_regions(ratio, adv, eps_low, eps_high, knobs["dual_clip"])
        weight = torch.where(low, beta1 * (1.0 - eps_low), torch.where(high, beta2 * (1.0 + eps_high), ratio))
        weight = torch.where(dual, 0.0, weight)
        region = torch.where(dual, 3, torch.where(high, 2, torch.where(low, 1, 0)))
    return {"ratio": ratio, "region": region, "F": weight * (1.0 if token_weights is None else token_weights)}


def _loss_stats(ratio, log_ratio, mask, low, high, dual):
    """The statistics every policy loss here returns: shares of the masked tokens in each region,
    the k3 estimate of KL(pi_old || pi) (non-negative, low variance: Schulman's note), the ratio."""
    with torch.no_grad():
        n = mask.sum().clamp(min=1.0)
        valid = mask > 0
        return {
            "clip_ratio/low_mean": ((low & valid).sum() / n).item(),
            "clip_ratio/high_mean": ((high & valid).sum() / n).item(),
            "clip_ratio/dual_mean": ((dual & valid).sum() / n).item(),
            "approx_kl": ((((ratio - 1.0) - log_ratio) * mask).sum() / n).item(),
            "ratio/mean": ((ratio * mask).sum() / n).item(),
            "ratio/max": ratio[valid].max().item() if valid.any() else 1.0,
        }


# cegppo_loss's statistics that are means over tokens: a trainer that accumulates micro-batches (or
# processes) averages them weighted by token count; ratio/max is reduced with max.
TOKEN_MEAN_STATS = ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/dual_mean", "approx_kl", "ratio/mean")


# The algorithms differ only in these five knobs, and this is their one home (--algo, the TRL bridge and
# the microscope read them here). beta1 = beta2 = 0 is PPO-clip: with group advantages GRPO, and with
# epsilon_high 0.28 DAPO's clip-higher.
ALGOS = {
    "cegppo": dict(beta1=0.5, beta2=1.0, epsilon_low=0.2, epsilon_high=0.2, dual_clip=10.0),
    "grpo": dict(beta1=0.0, beta2=0.0, epsilon_low=0.2, epsilon_high=0.2, dual_clip=10.0),
    "dapo": dict(beta1=0.0, beta2=0.0, epsilon_low=0.2, epsilon_high=0.28, dual_clip=10.0),
    # Klear-Reasoner's GPPO (arXiv 2508.07629), which CE-GPPO generalises: full bounded gradients
    "gppo": dict(beta1=1.0, beta2=1.0, epsilon_low=0.2, epsilon_high=0.2, dual_clip=10.0),
    # MiniMax-M1's CISPO: its own loss (cispo_loss), with no clip regions, so no betas, low range or dual
    # clip (None: train.py refuses them); its weight is capped at 1 + 4 (TRL recommends a cap of 5).
    "cispo": dict(beta1=None, beta2=None, epsilon_low=None, epsilon_high=4.0, dual_clip=None),
}


# Set the entropy, not the betas (train.py --entropy_target H*): after each step the betas move toward holding
# the policy's mean token entropy H at H*, by what they do to it (beta1 lowers it, beta2 keeps it up):
#   Hs <- Hs + smoothing * (H - Hs)                 the smoothed entropy (Hs = H at the first step)
#   e = log(Hs / H*), 0 within the dead band        relative: entropy spans orders of magnitude
#   d = rate * clip(e, -1, 1)                       at most `rate` a step
#   beta1 <- clip(beta1 + d, 0, beta_max),  beta2 <- clip(beta2 - d, 0, beta_max)
# Entropy above the target raises beta1 and lowers beta2, below it the reverse. The betas stay in their
# bounds and move by `rate` at most per step (no runaway); the smoothing averages a step's sampling noise
# and the dead band stops them from chattering around the target; on a signal that stays put they settle.
def steer_betas(beta1, beta2, smoothed, entropy, target, smoothing=0.2, dead_band=0.05, rate=0.05, beta_max=1.0):
    """(beta1, beta2, smoothed entropy) after a step whose mean token entropy was `entropy` (the rule above);
    smoothed is None before the first step."""
    smoothed = entropy if smoothed is None else smoothed + smoothing * (entropy - smoothed)
    e = math.log(max(smoothed, 1e-12) / target)
    d = 0.0 if abs(e) <= dead_band else rate * max(-1.0, min(1.0, e))
    return min(max(beta1 + d, 0.0), beta_max), min(max(beta2 - d, 0.0), beta_max), smoothed


# -------------------- A baseline beside the heart: CISPO, another way to keep the clipped gradients ---
# MiniMax-M1's CISPO (arXiv 2506.13585, Eq. 4-5; TRL's loss_type="cispo"), per response token:
#
#   l = sg(min(r, 1 + eps_high)) * A * log pi
#
# The weight is capped and detached instead of the objective clipped, so no token ever loses its
# gradient: F = min(r, 1 + eps_high) for every token, either sign of A. CE-GPPO keeps PPO-clip's F = r
# inside the clip range and gives clipped tokens a fixed beta * (1 +- eps); CISPO has no trust region.
def cispo_loss(logp, old_logp, advantages, mask, *, epsilon_high, num_tokens=None, token_weights=None):
    """CISPO policy loss (token mean) and cegppo_loss's statistics; arguments as cegppo_loss's.
    clip_ratio/high_mean counts the tokens whose weight the cap binds with A > 0 (TRL's cispo_clip_ratio)."""
    mask = mask.to(logp.dtype)                                   # [B, T]
    adv = per_token(advantages, logp)                            # [B, T]
    log_ratio = logp.detach() - old_logp.detach()                # [B, T] no gradient: the weight is sg(.)
    ratio = torch.exp(log_ratio.clamp(-20.0, 20.0))              # [B, T] r
    weight = ratio.clamp(max=1.0 + epsilon_high)                 # [B, T] sg(min(r, 1 + eps_high))
    if token_weights is not None:
        weight = weight * token_weights.detach()
    per_token_loss = -weight * adv * logp                        # [B, T]
    denom = mask.sum().clamp(min=1.0) if num_tokens is None else float(max(num_tokens, 1))
    loss = (per_token_loss * mask).sum() / denom
    capped = (ratio > 1.0 + epsilon_high) & (adv > 0)            # [B, T] the cap binds, A > 0 (TRL's count)
    none = torch.zeros_like(capped)
    return loss, _loss_stats(ratio, log_ratio, mask, none, capped, none)


def policy_loss(algo, logp, old_logp, advantages, mask, *, num_tokens=None, token_weights=None, **knobs):
    """The loss --algo names, with its knobs (ALGOS' keys): cispo_loss for cispo, else cegppo_loss."""
    if algo == "cispo":
        return cispo_loss(logp, old_logp, advantages, mask, epsilon_high=knobs["epsilon_high"], num_tokens=num_tokens,
                          token_weights=token_weights)
    return cegppo_loss(logp, old_logp, advantages, mask, num_tokens=num_tokens, token_weights=token_weights, **knobs)


def positive_sft_loss(logp, mask, positive, num_tokens=None, token_weights=None):
    """The authors' SFT term (not in the paper; their scripts add 0.1 times it): token-mean -log pi over the fully
    rewarded responses. logp, mask [B, T]; positive [B] bool; num_tokens as cegppo_loss's; token_weights the
    policy loss's, so that both terms learn from the same tokens. No positive response: a zero with a graph."""
    m = mask.to(logp.dtype) * positive.to(logp.dtype)[:, None]  # [B, T]
    denom = m.sum().clamp(min=1.0) if num_tokens is None else float(max(num_tokens, 1))
    if token_weights is not None:                                # (the denominator counts tokens, as cegppo_loss's)
        m = m * token_weights.detach().to(logp.dtype)
    return -(logp * m).sum() / denom


def group_advantages(rewards, group_size, eps=1e-6):
    """GRPO advantages: each reward's z-score within its group of G (rewards [P*G], a prompt's G next to each
    other). Returns (advantages [P*G], zero_std [P] bool): an all-equal group has no signal, advantages 0."""
    r = rewards.float().view(-1, group_size)                     # [P, G]
    mean = r.mean(dim=1, keepdim=True)                           # [P, 1]
    std = r.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(mean)  # unbiased, as GRPO
    zero_std = (r.max(dim=1).values - r.min(dim=1).values) == 0  # [P]
    adv = (r - mean) / (std + eps)                               # [P, G]
    adv = torch.where(zero_std[:, None], torch.zeros_like(adv), adv)
    return adv.view(-1), zero_std


# Where pi_old is recomputed by the training forward (a GPU: half-precision sampling never equals
# it exactly), the rollout's tokens came from pi_sample, not pi_old. TRL 1.16 corrects its vLLM
# sampler this way by default (vllm_importance_sampling_correction, mode sequence_mask, cap 3.0);
# verl calls the truncated form TIS. Per token t of response i, with d = log pi_old - log pi_sample:
#   token_*:    w_it = exp(d_it)             sequence_*: w_it = exp(sum_t d_it)  (one weight per response)
#   *_truncate: min(w, cap)                  *_mask:     w, or 0 where w > cap
SAMPLER_CORRECTIONS = ("off", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def sampler_correction(old_logp, sample_logp, mask, mode="sequence_mask", cap=3.0):
    """The weights [B, T] of each token's loss term (no gradient) and their statistics under TRL's
    names. old_logp, sample_logp, mask: [B, T]. Exactly 1 on every token where the sampler's numbers
    are pi_old (a CPU in float32: train.py's --old_logprobs sampler), and for mode "off"."""
    mask = mask.to(old_logp.dtype)
    diff = (old_logp.float() - sample_logp.float()) * mask                     # [B, T] log pi_old / pi_sample
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True).expand_as(diff)                      # [B, T] the response's sum
    w = torch.exp(diff.clamp(max=20.0)) if mode != "off" else torch.ones_like(diff)
    cut = (w > cap) & (mask > 0) if mode != "off" else torch.zeros_like(w, dtype=torch.bool)
    w = torch.where(cut, 0.0 if mode.endswith("mask") else cap, w) * mask      # [B, T]
    valid = mask > 0
    kept = w[valid]
    share = (cut.sum() / valid.sum().clamp(min=1)).item()
    return w, {"sampling/importance_sampling_ratio/min": kept.min().item() if kept.numel() else 1.0,
               "sampling/importance_sampling_ratio/mean": kept.mean().item() if kept.numel() else 1.0,
               "sampling/importance_sampling_ratio/max": kept.max().item() if kept.numel() else 1.0,
               "sampling/correction_masked": share if mode.endswith("mask") else 0.0,
               "sampling/correction_truncated": share if mode.endswith("truncate") else 0.0}


QUADRANTS = ("pa_hp", "pa_lp", "na_hp", "na_lp")


def token_quadrants(logp, entropy, advantages, mask):
    """The paper's token quadrants (Sec. 3.1) as metrics. A sampled token (l = log pi(a), H the entropy at
    its position) is PA / NA for A > 0 / A < 0 and HP / LP for l > -H / l <= -H (-H = E[log pi]: the sign in
    dH ~ -eta * Cov(log pi(a), pi(a) * A(a)), App. A.2); its entropy drive -(l + H) * A is the way it pushes
    entropy (PA&HP, NA&LP down; PA&LP, NA&HP up). logp, entropy, mask [B, T]; advantages [B] or [B, T].
    Returns quadrants/<q>_frac (share of the masked tokens) and _drive (its mean, 0 where empty) per q."""
    adv = per_token(advantages, logp.float())                    # [B, T]
    valid = mask > 0                                             # [B, T]
    quadrant = quadrant_of(logp, entropy, adv)                   # [B, T]
    drive = -(logp + entropy) * adv                              # [B, T]
    n = valid.sum().clamp(min=1)
    out = {}
    for q, name in enumerate(QUADRANTS):                         # pa_hp, pa_lp, na_hp, na_lp
        sel = (quadrant == q) & valid
        k = sel.sum()
        out[f"quadrants/{name}_frac"] = (k / n).item()
        out[f"quadrants/{name}_drive"] = (drive[sel].mean().item() if k > 0 else 0.0)
    return out


def quadrant_of(logp, entropy, adv):
    """Each token's quadrant as QUADRANTS' index (0 PA&HP, 1 PA&LP, 2 NA&HP, 3 NA&LP; -1 for A = 0),
    by token_quadrants' definition. logp, entropy, adv: [B, T]."""
    high_p = logp > -entropy                                     # [B, T]
    q = torch.where(adv > 0, torch.where(high_p, 0, 1), torch.where(high_p, 2, 3))
    return torch.where(adv == 0, -1, q)


# -------------------- The reward --------------------------------------------------------------
MAX_ANSWER_CHARS = 1000      # a "final answer" longer than this is not an answer; also bounds sympy
VERIFY_TIMEOUT_S = 2         # math-verify's own timeouts (signal based: main thread only)

logging.getLogger("math_verify").setLevel(logging.CRITICAL)   # it logs every timeout and parse miss


def extract_boxed(text):
    """Content of the last complete \\boxed{...} in text (nested braces handled), or None."""
    if not isinstance(text, str):
        return None
    starts = [m.end() for m in re.finditer(r"\\boxed\s*\{", text)]
    for start in reversed(starts):          # the last box that closes counts
        depth = 1
        for i in range(start, len(text)):
            c = text[i]
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    return text[start:i].strip()
    return None


def reference_answer(answer):
    """The gold answer as text: the part after '####' for GSM8K-style references."""
    answer = str(answer)
    if "####" in answer:
        answer = answer.split("####")[-1]
    return answer.strip()


def math_reward(completion, answer):
    """1.0 if the completion's last \\boxed{} is mathematically equal to the reference (math-verify: 1/2 and
    0.5, 1,000 and 1000), else 0.0. Never raises; time is bounded by math-verify's timeouts on the main
    thread, elsewhere (no signals) by MAX_ANSWER_CHARS."""
    try:
        pred = extract_boxed(completion)
        gold = reference_answer(answer)
        if not pred or not gold or len(pred) > MAX_ANSWER_CHARS or len(gold) > MAX_ANSWER_CHARS:
            return 0.0
        t = VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
        # Wrapping both in \boxed{} makes math-verify read them as LaTeX answers, not free text.
        g = parse("\\boxed{" + gold + "}", parsing_timeout=t)
        p = parse("\\boxed{" + pred + "}", parsing_timeout=t)
        if not g or not p:
            return 0.0
        return 1.0 if verify(g, p, timeout_seconds=t) else 0.0
    except (Exception, TimeoutException):   # TimeoutException is a BaseException
        return 0.0


# -------------------- The rollout -------------------------------------------------------------
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def format_prompt(tokenizer, question):
    """The chat-formatted prompt for one question (the tokenizer's own chat template)."""
    messages = [{"role": "user", "content": f"{question.strip()}\n{INSTRUCTION}"}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def eos_ids(tokenizer, model=None):
    """Every token id that ends a response (Qwen2.5-Instruct has two: <|im_end|>, <|endoftext|>)."""
    ids = set()
    for src in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if src is None:
            continue
        ids.update(src if isinstance(src, (list, tuple)) else [src])
    return sorted(ids)


def completion_mask(completion_ids, eos_token_ids):
    """Which completion tokens count: everything up to and including the first EOS (the model must learn to
    stop). completion_ids: [B, T] -> (mask [B, T] long, truncated [B] bool: no EOS). After the first EOS
    all is padding, even where pad == eos: hence the first EOS's position, never `ids != pad`."""
    is_eos = torch.isin(completion_ids, torch.tensor(list(eos_token_ids), device=completion_ids.device))
    T = completion_ids.shape[1]
    pos = torch.arange(T, device=completion_ids.device)[None, :]                    # [1, T]
    first = torch.where(is_eos, pos, torch.full_like(pos, T)).min(dim=1).values     # [B]
    truncated = first == T
    mask = (pos <= first[:, None]).long()                                           # [B, T]
    return mask, truncated


@dataclass
class Rollout:
    """Sampled completions, B = P prompts x G, a prompt's G next to each other (L: the padded prompt length,
    T: the completion length): what rollout returns and the loss's inputs come from."""
    input_ids: torch.Tensor               # [B, L + T] left-padded prompt, then completion
    attention_mask: torch.Tensor          # [B, L + T] 1 on prompt tokens and completion tokens up to the first EOS
    completion_mask: torch.Tensor         # [B, T]     1 on completion tokens up to and including the first EOS
    truncated: torch.Tensor               # [B] bool   no EOS within max_new_tokens
    prompt_len: int                       # L: completion tokens are input_ids[:, L:]
    texts: list                           # B strings: the decoded completions (special tokens dropped)
    sample_logp: Optional[torch.Tensor] = None      # [B, T] log pi_sample of each sampled token as the sampler
    #                                                 computed it (float32); 0 after the EOS; None when greedy
    sample_entropy: Optional[torch.Tensor] = None   # [B, T] the entropy of that softmax at each position


class NonFiniteLogits(RuntimeError):
    """The sampler's logits hold inf or nan (an fp16 overflow): its probabilities mean nothing. rows: the
    rows of the generate() call where they did."""

    def __init__(self, message, rows=()):
        super().__init__(message)
        self.rows = list(rows)


class FiniteLogits(LogitsProcessor):
    """Stops generate() with NonFiniteLogits at the first step whose logits hold nan or +inf, greedy or not:
    argmax over nan is junk, not an answer (-inf is a token a processor forbade, and allowed)."""

    def __call__(self, input_ids, scores):
        bad = torch.isnan(scores).any(-1) | torch.isposinf(scores).any(-1)          # [b]
        if bad.any():
            raise NonFiniteLogits("the sampler's logits are not finite", bad.nonzero()[:, 0].tolist())
        return scores


class SampledTokenLogProbs(FiniteLogits):
    """Records, while generate() samples, log pi(a_t) and the entropy H_t of the sampled tokens: called at each
    decode step with its logits [b, V] (before the temperature and top-p warpers) and the tokens so far, it
    keeps this step's softmax and reads the previous step's drawn token out of the one it kept (memory [b, V],
    token_logprobs' numbers whatever top_p does). finish(last_tokens) reads the final step."""

    def __init__(self, temperature):
        self.temperature = temperature
        self.logp, self.entropy = [], []      # one [b] tensor per decode step
        self.previous = None                  # [b, V] log-probs of the last step, awaiting its token

    def _read(self, tokens):
        if self.previous is not None:
            self.logp.append(self.previous.gather(-1, tokens[:, None])[:, 0])
            self.previous = None

    def __call__(self, input_ids, scores):
        self._read(input_ids[:, -1])                                                   # previous step's token
        super().__call__(input_ids, scores)                                            # nan / +inf: stop
        logprobs = torch.log_softmax(scores.float() / self.temperature, dim=-1)       # [b, V]
        # H = sum_v entr(p_v) = -sum_v p_v log p_v, with entr(0) = 0 (a forbidden token); one [b, V]
        # temporary beside p, where -(p * log p) with a mask took three
        self.entropy.append(torch.special.entr(logprobs.exp()).sum(-1))              # [b]
        self.previous = logprobs
        return scores                         # the sampling itself is untouched

    def finish(self, last_tokens):
        """(logp [b, T], entropy [b, T]) once generate() has returned its last column of tokens."""
        self._read(last_tokens)
        return torch.stack(self.logp, dim=1), torch.stack(self.entropy, dim=1)


@contextlib.contextmanager
def sampling_config(model, **knobs):
    """generate() samples from exactly `knobs` (transformers' neutral defaults for the rest): the model's own
    generation_config (a checkpoint's top_k, min_p, suppress_tokens, ...), from which generate() fills the
    rest, is set aside for the call: the sampler would draw from what neither the recorder nor pi_old is."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model    # (peft's wrapper: its model)
    saved = inner.generation_config
    inner.generation_config = GenerationConfig(**knobs)
    try:
        yield
    finally:
        inner.generation_config = saved


def generate(model, input_ids, attention_mask, temperature, group_size=1):
    """The definition of sampling: one generate() call over the rows [B, L] with the recorder. Returns
    (completion [B, T], sample_logp [B, T], sample_entropy [B, T]), the last two None when greedy."""
    recorder = SampledTokenLogProbs(temperature) if temperature else FiniteLogits()
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                         logits_processor=LogitsProcessorList([recorder]))
    completion = out[:, input_ids.shape[1]:]                                           # [B, T]
    return (completion, *recorder.finish(completion[:, -1])) if temperature else (completion, None, None)


@torch.no_grad()
def rollout(model, tokenizer, prompts, num_generations, max_new_tokens, temperature=1.0, top_p=1.0, generate=generate):
    """Sample `num_generations` completions for each chat-formatted prompt: a Rollout, with the sampler's own
    log pi and entropy of every sampled token (temperature 0: greedy, none). Non-finite logits (an fp16
    overflow) raise NonFiniteLogits. generate: the definition above, or a real run's (engine/generation.py:
    sub-batches that fit in memory, each prompt encoded once; the same numbers). The model samples in
    eval mode and is back in its own mode afterwards, however the call ends."""
    device = next(model.parameters()).device
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    ids = enc["input_ids"].repeat_interleave(num_generations, dim=0).to(device)             # [B, L]
    amask = enc["attention_mask"].repeat_interleave(num_generations, dim=0).to(device)      # [B, L]
    stop = eos_ids(tokenizer, model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    # Every sampling knob is set here (sampling_config): a model's own generation_config (Qwen2.5 ships top_k 20,
    # top_p 0.8, repetition_penalty 1.05) would change the distribution, and pi_old would not be the sampler's.
    knobs = dict(max_new_tokens=max_new_tokens, do_sample=temperature > 0, repetition_penalty=1.0,
                 eos_token_id=stop, pad_token_id=pad, use_cache=True)
    if temperature > 0:   # top_k 0 switches top-k filtering off
        knobs.update(temperature=temperature, top_p=top_p, top_k=0)
    was_training = model.training
    model.eval()
    try:
        with sampling_config(model, **knobs):
            completion, sample_logp, sample_entropy = generate(model, ids, amask, temperature, num_generations)
    finally:
        model.train(was_training)
    cmask, truncated = completion_mask(completion, stop)                                  # [B, T], [B]
    return Rollout(input_ids=torch.cat([ids, completion], dim=1), attention_mask=torch.cat([amask, cmask], dim=1),
                   completion_mask=cmask, truncated=truncated, prompt_len=ids.shape[1],
                   texts=tokenizer.batch_decode(completion * cmask + pad * (1 - cmask), skip_special_tokens=True),
                   # a finished row's padding never counts
                   sample_logp=None if sample_logp is None else sample_logp * cmask,
                   sample_entropy=None if sample_entropy is None else sample_entropy * cmask)


# -------------------- Log-probs and entropy ---------------------------------------------------
def token_logprobs(logits, targets, temperature=1.0):
    """The definition: log pi(target) and the entropy H of the temperature-scaled softmax; logits [N, V],
    targets [N] -> (logp [N], entropy [N]) in float32 (or float64). What every log-prob in the loop means
    (engine/logprobs.py computes them chunk by chunk: at V = 151,936 a batch's [N, V] does not fit)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature   # [N, V]
    logprobs = torch.log_softmax(logits, dim=-1)                                      # [N, V]
    logp = logprobs.gather(-1, targets[:, None])[:, 0]                               # [N]
    entropy = -(logprobs.exp() * logprobs).sum(-1)                                    # [N]
    return logp, entropy


def completion_states(model, input_ids, attention_mask, prompt_len):
    """The hidden states that predict the completion tokens, and those tokens: ([B*T, d], [B*T]), from a
    Rollout's input_ids, attention_mask [B, L + T]. Position ids from the attention mask, as generate()
    counts them (with left padding the first real token is position 0, or the logits differ)."""
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)                # [B, L + T]
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 use_cache=False).last_hidden_state                   # [B, L + T, d]
    B, T = input_ids.shape[0], input_ids.shape[1] - prompt_len
    h = hidden[:, prompt_len - 1:-1].reshape(B * T, -1)       # [B*T, d] the state that predicts token t
    return h, input_ids[:, prompt_len:].reshape(B * T)         # [B*T] the tokens


def completion_logprobs(model, input_ids, attention_mask, prompt_len, temperature=1.0):
    """log pi(a_t) and the entropy H_t of the completion tokens: (logp [B, T], entropy [B, T]) in float32,
    logp with the gradient where grad is on; at the sampling temperature, which pi_old must share with the
    sampler (or the ratio is not 1 on-policy)."""
    h, targets = completion_states(model, input_ids, attention_mask, prompt_len)     # [B*T, d], [B*T]
    logp, entropy = token_logprobs(model.get_output_embeddings()(h), targets, temperature)
    B = input_ids.shape[0]
    return logp.view(B, -1), entropy.view(B, -1)
