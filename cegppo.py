"""CE-GPPO in one file: the loss, the rollout, the reward and the token-quadrant metrics.

CE-GPPO (Su et al., 2025, arXiv 2509.20712, Eq. 8-10) is PPO-clip with one change. Plain PPO
clipping zeroes the gradient of every token whose importance ratio r = pi / pi_old has left
[1 - eps, 1 + eps]. Those tokens are mostly low-probability ones, and they steer the policy's
entropy: a positive-advantage low-probability token (PA&LP) that gets pushed up raises entropy,
a negative-advantage low-probability token (NA&LP) that gets pushed down lowers it. CE-GPPO puts
their gradient back, scaled and bounded, through a stop-gradient:

    ratio < 1 - eps_low  and A < 0:  gradient coefficient beta1 * (1 - eps_low)   (NA&LP side)
    ratio > 1 + eps_high and A > 0:  gradient coefficient beta2 * (1 + eps_high)  (PA&LP side)
    everywhere else:                 gradient coefficient r                       (as in PPO)

so beta1 = beta2 = 0 is exactly PPO-clip (GRPO with group advantages), a larger beta1 lowers
entropy faster, a larger beta2 keeps it up.

What is in here, in reading order:
    cegppo_loss          the objective (the file's heart)
    group_advantages     GRPO's group z-score, and which groups carry no signal
    token_quadrants      the paper's PA/NA x HP/LP analysis as per-step metrics
    extract_boxed, math_reward   the verifiable reward (math-verify decides equality)
    format_prompt, completion_mask, rollout   sampling G completions per prompt
    completion_logprobs  per-token log-probs and entropy, the LM head chunk by chunk
    load_model, load_rows   model (4-bit + LoRA) and data loading shared by the scripts

Where this implementation deviates from the paper, and why:
    * Aggregation is a token mean over all response tokens of the batch (the authors' verl code),
      not the per-sequence mean of the paper's Eq. 8: long responses are not down-weighted.
    * In the two clipped regions the loss *value* is PPO-clip's value (bound * A) and only the
      *gradient* carries beta. The paper writes beta * bound * r / sg(r) * A, whose value is
      beta * bound * A; the difference is a constant with no gradient, so training is identical,
      and beta1 = beta2 = 0 reproduces PPO-clip in value as well as in gradient.
    * Dual clip for A < 0 (Ye et al. 2020) with c = 10, as in the authors' training scripts.
    * No KL term, no entropy bonus and no SFT term (the authors' scripts add an SFT loss that
      the paper does not describe; we leave it out).
    * Rewards are 1 / 0 (the paper uses +1 / -1); after the group z-score the two are identical.
"""

import logging
import math
import re
import threading
import warnings

import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------
# The loss
# ----------------------------------------------------------------------------------------------
# Paper Eq. 8-10, per response token t of response i, with d = pi_theta / pi_old and sg = stop-grad:
#
#   J(theta) = E[ 1/G sum_i 1/|y_i| sum_t l_it ]
#   l = beta1 * (1 - eps) / sg(d) * d * A    if d < 1 - eps and A < 0    (left region)
#   l = beta2 * (1 + eps) / sg(d) * d * A    if d > 1 + eps and A > 0    (right region)
#   l = d * A                                otherwise
#
# d / sg(d) equals 1 in value and has gradient grad(log pi): the clipped tokens get a gradient of
# fixed size beta * bound * A * grad(log pi) that does not grow with how far the ratio has drifted,
# which is what keeps the update bounded. We minimise loss = -l, averaged over tokens.
def cegppo_loss(logp, old_logp, advantages, mask, eps_low=0.2, eps_high=0.2, beta1=0.5, beta2=1.0,
                dual_clip=10.0, num_tokens=None):
    """CE-GPPO policy loss (token mean) and its statistics.

    logp:       [B, T] log pi_theta of each response token (carries the gradient)
    old_logp:   [B, T] log pi_old, the sampling policy (no gradient)
    advantages: [B] one per response, or [B, T]
    mask:       [B, T] 1 for response tokens (the EOS included), 0 for prompt padding and after EOS
    dual_clip:  c of the dual clip for A < 0 (term <= -c * A); None or 0 switches it off
    num_tokens: denominator of the token mean; defaults to mask.sum(). Pass the mini-batch's token
                count when accumulating micro-batches, so that their losses add up to its mean.
    Returns (loss, stats) with stats' values as Python floats.
    """
    mask = mask.to(logp.dtype)                                   # [B, T]
    adv = advantages if advantages.dim() == 2 else advantages[:, None]
    adv = adv.to(logp.dtype).expand_as(logp)                     # [B, T]
    log_ratio = logp - old_logp.detach()                         # [B, T]
    # exp of a large log-ratio overflows to inf and then inf * 0 = nan in the masked sum; a ratio
    # of e^20 is far outside any clip range, so clamping changes nothing that is used.
    ratio = torch.exp(log_ratio.clamp(-20.0, 20.0))              # [B, T]

    # The masks, built once: which tokens sit in which region.
    left = (ratio < 1.0 - eps_low) & (adv < 0)                   # [B, T] NA side, coefficient beta1
    right = (ratio > 1.0 + eps_high) & (adv > 0)                 # [B, T] PA side, coefficient beta2

    # carrier: value 0, gradient d(log pi). Adding beta * bound * carrier to the clipped constant
    # gives PPO-clip's value and CE-GPPO's gradient (see the module docstring).
    carrier = ratio / ratio.detach() - 1.0                       # [B, T]
    coef = torch.where(left, (1.0 - eps_low) * (1.0 + beta1 * carrier),
           torch.where(right, (1.0 + eps_high) * (1.0 + beta2 * carrier), ratio))
    per_token = -coef * adv                                      # [B, T]

    # Dual clip: with A < 0 the PPO term -r * A grows without bound as r grows; cap it at -c * A.
    # Where the cap binds the term is a constant, so the gradient there is zero.
    dual = torch.zeros_like(left)
    if dual_clip:
        cap = -dual_clip * adv
        dual = (adv < 0) & (per_token > cap)                     # [B, T]
        per_token = torch.where(dual, cap, per_token)

    # Token mean over the whole batch (verl's "token-mean", the authors' choice).
    denom = mask.sum().clamp(min=1.0) if num_tokens is None else float(max(num_tokens, 1))
    loss = (per_token * mask).sum() / denom

    with torch.no_grad():
        n = mask.sum().clamp(min=1.0)
        valid = mask > 0
        stats = {
            "clip_frac_low": ((left & valid).sum() / n).item(),
            "clip_frac_high": ((right & valid).sum() / n).item(),
            "dual_clip_frac": ((dual & valid).sum() / n).item(),
            # k3 estimator of KL(pi_old || pi): non-negative, low variance (Schulman's note).
            "approx_kl": ((((ratio - 1.0) - log_ratio) * mask).sum() / n).item(),
            "ratio_mean": ((ratio * mask).sum() / n).item(),
            "ratio_max": ratio[valid].max().item() if valid.any() else 1.0,
        }
    return loss, stats


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
    adv = (r - mean) / (std + eps)
    adv = torch.where(zero_std[:, None], torch.zeros_like(adv), adv)
    return adv.view(-1), zero_std


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
    Returns {"<q>_frac": share of response tokens, "<q>_drive": mean drive in the quadrant}, for
    q in pa_hp, pa_lp, na_hp, na_lp (drive 0.0 for an empty quadrant).
    """
    adv = advantages if advantages.dim() == 2 else advantages[:, None]
    adv = adv.float().expand_as(logp)                            # [B, T]
    valid = mask > 0
    high = logp > -entropy                                       # [B, T]
    drive = -(logp + entropy) * adv                              # [B, T]
    n = valid.sum().clamp(min=1)
    out = {}
    for name, sel in (("pa_hp", (adv > 0) & high), ("pa_lp", (adv > 0) & ~high),
                      ("na_hp", (adv < 0) & high), ("na_lp", (adv < 0) & ~high)):
        sel = sel & valid
        k = sel.sum()
        out[f"{name}_frac"] = (k / n).item()
        out[f"{name}_drive"] = (drive[sel].mean().item() if k > 0 else 0.0)
    return out


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
        from math_verify import parse, verify
        from math_verify.errors import TimeoutException
    except ImportError as e:  # pragma: no cover - a broken install, not a wrong answer
        raise RuntimeError("math-verify is not installed: pip install -r requirements.txt") from e
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


def _generate(model, input_ids, attention_mask, gen_kwargs, batch_size):
    """model.generate over sub-batches; on CUDA out-of-memory halve the sub-batch and retry."""
    outs, i = [], 0
    while i < input_ids.shape[0]:
        try:
            out = model.generate(input_ids=input_ids[i:i + batch_size],
                                 attention_mask=attention_mask[i:i + batch_size], **gen_kwargs)
        except torch.OutOfMemoryError:
            if batch_size == 1:
                raise
            torch.cuda.empty_cache()
            batch_size = max(1, batch_size // 2)
            warnings.warn(f"out of memory in generation: retrying with generation batch {batch_size}")
            continue
        outs.append(out[:, input_ids.shape[1]:])
        i += batch_size
    return outs, batch_size


@torch.no_grad()
def rollout(model, tokenizer, prompts, num_generations, max_new_tokens, temperature=1.0, top_p=1.0,
            batch_size=64):
    """Sample `num_generations` completions for each chat-formatted prompt.

    Returns a dict:
      input_ids       [B, P + T] left-padded prompt then completion, B = len(prompts) * G
      attention_mask  [B, P + T] 1 on prompt tokens and on completion tokens up to the first EOS
      completion_mask [B, T]     1 on completion tokens up to and including the first EOS
      truncated       [B] bool   no EOS within max_new_tokens
      prompt_len      P          completion tokens are input_ids[:, P:]
      texts           B strings  the decoded completions (special tokens dropped)
      gen_batch_size  the generation sub-batch that fit in memory (for the next call)
    temperature 0 means greedy. The responses to one prompt are next to each other.
    """
    device = next(model.parameters()).device
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    ids = enc["input_ids"].repeat_interleave(num_generations, dim=0).to(device)             # [B, P]
    amask = enc["attention_mask"].repeat_interleave(num_generations, dim=0).to(device)      # [B, P]
    stop = eos_ids(tokenizer, model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    # Every sampling knob is set here: a model's own generation_config (Qwen2.5 ships top_k 20,
    # top_p 0.8, repetition_penalty 1.05) would otherwise change the sampling distribution, and
    # the old log-probs would no longer be those of the policy that sampled.
    gen_kwargs = dict(max_new_tokens=max_new_tokens, do_sample=temperature > 0, repetition_penalty=1.0,
                      eos_token_id=stop, pad_token_id=pad, use_cache=True)
    if temperature > 0:   # top_k 0 switches top-k filtering off
        gen_kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
    was_training = model.training
    model.eval()
    chunks, batch_size = _generate(model, ids, amask, gen_kwargs, batch_size)
    model.train(was_training)
    T = max(c.shape[1] for c in chunks)
    completion = torch.cat([F.pad(c, (0, T - c.shape[1]), value=pad) for c in chunks])       # [B, T]
    cmask, truncated = completion_mask(completion, stop)
    return {
        "input_ids": torch.cat([ids, completion], dim=1),
        "attention_mask": torch.cat([amask, cmask], dim=1),
        "completion_mask": cmask,
        "truncated": truncated,
        "prompt_len": ids.shape[1],
        "texts": tokenizer.batch_decode(completion * cmask + pad * (1 - cmask), skip_special_tokens=True),
        "gen_batch_size": batch_size,
    }


# ----------------------------------------------------------------------------------------------
# Log-probs and entropy
# ----------------------------------------------------------------------------------------------
def chunk_size(positions, chunk_tokens=1024):
    """Positions per LM-head chunk: at most chunk_tokens and at most 1/16 of all positions.

    A chunk holds at most two float32 [n, V] tensors at once (_TokenLogProb), so the transient
    memory stays near 2/16 of the naive [B, T, V] float32 logits at any batch size, and far less
    for large batches once chunk_tokens caps n (measured by `bench.py --logprob-memory`)."""
    return max(1, min(chunk_tokens, math.ceil(positions / 16)))


class _TokenLogProb(torch.autograd.Function):
    """log pi(target) (and, as a metric, the entropy) at n positions, chunk by chunk over positions.

    Why a hand-written backward: autograd through log_softmax would keep a float32 [n, V] tensor
    per chunk for the backward pass, which is the naive [B, T, V] memory again. Here the forward
    keeps only the log-normaliser lse [n]; the backward recomputes each chunk's logits and uses

        d logp(a) / d logits = onehot(a) - softmax(logits)          (then / temperature)

    so at most one chunk's [n, V] tensors exist at a time, in both passes.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk, with_entropy):
        # hidden [N, d], weight [V, d], targets [N] -> logp [N], entropy [N] (float32, or float64)
        N, acc = hidden.shape[0], torch.promote_types(hidden.dtype, torch.float32)
        logp = torch.empty(N, device=hidden.device, dtype=acc)
        lse = torch.empty_like(logp)
        entropy = torch.zeros_like(logp)
        for s in range(0, N, chunk):
            logits = F.linear(hidden[s:s + chunk], weight, bias).to(acc).div_(temperature)   # [n, V]
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
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        T, chunk, acc = ctx.temperature, ctx.chunk, lse.dtype
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, device=weight.device, dtype=acc) if need_w else None
        grad_b = torch.zeros(weight.shape[0], device=weight.device, dtype=acc) if need_b else None
        for s in range(0, hidden.shape[0], chunk):
            h, g = hidden[s:s + chunk], grad_logp[s:s + chunk, None].to(acc)                     # [n, d], [n, 1]
            logits = F.linear(h, weight, bias).to(acc).div_(T)                                   # [n, V]
            # g * (onehot - softmax) / T, built in place in the logits' memory
            dlogits = logits.sub_(lse[s:s + chunk, None]).exp_().mul_(-g)                       # [n, V]
            dlogits.scatter_add_(-1, targets[s:s + chunk, None], g).div_(T)
            if need_h:
                grad_h[s:s + chunk] = dlogits.to(hidden.dtype) @ weight
            if need_w:
                grad_w += dlogits.t() @ h.to(acc)
            if need_b:
                grad_b += dlogits.sum(0)
            del logits, dlogits
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None, None)


def completion_logprobs(model, input_ids, attention_mask, prompt_len, temperature=1.0, chunk_tokens=1024,
                        with_entropy=True):
    """Per-token log pi(a_t) and full-vocabulary entropy H_t for the completion tokens.

    input_ids, attention_mask: [B, P + T] as returned by rollout; completion tokens start at prompt_len.
    Returns (logp [B, T], entropy [B, T]) in float32; logp carries the gradient when grad is on.
    with_entropy=False skips the entropy (zeros come back): the optimizer updates do not need it.

    The logits are divided by the sampling temperature: pi_old must be the distribution the rollout
    sampled from, or the ratio is not 1 on-policy. Memory: the body runs once, the LM head only on
    the T completion positions and in chunks of at most `chunk_tokens` positions (_TokenLogProb),
    so the float32 [B, T, V] logits (V = 151,936 for Qwen2.5) never exist at once, in the forward
    or in the backward pass.
    """
    body, head = model.get_decoder(), model.get_output_embeddings()
    # Position ids from the attention mask, as generate() computes them: with left padding the
    # first real prompt token is position 0. Without this the logits differ from the rollout's.
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    hidden = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                  use_cache=False).last_hidden_state                                  # [B, P + T, d]
    B, T = input_ids.shape[0], input_ids.shape[1] - prompt_len
    h = hidden[:, prompt_len - 1:-1].reshape(B * T, -1)       # [B*T, d] the state that predicts token t
    targets = input_ids[:, prompt_len:].reshape(B * T)         # [B*T]
    logp, entropy = _TokenLogProb.apply(h, head.weight, head.bias, targets, temperature,
                                        chunk_size(B * T, chunk_tokens), with_entropy)
    return logp.view(B, T), entropy.view(B, T)


# ----------------------------------------------------------------------------------------------
# Loading: model (4-bit + LoRA) and data, shared by train.py, eval.py and bench.py
# ----------------------------------------------------------------------------------------------
class UserError(Exception):
    """Bad input from the user (a flag, a file, a field): the scripts print it as one line and exit 2."""


def run_script(main, *args):
    """A script's entry point: exit with main()'s code; a UserError becomes one `error:` line and code 2."""
    import sys
    try:
        sys.exit(main(*args))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def compute_dtype():
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_model(name, four_bit=True, lora_rank=0, lora_alpha=None, adapter=None, trainable=False,
               gradient_checkpointing=True):
    """(model, tokenizer) from a Hub name or a local folder.

    four_bit: NF4 with double quantisation (bitsandbytes), compute in bf16 where the GPU has it,
              fp16 on older GPUs, fp32 on CPU. Otherwise the weights load in that compute dtype.
    lora_rank > 0: a fresh LoRA on all linear layers (dropout 0: dropout would make the ratio
              differ from 1 even on-policy). adapter: a LoRA folder saved by train.py instead.
    trainable: prepare for training (k-bit preparation, gradient checkpointing).
    """
    import os
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

    if os.path.sep in name or name.startswith("."):
        if not os.path.isdir(name):
            raise UserError(f"--model {name}: no such folder")
    dtype = compute_dtype()
    kwargs = {"dtype": dtype}
    if four_bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
    if torch.cuda.is_available():
        kwargs["device_map"] = {"": 0}
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--model {name}: cannot load it ({first})") from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if trainable:
        if four_bit:
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=gradient_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False})
        elif gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
    if adapter:
        if not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
            raise UserError(f"--adapter {adapter}: no adapter_config.json there (a folder saved by train.py)")
        model = PeftModel.from_pretrained(model, adapter, is_trainable=trainable)
    elif lora_rank > 0:
        model = get_peft_model(model, LoraConfig(
            r=lora_rank, lora_alpha=lora_alpha or 2 * lora_rank, lora_dropout=0.0,
            target_modules="all-linear", task_type="CAUSAL_LM"))
    cpu_safe_4bit(model)
    return model, tokenizer


def cpu_safe_4bit(model):
    """Keep 4-bit layers trainable on CPUs with AVX512-BF16.

    There, bitsandbytes repacks a Linear4bit weight into an inference-only layout on the first
    no-grad eval forward (generation); the next training forward then fails inside matmul_4bit
    ("a view of a leaf Variable that requires grad is being used in an in-place operation").
    Switching that path off costs a little CPU inference speed and changes nothing on a GPU.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        return
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False


# Named datasets: (Hub id, config, split for training, split for evaluation, question field, answer
# field). The answer field of MATH is a worked solution whose last \boxed{} is the answer.
DATASETS = {
    "gsm8k": ("openai/gsm8k", "main", "train", "test", "question", "answer"),
    "math": ("DigitalLearningGmbH/MATH-lighteval", "default", "train", "test", "problem", "solution"),
    "math500": ("HuggingFaceH4/MATH-500", None, "test", "test", "problem", "answer"),
    "aime24": ("HuggingFaceH4/aime_2024", None, "train", "train", "problem", "answer"),
}


def load_rows(dataset, split="train", question_field=None, answer_field=None, limit=None):
    """[(question, answer), ...] from a named dataset (DATASETS, or 'tiny' / 'lab' built in code)
    or a local .jsonl / .json / .parquet file. A missing or empty field stops with a UserError
    naming the file, the row and the field."""
    import os
    if dataset in ("tiny", "lab"):
        import lab
        return lab.toy_rows(split, tiny=dataset == "tiny")[:limit]
    if dataset in DATASETS:
        hub, cfg, train_split, eval_split, qf, af = DATASETS[dataset]
        from datasets import load_dataset
        try:
            ds = load_dataset(hub, cfg, split=train_split if split == "train" else eval_split)
        except Exception as e:
            raise UserError(f"--dataset {dataset}: cannot load {hub} from the Hub ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}); offline, pass a local file") from e
        where = hub
    elif dataset.endswith((".jsonl", ".json", ".parquet")):
        if not os.path.isfile(dataset):
            raise UserError(f"--dataset {dataset}: no such file")
        from datasets import load_dataset
        kind = "parquet" if dataset.endswith(".parquet") else "json"
        try:
            ds = load_dataset(kind, data_files=dataset, split="train")
        except Exception as e:
            raise UserError(f"--dataset {dataset}: cannot read it as {kind} ({type(e).__name__})") from e
        qf, af, where = "question", "answer", dataset
    else:
        raise UserError(f"--dataset {dataset}: unknown; use one of {', '.join(['tiny', 'lab', *DATASETS])} "
                        "or a .jsonl / .json / .parquet file")
    qf, af = question_field or qf, answer_field or af
    rows = []
    for i, row in enumerate(ds):
        if limit is not None and i >= limit:
            break
        for f in (qf, af):
            v = row.get(f)
            if v is None or not str(v).strip():
                raise UserError(f"{where}: row {i}: field '{f}' is missing or empty")
        answer = str(row[af])
        if dataset == "math":
            answer = extract_boxed(answer) or answer
        rows.append((str(row[qf]), answer))
    return rows
