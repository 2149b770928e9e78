"""CE-GPPO in one file: the loss, the advantages, the token quadrants, the reward, the rollout and the log-probs.

CE-GPPO (Su et al., 2025, arXiv 2509.20712, Eq. 8-10) is PPO-clip with one change. Plain PPO
clipping zeroes the gradient of every token whose importance ratio r = pi / pi_old has left
[1 - eps, 1 + eps]. Those tokens are mostly low-probability ones, and they steer the policy's
entropy. CE-GPPO puts their gradient back, scaled by beta1 (the low clip region) and beta2 (the
high clip region) and bounded, through a stop-gradient: the equation is written out once, above
cegppo_loss. beta1 = beta2 = 0 is exactly PPO-clip (GRPO with group advantages).

The file in reading order; the first section is the whole of CE-GPPO's change to PPO, the
others are what any GRPO-style trainer needs around it:
    cegppo_loss, ALGOS      the objective and the algorithms' settings (the file's heart)
    cispo_loss, policy_loss  a baseline that keeps the clipped gradients another way; --algo's loss
    positive_sft_loss       the authors' optional SFT term on fully rewarded responses
    group_advantages        GRPO's group z-score, and which groups carry no signal
    sampler_correction      importance weights where the sampler's numbers are not pi_old (TRL's, TIS)
    token_quadrants         the paper's PA/NA x HP/LP analysis as per-step metrics
    math_reward             the verifiable reward (math-verify decides equality)
    rollout                 sampling G completions per prompt, with the sampler's own log-probs
    token_logprobs, completion_logprobs   per-token log pi and entropy of the sampled tokens
    (appendix) _TokenLogProb   the same log-probs without ever building the [B, T, V] logits

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
import warnings

import torch
import torch.nn.functional as F
from math_verify import parse, verify
from math_verify.errors import TimeoutException
from transformers import DynamicCache, GenerationConfig, LogitsProcessor, LogitsProcessorList


# ----------------------------------------------------------------------------------------------
# The loss
# ----------------------------------------------------------------------------------------------
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
                num_tokens=None, tokens=False, token_weights=None):
    """CE-GPPO policy loss (token mean) and its statistics. The knobs' defaults live in ALGOS.

    logp:       [B, T] log pi_theta of each response token (carries the gradient)
    old_logp:   [B, T] log pi_old, the sampling policy (no gradient)
    advantages: [B] one per response, or [B, T]
    mask:       [B, T] over the completion tokens only: 1 up to and including the first EOS, 0 after it
    dual_clip:  c of the dual clip for A < 0 (term <= -c * A); 0 or None switches it off
    num_tokens: denominator of the token mean; defaults to mask.sum(). Pass the mini-batch's token
                count when accumulating micro-batches, so that their losses add up to its mean.
    token_weights: [B, T] or None, weights of each token's term (no gradient): the correction for a
                sampler whose numbers differ from pi_old (sampler_correction); None is 1 everywhere.
    Returns (loss, stats) with stats' values as Python floats, under the names train.py logs; with
    tokens=True also what the loss did to each token (token_details: its ratio, region and F).
    """
    mask = mask.to(logp.dtype)                                   # [B, T]
    adv = advantages if advantages.dim() == 2 else advantages[:, None]
    adv = adv.to(logp.dtype).expand_as(logp)                     # [B, T]
    log_ratio = logp - old_logp.detach()                         # [B, T]
    # exp of a large log-ratio overflows to inf and then inf * 0 = nan in the masked sum; a ratio
    # of e^20 is far outside any clip range, so clamping changes nothing that is used.
    ratio = torch.exp(log_ratio.clamp(-20.0, 20.0))              # [B, T] r

    # The masks, built once: which tokens sit in which clip region.
    low = (ratio < 1.0 - epsilon_low) & (adv < 0)                # [B, T] coefficient beta1 (NA&LP)
    high = (ratio > 1.0 + epsilon_high) & (adv > 0)              # [B, T] coefficient beta2 (PA&LP)

    # carrier: value 0, gradient d(log pi). Adding beta * bound * carrier to the clipped constant
    # gives PPO-clip's value and CE-GPPO's gradient (see the module docstring).
    carrier = ratio / ratio.detach() - 1.0                       # [B, T]
    coef = torch.where(low, (1.0 - epsilon_low) * (1.0 + beta1 * carrier),
           torch.where(high, (1.0 + epsilon_high) * (1.0 + beta2 * carrier), ratio))   # [B, T]
    per_token = -coef * adv                                      # [B, T]

    # Dual clip: with A < 0 the PPO term -r * A grows without bound as r grows; cap it at -c * A.
    # Where the cap binds the term is a constant, so the gradient there is zero.
    dual = torch.zeros_like(low)                                 # [B, T]
    if dual_clip:
        cap = -dual_clip * adv                                   # [B, T]
        dual = (adv < 0) & (per_token > cap)
        per_token = torch.where(dual, cap, per_token)
    if token_weights is not None:
        per_token = per_token * token_weights.detach()

    # Token mean over the whole batch (verl's "token-mean", the authors' choice).
    denom = mask.sum().clamp(min=1.0) if num_tokens is None else float(max(num_tokens, 1))
    loss = (per_token * mask).sum() / denom
    stats = _loss_stats(ratio, log_ratio, mask, low, high, dual)
    if not tokens:
        return loss, stats
    # F of d loss / d log pi = -F * A / denom, from the masks and coefficients above (a test checks
    # it against autograd): r inside, beta * bound in a clip region, 0 where the dual clip binds
    weight = torch.where(low, beta1 * (1.0 - epsilon_low), torch.where(high, beta2 * (1.0 + epsilon_high), ratio))
    weight = torch.where(dual, 0.0, weight) * (1.0 if token_weights is None else token_weights)
    return loss, stats, token_details(ratio, low, high, dual, weight)


REGIONS = ("none", "low", "high", "dual")       # token_details' region codes 0-3


def token_details(ratio, low, high, dual, weight):
    """What a policy loss did to each token, [B, T] each (no gradient): the ratio r, the region
    (REGIONS' index: 1 low clip, 2 high clip, 3 dual clip, 0 none) and F, the token's gradient weight."""
    region = torch.where(dual, 3, torch.where(high, 2, torch.where(low, 1, 0)))
    return {"ratio": ratio.detach(), "region": region, "weight": weight.detach()}


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


# The algorithms differ only in these five knobs; this is their one home (train.py's
# --algo, the TRL bridge and the microscope read them from here). beta1 = beta2 = 0 is PPO-clip,
# which with group advantages is GRPO, and with epsilon_high 0.28 DAPO's clip-higher.
ALGOS = {
    "cegppo": dict(beta1=0.5, beta2=1.0, epsilon_low=0.2, epsilon_high=0.2, dual_clip=10.0),
    "grpo": dict(beta1=0.0, beta2=0.0, epsilon_low=0.2, epsilon_high=0.2, dual_clip=10.0),
    "dapo": dict(beta1=0.0, beta2=0.0, epsilon_low=0.2, epsilon_high=0.28, dual_clip=10.0),
    # Klear-Reasoner's GPPO (Su et al., 2025, arXiv 2508.07629), which CE-GPPO generalises: both
    # clipped regions keep their full bounded gradient.
    "gppo": dict(beta1=1.0, beta2=1.0, epsilon_low=0.2, epsilon_high=0.2, dual_clip=10.0),
    # MiniMax-M1's CISPO: its own loss (cispo_loss below), which has no clip regions, so no betas, no
    # low range and no dual clip (None: train.py refuses them); epsilon_high caps its importance
    # weight at 1 + 4 = 5 (TRL's loss_type="cispo" recommends epsilon_high 5.0, its cap itself).
    "cispo": dict(beta1=None, beta2=None, epsilon_low=None, epsilon_high=4.0, dual_clip=None),
}


# ----------------------------------------------------------------------------------------------
# A baseline beside the heart: CISPO keeps every clipped token's gradient another way
# ----------------------------------------------------------------------------------------------
# MiniMax-M1's CISPO (arXiv 2506.13585, Eq. 4-5; TRL's loss_type="cispo"), per response token:
#
#   l = sg(min(r, 1 + eps_high)) * A * log pi
#
# The importance weight is capped and detached instead of the objective being clipped, so no token
# ever loses its gradient: F = min(r, 1 + eps_high) for every token, either sign of A. CE-GPPO keeps
# PPO-clip's F = r inside [1 - eps, 1 + eps] and gives the clipped tokens a fixed beta * (1 +- eps);
# CISPO has no trust region at all, only a cap on the weight. Token mean, as cegppo_loss.
def cispo_loss(logp, old_logp, advantages, mask, *, epsilon_high, num_tokens=None, tokens=False, token_weights=None):
    """CISPO policy loss (token mean) and the statistics of cegppo_loss, under the same names.

    logp, old_logp, mask: [B, T]; advantages: [B] or [B, T]; num_tokens, token_weights as in cegppo_loss.
    clip_ratio/high_mean counts the tokens whose weight the cap binds with A > 0 (TRL's
    cispo_clip_ratio); CISPO has no low clip region and no dual clip (their shares are 0). With
    tokens=True, region 2 marks every token whose weight the cap binds, either sign of A.
    """
    mask = mask.to(logp.dtype)                                   # [B, T]
    adv = advantages if advantages.dim() == 2 else advantages[:, None]
    adv = adv.to(logp.dtype).expand_as(logp)                     # [B, T]
    log_ratio = logp.detach() - old_logp.detach()                # [B, T] no gradient: the weight is sg(.)
    ratio = torch.exp(log_ratio.clamp(-20.0, 20.0))              # [B, T] r
    weight = ratio.clamp(max=1.0 + epsilon_high)                 # [B, T] sg(min(r, 1 + eps_high))
    if token_weights is not None:
        weight = weight * token_weights.detach()
    per_token = -weight * adv * logp                             # [B, T]
    denom = mask.sum().clamp(min=1.0) if num_tokens is None else float(max(num_tokens, 1))
    loss = (per_token * mask).sum() / denom
    capped = ratio > 1.0 + epsilon_high                          # [B, T] the cap binds, either sign of A
    none = torch.zeros_like(capped)
    stats = _loss_stats(ratio, log_ratio, mask, none, capped & (adv > 0), none)
    return (loss, stats, token_details(ratio, none, capped, none, weight)) if tokens else (loss, stats)


def policy_loss(algo, logp, old_logp, advantages, mask, *, num_tokens=None, tokens=False, token_weights=None,
                **knobs):
    """The loss --algo names, with its knobs (ALGOS' keys): cispo_loss for cispo, else cegppo_loss."""
    if algo == "cispo":
        return cispo_loss(logp, old_logp, advantages, mask, epsilon_high=knobs["epsilon_high"], num_tokens=num_tokens,
                          tokens=tokens, token_weights=token_weights)
    return cegppo_loss(logp, old_logp, advantages, mask, num_tokens=num_tokens, tokens=tokens,
                       token_weights=token_weights, **knobs)


def positive_sft_loss(logp, mask, positive, num_tokens=None, token_weights=None):
    """The authors' positive-sample SFT term: token-mean -log pi over the responses that earned the full reward.

    Not in the paper; the authors' scripts add it with coefficient 0.1 (Klear-Reasoner's RL + SFT
    objective), as  loss = cegppo_loss + sft_coef * positive_sft_loss.
    logp, mask: [B, T]; positive: [B] bool. num_tokens: the denominator, by default the number of
    response tokens of positive responses here (pass the mini-batch's count when accumulating).
    token_weights: [B, T] or None, the policy loss's (sampler_correction): a token the correction
    weighs down or masks out is learnt from as little here, so that both terms see the same tokens.
    With no positive response the result is a zero that still carries the graph.
    """
    m = mask.to(logp.dtype) * positive.to(logp.dtype)[:, None]  # [B, T]
    denom = m.sum().clamp(min=1.0) if num_tokens is None else float(max(num_tokens, 1))
    if token_weights is not None:                                # (the denominator counts tokens, as cegppo_loss's)
        m = m * token_weights.detach().to(logp.dtype)
    return -(logp * m).sum() / denom


def group_advantages(rewards, group_size, eps=1e-6):
    """GRPO advantages: z-score of each reward within its group of G responses to one prompt.

    rewards: [N] with N = P * G, the G responses of a prompt next to each other.
    Returns (advantages [N], zero_std [P] bool). A group whose rewards are all equal has no
    learning signal: its advantages are exactly 0 and zero_std marks it, so the trainer can drop
    it (the authors' dynamic sampling filters these groups out before the update).
    """
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
    """The paper's token quadrants (Sec. 3.1) as metrics.

    Definition. For a sampled token a with log-prob l = log pi(a) and entropy H at its position:
      PA / NA: advantage A > 0 / A < 0 (tokens with A = 0 belong to no quadrant);
      HP / LP: l > -H / l <= -H. Since -H = E_pi[log pi], "high probability" means above the
      policy's average log-prob there, which is exactly the sign of log pi(a) - E[log pi] in the
      first-order entropy change  dH ~ -eta * Cov(log pi(a), pi(a) * A(a))  (paper App. A.2).
      Entropy drive: -(l + H) * A. Its sign says which way that token's gradient pushes entropy:
      PA&HP and NA&LP drive it down (negative), PA&LP and NA&HP drive it up (positive).

    logp, entropy, mask: [B, T] (logp and entropy under the sampling policy); advantages: [B] or [B, T].
    Returns {"quadrants/<q>_frac": share of the masked tokens, "quadrants/<q>_drive": mean drive in
    the quadrant} for q in pa_hp, pa_lp, na_hp, na_lp (drive 0.0 for an empty quadrant). train.py
    passes the trained tokens (the kept groups, every one with A != 0), the same tokens the clip
    ratios count, so the four fractions add up to 1.
    """
    adv = advantages if advantages.dim() == 2 else advantages[:, None]
    adv = adv.float().expand_as(logp)                            # [B, T]
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


# ----------------------------------------------------------------------------------------------
# The reward
# ----------------------------------------------------------------------------------------------
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
    """1.0 if the completion's last \\boxed{} is mathematically equal to the reference, else 0.0.

    Equality is math-verify's (fractions vs decimals, 1,000 vs 1000, equivalent expressions).
    Never raises. Time is bounded by math-verify's timeouts when called from the main thread; from
    another thread (where signals cannot be used) inputs are still bounded by MAX_ANSWER_CHARS.
    """
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


# ----------------------------------------------------------------------------------------------
# The rollout
# ----------------------------------------------------------------------------------------------
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
    """Which completion tokens count: everything up to and including the first EOS.

    completion_ids: [B, T]. Returns (mask [B, T] long, truncated [B] bool). The first EOS is kept
    (the model must learn to stop); everything after it is padding even when pad == eos, which is
    why the mask comes from the *first* EOS position and not from `ids != pad`. A row with no EOS
    ran into the length limit: truncated.
    """
    is_eos = torch.isin(completion_ids, torch.tensor(list(eos_token_ids), device=completion_ids.device))
    T = completion_ids.shape[1]
    pos = torch.arange(T, device=completion_ids.device)[None, :]                    # [1, T]
    first = torch.where(is_eos, pos, torch.full_like(pos, T)).min(dim=1).values     # [B]
    truncated = first == T
    mask = (pos <= first[:, None]).long()                                           # [B, T]
    return mask, truncated


class NonFiniteLogits(RuntimeError):
    """The sampler's logits hold inf or nan (e.g. an fp16 overflow): its probabilities mean nothing.
    rows: the rows of the generate() call whose logits were not finite (indices into its batch)."""

    def __init__(self, message, rows=()):
        super().__init__(message)
        self.rows = list(rows)


class FiniteLogits(LogitsProcessor):
    """Stops generate() with NonFiniteLogits at the first decode step whose logits hold nan or +inf (an fp16
    overflow), for greedy decoding as for sampling: argmax over nan is a junk token, not an answer.
    -inf is a token a processor forbade, and allowed."""

    def __call__(self, input_ids, scores):
        bad = torch.isnan(scores).any(-1) | torch.isposinf(scores).any(-1)          # [b]
        if bad.any():
            raise NonFiniteLogits("the sampler's logits are not finite", bad.nonzero()[:, 0].tolist())
        return scores


class SampledTokenLogProbs(FiniteLogits):
    """Records, while generate() samples, log pi(a_t) and the entropy H_t of the sampled tokens.

    generate() calls it once per decode step with that step's logits [b, V] (float32) before the
    temperature and top-p warpers (transformers runs its own processors, such as a repetition
    penalty, first, then the caller's, then the warpers; rollout switches its own off), and with the
    tokens so far, whose last column is the token drawn at the previous step. So each call keeps
    the plain temperature softmax of this step and reads the previous step's drawn token out of
    the one it kept before: memory [b, V], never [b, T, V]. The numbers are those token_logprobs
    defines, whatever top_p does to the sampling. finish(last_tokens) reads the final step.
    """

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


class CastKVCache(DynamicCache):
    """generate()'s KV cache, stored in the autocast dtype. Through the 4-bit policy, k and v leave their
    layers in float32 (the residual stream's dtype after k-bit preparation): the default cache would
    hold them in float32, twice the memory, and attention under autocast would cast the whole cache
    down again at every decode step. Cast once as stored, attention sees the very numbers it would
    have cast to."""

    def __init__(self, dtype, **kwargs):
        super().__init__(**kwargs)
        self.store_dtype = dtype

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return super().update(key_states.to(self.store_dtype), value_states.to(self.store_dtype), layer_idx,
                              *args, **kwargs)


@contextlib.contextmanager
def head_cast_once(model):
    """generate() through the 4-bit policy under autocast: k-bit preparation keeps its LM head in float32,
    and autocast would cast the [V, d] weight to the compute dtype again at every decode step (and keep
    no cache of it: the head is frozen). Cast once for the whole call: the very numbers autocast would
    have made, one copy. A head already in the autocast dtype (the dense copy's), or no autocast: as is."""
    head, device = model.get_output_embeddings(), next(model.parameters()).device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    if dtype is None or head.weight.dtype == dtype or type(head) is not torch.nn.Linear:
        yield
        return
    weight = head.weight.detach().to(dtype)                                  # [V, d]
    bias = None if head.bias is None else head.bias.detach().to(dtype)
    head.forward = lambda x: F.linear(x, weight, bias)
    try:
        yield
    finally:
        del head.forward                                                     # the class's forward again


def prompt_cache(model, prompt_ids, prompt_mask):
    """Each prompt's keys and values once, for generate() to sample its G completions from: a forward
    over the prompts [P, L] without their last token (the one generate() runs itself, which starts
    the decoding), positions as generate() counts them. Returns [(K, V) per layer], [P, heads, L - 1, d]."""
    position_ids = (prompt_mask.long().cumsum(-1) - 1).clamp(min=0)
    device = prompt_ids.device.type
    cache = CastKVCache(torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else DynamicCache()
    model.get_decoder()(input_ids=prompt_ids[:, :-1], attention_mask=prompt_mask[:, :-1],      # no LM head:
                        position_ids=position_ids[:, :-1], cache=cache, use_cache=True)        # no [P, L, V] logits
    return [(layer.keys, layer.values) for layer in cache.layers]


def expanded_prompt_cache(model, prompts, rows, group_size, half):
    """generate()'s cache for `rows` of a rollout: their prompts [(ids, mask)] encoded once each (prompt_cache)
    and expanded to the rows, layer by layer, each layer's prompt cache freed once expanded. In a function of
    its own so that an out-of-memory error part way through frees what it had built with its frame."""
    first = int(rows[0]) // group_size
    kv = prompt_cache(model, *(t[first:int(rows[-1]) // group_size + 1] for t in prompts))
    cache = CastKVCache(half) if half else DynamicCache()
    for layer in range(len(kv)):
        (k, v), kv[layer] = kv[layer], None
        cache.update(k[rows // group_size - first], v[rows // group_size - first], layer)
    return cache


def _generate(model, input_ids, attention_mask, batch_size, temperature=None, shrink_on_oom=True,
              processors=(), prompts=None, group_size=1):
    """model.generate over sub-batches; on CUDA out-of-memory halve the sub-batch and retry
    (or, with shrink_on_oom False, raise at once: the caller has memory of its own to give back).
    `processors` run after the recorder and must leave the logits as they are (a progress bar).
    Non-finite logits raise NonFiniteLogits with the rows (of input_ids) where they appeared.

    prompts: (prompt_ids [P, L], prompt_mask [P, L]) of the distinct prompts, each the prompt of
    `group_size` consecutive rows: each sub-batch encodes its own prompts once (prompt_cache) and
    starts from their cache expanded to its rows, instead of encoding every row's prompt. Per
    sub-batch, inside the halving, so that the prefill never holds more than the plain one would.
    Returns ([completion [b, t]], [(logp, entropy) [b, t] each, or None], the sub-batch that fit):
    with a temperature, the sampler's own log-probs of its tokens (SampledTokenLogProbs)."""
    outs, scored, i = [], [], 0
    device = input_ids.device.type
    half = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None   # (a GPU's)
    while i < input_ids.shape[0]:
        rows = torch.arange(i, min(i + batch_size, input_ids.shape[0]), device=input_ids.device)
        recorder = SampledTokenLogProbs(temperature) if temperature else FiniteLogits()
        cache = out = None
        try:
            if prompts is not None:      # the sub-batch's prompts once, then their cache expanded to its rows
                cache = expanded_prompt_cache(model, prompts, rows, group_size, half)
            elif half:                   # under autocast a cache that keeps k and v in the compute dtype
                cache = CastKVCache(half)
            out = model.generate(input_ids=input_ids[rows], attention_mask=attention_mask[rows],
                                 logits_processor=LogitsProcessorList([recorder, *processors]),
                                 **({"cache": cache} if cache is not None else {}))
        except torch.OutOfMemoryError:
            if batch_size == 1 or not shrink_on_oom:
                raise
        except NonFiniteLogits as e:
            e.rows = [i + r for r in e.rows]                                        # rows of the whole call
            raise
        if out is None:       # out of memory; here, past the except, the failed call's frames are freed
            del recorder, cache
            torch.cuda.empty_cache()
            for p in processors:                      # a watcher (a progress bar) forgets the failed attempt
                getattr(p, "retry", lambda: None)()
            batch_size = max(1, batch_size // 2)
            warnings.warn(f"out of memory in generation: retrying with generation batch {batch_size}", stacklevel=2)
            continue
        completion = out[:, input_ids.shape[1]:]                                      # [b, t]
        outs.append(completion)
        scored.append(recorder.finish(completion[:, -1]) if temperature else None)
        i += batch_size
    return outs, scored, batch_size


@contextlib.contextmanager
def sampling_config(model, **knobs):
    """generate() samples from exactly `knobs` and transformers' neutral defaults for everything else: the
    model's own generation_config (a checkpoint's top_k, min_p, suppress_tokens, no_repeat_ngram_size or
    any knob added later) is set aside for the call, since generate() fills every knob its caller leaves
    unset from it, and the sampler would then draw from a distribution neither the recorder nor pi_old
    describes. Put back however the call ends."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model    # (peft's wrapper: its model)
    saved = inner.generation_config
    inner.generation_config = GenerationConfig(**knobs)
    try:
        yield
    finally:
        inner.generation_config = saved


@torch.no_grad()
def rollout(model, tokenizer, prompts, num_generations, max_new_tokens, temperature=1.0, top_p=1.0,
            batch_size=64, shrink_on_oom=True, processors=(), share_prompts=True):
    """Sample `num_generations` completions for each chat-formatted prompt.

    Returns a dict (L: padded prompt length, T: completion length, B = P prompts x G):
      input_ids       [B, L + T] left-padded prompt then completion, B = len(prompts) * G
      attention_mask  [B, L + T] 1 on prompt tokens and on completion tokens up to the first EOS
      completion_mask [B, T]     1 on completion tokens up to and including the first EOS
      truncated       [B] bool   no EOS within max_new_tokens
      prompt_len      L          completion tokens are input_ids[:, L:]
      sample_logp     [B, T]     log pi_sample of each sampled token, float32, as the sampler computed
                                 it (the temperature softmax of token_logprobs); 0 after the EOS
      sample_entropy  [B, T]     the entropy of that softmax at each position; 0 after the EOS
      texts           B strings  the decoded completions (special tokens dropped)
      gen_batch_size  the generation sub-batch that fit in memory (for the next call)
    temperature 0 means greedy (then no sample_logp / sample_entropy). The responses to one
    prompt are next to each other. On CUDA out-of-memory the generation sub-batch halves and
    generate() runs again, unless shrink_on_oom is False. Non-finite logits (an fp16 overflow) raise
    NonFiniteLogits, greedy or not. `processors`: logits processors that only
    watch the decoding (runtime.GenerationProgress, a progress bar), run once per decoded token.
    share_prompts: encode each prompt once (prompt_cache) and sample its G completions from that
    cache, rather than encoding it in each of the G rows: the same numbers, to rounding.
    The model is in eval mode while it samples and back in its own mode afterwards, however the call ends.
    """
    device = next(model.parameters()).device
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    ids = enc["input_ids"].repeat_interleave(num_generations, dim=0).to(device)             # [B, L]
    amask = enc["attention_mask"].repeat_interleave(num_generations, dim=0).to(device)      # [B, L]
    stop = eos_ids(tokenizer, model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    # Every sampling knob is set here, the rest are transformers' neutral defaults (sampling_config): a
    # model's own generation_config (Qwen2.5 ships top_k 20, top_p 0.8, repetition_penalty 1.05) would
    # otherwise change the sampling distribution, and the old log-probs would no longer be the sampler's.
    knobs = dict(max_new_tokens=max_new_tokens, do_sample=temperature > 0, repetition_penalty=1.0,
                 eos_token_id=stop, pad_token_id=pad, use_cache=True)
    if temperature > 0:   # top_k 0 switches top-k filtering off
        knobs.update(temperature=temperature, top_p=top_p, top_k=0)
    share = share_prompts and num_generations > 1 and enc["input_ids"].shape[1] > 1
    prompt_rows = (enc["input_ids"].to(device), enc["attention_mask"].to(device)) if share else None
    was_training = model.training
    model.eval()
    try:
        with head_cast_once(model), sampling_config(model, **knobs):
            chunks, scored, batch_size = _generate(model, ids, amask, batch_size, temperature, shrink_on_oom,
                                                   processors, prompt_rows, num_generations)
    finally:
        model.train(was_training)
    T = max(c.shape[1] for c in chunks)
    completion = torch.cat([F.pad(c, (0, T - c.shape[1]), value=pad) for c in chunks])       # [B, T]
    cmask, truncated = completion_mask(completion, stop)
    out = {
        "input_ids": torch.cat([ids, completion], dim=1),
        "attention_mask": torch.cat([amask, cmask], dim=1),
        "completion_mask": cmask,
        "truncated": truncated,
        "prompt_len": ids.shape[1],
        "texts": tokenizer.batch_decode(completion * cmask + pad * (1 - cmask), skip_special_tokens=True),
        "gen_batch_size": batch_size,
    }
    if temperature > 0:
        for k, key in enumerate(("sample_logp", "sample_entropy")):
            t = torch.cat([F.pad(s[k], (0, T - s[k].shape[1])) for s in scored])         # [B, T]
            out[key] = t * cmask                   # a finished row's padding never counts
    return out


# ----------------------------------------------------------------------------------------------
# Log-probs and entropy
# ----------------------------------------------------------------------------------------------
def token_logprobs(logits, targets, temperature=1.0):
    """The definition: log pi(target) and the entropy H of the temperature-scaled softmax.

    logits: [N, V]; targets: [N]. Returns (logp [N], entropy [N]) in float32 (or float64).
    This is what every log-prob in the loop means. completion_logprobs computes the same two
    numbers chunk by chunk (_TokenLogProb, at the end of the file), because at Qwen2.5's
    vocabulary (V = 151,936) the float32 [N, V] tensor of a whole batch does not fit in memory.
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature   # [N, V]
    logprobs = torch.log_softmax(logits, dim=-1)                                      # [N, V]
    logp = logprobs.gather(-1, targets[:, None])[:, 0]                               # [N]
    entropy = -(logprobs.exp() * logprobs).sum(-1)                                    # [N]
    return logp, entropy


def completion_logprobs(model, input_ids, attention_mask, prompt_len, temperature=1.0, chunk_tokens=1024,
                        with_entropy=True, chunked=True):
    """Per-token log pi(a_t) and full-vocabulary entropy H_t for the completion tokens.

    input_ids, attention_mask: [B, L + T] as returned by rollout; completion tokens start at prompt_len.
    Returns (logp [B, T], entropy [B, T]) in float32; logp carries the gradient when grad is on.
    with_entropy=False skips the entropy (zeros come back): the optimizer updates do not need it.
    chunked=False computes the plain definition (token_logprobs) on the whole [B*T, V] logits.

    The logits are divided by the sampling temperature: pi_old must be the distribution the rollout
    sampled from, or the ratio is not 1 on-policy. The body runs once; the LM head only on the
    T completion positions.
    """
    body, head = model.get_decoder(), model.get_output_embeddings()
    # Position ids from the attention mask, as generate() computes them: with left padding the
    # first real prompt token is position 0. Without this the logits differ from the rollout's.
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)                # [B, L + T]
    hidden = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                  use_cache=False).last_hidden_state                                  # [B, L + T, d]
    B, T = input_ids.shape[0], input_ids.shape[1] - prompt_len
    h = hidden[:, prompt_len - 1:-1].reshape(B * T, -1)       # [B*T, d] the state that predicts token t
    targets = input_ids[:, prompt_len:].reshape(B * T)         # [B*T]
    if not chunked:
        logp, entropy = token_logprobs(head(h), targets, temperature)
        return logp.view(B, T), (entropy if with_entropy else torch.zeros_like(entropy)).view(B, T)
    weight, bias = head_operands(head, h.device.type)
    logp, entropy = _TokenLogProb.apply(h, weight, bias, targets, temperature, chunk_size(B * T, chunk_tokens),
                                        with_entropy)
    return logp.view(B, T), entropy.view(B, T)


# ----------------------------------------------------------------------------------------------
# Appendix: the same log-probs without the [B, T, V] logits (memory, not algorithm)
# ----------------------------------------------------------------------------------------------
def chunk_size(positions, chunk_tokens=1024):
    """Positions per LM-head chunk: at most chunk_tokens and at most 1/16 of all positions.

    A chunk holds at most two float32 [n, V] tensors at once (_TokenLogProb), so the transient
    memory stays near 2/16 of the naive [B, T, V] float32 logits at any batch size, and far less
    for large batches once chunk_tokens caps n (measured by `bench.py --logprob-memory`)."""
    return max(1, min(chunk_tokens, math.ceil(positions / 16)))


def head_operands(head, device_type):
    """The LM head's weight and bias in the precision the log-prob chunks multiply in, cast at most
    once per pass (never per chunk): float32 (TF32 on GPUs that have it), even under bf16 autocast,
    whose rounding of the logits (steps of 0.125 at |logit| 16-32) could move a ratio by e^0.125 on
    its own; under fp16 autocast (a T4: no TF32, its float32 matmuls far slower than fp16's) fp16, whose
    steps are 8 times finer: 2^-6 at |logit| 16-32 and 2^-5 at 32-64, a ratio moved by at most 1.6% and
    3.2% by one step, inside any clip range (bench.py --mismatch fp16 measures what it rounds)."""
    half = torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == torch.float16
    dtype = torch.float16 if half else torch.float32
    bias = None if head.bias is None else head.bias.to(dtype)
    return head.weight.to(dtype), bias


class _TokenLogProb(torch.autograd.Function):
    """token_logprobs(hidden @ weight.T + bias, targets, temperature), computed chunk by chunk over positions.

    Why a hand-written backward: autograd through log_softmax would keep a float32 [n, V] tensor
    per chunk for the backward pass, which is the naive [B, T, V] memory again. Here the forward
    keeps only the log-normaliser lse [n]; the backward recomputes each chunk's logits and uses

        d logp(a) / d logits = onehot(a) - softmax(logits)          (then / temperature)

    so at most one chunk's [n, V] tensors exist at a time, in both passes.

    The chunk's matmul runs in the weight's own dtype (head_operands: float32, or fp16 under fp16
    autocast) with autocast off, in the forward and in the backward alike, so the recomputed logits
    are bit for bit the forward's and the softmax in the gradient is the one whose log-probs the
    loss saw; the logits are float32 before anything else.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk, with_entropy):
        # hidden [N, d], weight [V, d], targets [N] -> logp [N], entropy [N] (float32, or float64)
        with torch.autocast(hidden.device.type, enabled=False):
            return _TokenLogProb._forward(ctx, hidden, weight, bias, targets, temperature, chunk, with_entropy)

    @staticmethod
    def _forward(ctx, hidden, weight, bias, targets, temperature, chunk, with_entropy):
        N, acc = hidden.shape[0], torch.promote_types(torch.promote_types(hidden.dtype, weight.dtype), torch.float32)
        logp = torch.empty(N, device=hidden.device, dtype=acc)
        lse = torch.empty_like(logp)
        entropy = torch.zeros_like(logp)
        for s in range(0, N, chunk):
            logits = F.linear(hidden[s:s + chunk].to(weight.dtype), weight, bias).to(acc).div_(temperature)   # [n, V]
            lse[s:s + chunk] = torch.logsumexp(logits, dim=-1)                                  # [n]
            logp[s:s + chunk] = logits.gather(-1, targets[s:s + chunk, None])[:, 0] - lse[s:s + chunk]
            if with_entropy:    # H = -sum_v p_v log p_v; log p is made in the logits' own memory
                logits.sub_(lse[s:s + chunk, None])                                             # [n, V] log p
                entropy[s:s + chunk] = -logits.exp().mul_(logits).sum(-1)
            del logits          # free this chunk before the next one is allocated, not after
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.temperature, ctx.chunk = temperature, chunk
        ctx.mark_non_differentiable(entropy)       # a metric, never a loss term
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        with torch.autocast(grad_logp.device.type, enabled=False):       # the forward's precision: the weight's
            return _TokenLogProb._backward(ctx, grad_logp)

    @staticmethod
    def _backward(ctx, grad_logp):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        temperature, chunk, acc = ctx.temperature, ctx.chunk, lse.dtype
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, device=weight.device, dtype=acc) if need_w else None
        grad_b = torch.zeros(weight.shape[0], device=weight.device, dtype=acc) if need_b else None
        for s in range(0, hidden.shape[0], chunk):
            h, g = hidden[s:s + chunk].to(weight.dtype), grad_logp[s:s + chunk, None].to(acc)   # [n, d], [n, 1]
            logits = F.linear(h, weight, bias).to(acc).div_(temperature)                         # [n, V]
            # g * (onehot - softmax) / T, built in place in the logits' memory
            dlogits = logits.sub_(lse[s:s + chunk, None]).exp_().mul_(-g)                       # [n, V]
            dlogits.scatter_add_(-1, targets[s:s + chunk, None], g).div_(temperature)
            if need_h:
                grad_h[s:s + chunk] = (dlogits.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_w:
                grad_w += dlogits.t() @ h.to(acc)
            if need_b:
                grad_b += dlogits.sum(0)
            del logits, dlogits
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None, None)
