"""The log-prob passes of a real run: the same numbers as cegppo.completion_logprobs, with less memory and work.

cegppo.completion_logprobs is the definition: log_softmax over the whole [B*T, V] logits, which at
Qwen2.5's vocabulary (V = 151,936) does not fit in memory for a batch. Here (tests/test_model.py and
test_shared_prefix.py hold the two equal):
    chunked_logprobs      the LM head chunk by chunk over positions (_TokenLogProb): a chunk's [n, V]
                          tensors at a time, in the forward and in a hand-written backward
    pack, packed_logprobs each group's prompt once: its G completions packed behind it in one row
    worth_it, unsupported whether packing pays for a micro-batch, and whether the model can take it
    Scorer                train.py's passes (steps 4 and 5): a rollout's rows micro-batch by micro-batch,
                          packed where that pays, under the policy's autocast
    update_partition      the rows in train.py's mini-batches and micro-batches

Each group's prompt once. The G completions of a group share their prompt, and the plain layout
runs that prompt G times: its batch is [G, L + T]. Packed, a group is one row

    [prompt | completion 1 | completion 2 | ... | completion G]

in which every completion attends to the prompt and, causally, to itself, never to another
completion, and its positions continue from the prompt's (position ids L, L + 1, ...). Attention,
positions and so every hidden state are the plain layout's, so are the log-probs, and the gradient
that reaches the prompt's tokens is the sum of what the G completions send it (Prefix Grouper, Liu
et al. 2025, arXiv 2506.05433), while the prompt's share of the linear layers' work is divided by
G. The tokens after a completion's EOS, padding in the plain layout, are left out altogether.
The mask is a custom [rows, 1, S, S] boolean one, which transformers passes to SDPA attention as it
is (True: may attend). The price is attention over S x S positions of which most are masked: no
kernel skips them, and one packed row's S^2 is far more than the plain layout's G (L + T)^2 when the
completions are long. Whether packing pays is therefore a cost of both, the linear layers' work per
position and attention's per pair of positions (cost), counted on the padded packed block.
"""

import math

import torch
import torch.nn.functional as F
from tqdm import tqdm

import cegppo
from engine import models


def chunked_logprobs(model, input_ids, attention_mask, prompt_len, temperature=1.0, chunk_tokens=1024,
                        with_entropy=True):
    """cegppo.completion_logprobs's (logp [B, T], entropy [B, T]) in float32, the LM head chunk by chunk
    (_TokenLogProb): never the [B, T, V] logits. with_entropy=False skips the entropy (zeros come back):
    the optimizer updates do not need it."""
    h, targets = cegppo.completion_states(model, input_ids, attention_mask, prompt_len)     # [B*T, d], [B*T]
    B, T = input_ids.shape[0], input_ids.shape[1] - prompt_len
    weight, bias = head_operands(model.get_output_embeddings(), h.device.type)
    logp, entropy = _TokenLogProb.apply(h, weight, bias, targets, temperature, chunk_size(B * T, chunk_tokens),
                                        with_entropy)
    return logp.view(B, T), entropy.view(B, T)


class Scorer:
    """log pi (and the entropy) of a rollout's rows through the policy, as train.py's old log-probs (step 4)
    and updates (step 5) score them: each micro-batch without the columns that are padding in all its rows,
    with each group's prompt once (pack, --shared_prefix) where that costs at most SHARE of the plain layout,
    else the plain one (chunked_logprobs); under the policy's autocast (half precision on a GPU, the loss
    in float32). Where the plain layout is used, the reason is said once per run (per Scorer)."""

    def __init__(self, temperature, shared_prefix):
        self.temperature, self.shared_prefix, self.said = temperature, shared_prefix, set()

    def with_grad(self, model, rollout, rows):
        """(log pi [b, T], the completion mask [b, T], packed?) of `rows`, T their longest completion."""
        batch = micro_batch(rollout, rows)
        with models.model_autocast(model):
            logp, _, packed = self.micro_batch_logprobs(model, batch, with_entropy=False)
        return logp, batch[2], packed

    @torch.no_grad()
    def no_grad(self, model, rollout, partition, with_entropy=True):
        """(log pi [B, T], entropy [B, T] or None) of every row, float32 on the CPU, scored in the micro-batches
        of `partition` (update_partition's): on a GPU the kernels, and so the rounding, depend on a batch's
        shape, and only the updates' own micro-batches give their first ratio exactly 1."""
        B, T = rollout.completion_mask.shape
        logp, entropy = torch.zeros(B, T), torch.zeros(B, T) if with_entropy else None
        for idx in (rows for mini_batch in partition for rows in mini_batch):
            with models.model_autocast(model):           # the same precision path as the updates': ratio 1
                lp, ent, _ = self.micro_batch_logprobs(model, micro_batch(rollout, idx), with_entropy)
            logp[idx, :lp.shape[1]] = lp.float().cpu()
            if with_entropy:
                entropy[idx, :lp.shape[1]] = ent.float().cpu()
        return logp, entropy

    def micro_batch_logprobs(self, model, batch, with_entropy):
        """(log pi, entropy, packed?) of a micro-batch's completion tokens (micro_batch), [b, T] each."""
        input_ids, attention_mask, completion_mask, prompt_len = batch
        if self.shared_prefix:
            why = unsupported(model.config)
            if why is None:
                packed = pack(input_ids, attention_mask, completion_mask, prompt_len)
                if worth_it(packed, input_ids, model.config):
                    return (*packed_logprobs(model, packed, completion_mask, self.temperature,
                                             with_entropy=with_entropy), True)
                why = "packing does not pay for some micro-batches (prompts short beside long completions)"
            if why not in self.said:
                self.said.add(why)
                tqdm.write(f"shared prefix: {why}; those micro-batches are scored in the plain layout "
                           "(shared_prefix/packed_share)")
        return (*chunked_logprobs(model, input_ids, attention_mask, prompt_len, self.temperature,
                                  with_entropy=with_entropy), False)


def update_partition(rollout, cfg):
    """A Rollout's rows as train.py's updates take them (and its old log-probs are scored in): a list of
    mini-batches (whole groups: a group's advantages sum to zero; steps_per_generation of them), each a list
    of micro-batches (micro_batch_size rows of it, as index tensors)."""
    G = cfg.num_generations
    groups = torch.arange(0 if rollout is None else rollout.input_ids.shape[0] // G)
    return [list(torch.split((mini_batch[:, None] * G + torch.arange(G)).flatten(), cfg.micro_batch_size))
            for mini_batch in torch.tensor_split(groups, min(cfg.steps_per_generation, max(1, len(groups))))
            if len(mini_batch)]


def micro_batch(rollout, rows):
    """The rows of a Rollout, without the columns that are padding in all of them (saves compute):
    (input_ids, attention_mask, completion_mask, prompt_len)."""
    input_ids, attention_mask = rollout.input_ids[rows], rollout.attention_mask[rows]
    completion_mask, prompt_len = rollout.completion_mask[rows], rollout.prompt_len
    start = int((attention_mask.sum(0) > 0).nonzero()[0])     # the first column any row attends to
    T = int(completion_mask.sum(1).max())
    return (input_ids[:, start:prompt_len + T], attention_mask[:, start:prompt_len + T], completion_mask[:, :T],
            prompt_len - start)


def chunk_size(positions, chunk_tokens=1024):
    """Positions per LM-head chunk: at most chunk_tokens and at most 1/16 of all positions.

    A chunk holds at most two float32 [n, V] tensors at once (_TokenLogProb), so the transient
    memory stays near 2/16 of the naive [B, T, V] float32 logits at any batch size, and far less
    for large batches once chunk_tokens caps n (measured by `python -m engine.bench --logprob-memory`)."""
    return max(1, min(chunk_tokens, math.ceil(positions / 16)))


def head_operands(head, device_type):
    """The LM head's weight and bias in the precision the log-prob chunks multiply in, cast at most
    once per pass (never per chunk): float32 (TF32 on GPUs that have it), even under bf16 autocast,
    whose rounding of the logits (steps of 0.125 at |logit| 16-32) could move a ratio by e^0.125 on
    its own; under fp16 autocast (a T4: no TF32, its float32 matmuls far slower than fp16's) fp16, whose
    steps are 8 times finer: 2^-6 at |logit| 16-32 and 2^-5 at 32-64, a ratio moved by at most 1.6% and
    3.2% by one step, inside any clip range (python -m engine.bench --mismatch fp16 measures what it rounds)."""
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


# ----------------------------------------------------------------------------------------------
# Each group's prompt once
# ----------------------------------------------------------------------------------------------
def segments(input_ids, attention_mask, prompt_len):
    """{prompt's real tokens: [rows with that prompt]}, in the order of first appearance: the G
    completions of a group, wherever a micro-batch's boundaries cut it (two groups that happen to share
    a prompt share its row too, which is as exact)."""
    out = {}
    for b in range(input_ids.shape[0]):
        out.setdefault(tuple(input_ids[b, :prompt_len][attention_mask[b, :prompt_len].bool()].tolist()), []).append(b)
    return out


def pack(input_ids, attention_mask, completion_mask, prompt_len, pad_id=0):
    """The micro-batch's rows packed by prompt (segments).

    input_ids, attention_mask: [B, L + T] left-padded prompts then completions (cegppo.rollout);
    completion_mask: [B, T]. Returns a dict:
      input_ids, position_ids  [R, S]  the packed rows, right-padded with pad_id
      mask                     [R, 1, S, S] bool: query position q may attend key position k
      states, targets          [N]     flat indices into [R, S] of the state that predicts each kept
                                       completion token, and the token; N = completion_mask.sum()
      rows, cols               [N]     where each of those tokens sits in the plain [B, T] layout
    """
    lengths = completion_mask.sum(1).tolist()                               # each completion's tokens, EOS included
    groups = segments(input_ids, attention_mask, prompt_len)
    S = max(len(p) + sum(lengths[b] for b in rows) for p, rows in groups.items())
    R, cpu_ids = len(groups), input_ids.cpu()
    ids = torch.full((R, S), pad_id, dtype=input_ids.dtype)
    pos = torch.zeros(R, S, dtype=torch.long)
    seg = torch.full((R, S), -1, dtype=torch.long)                          # 0 prompt, j the j-th completion, -1 pad
    states, targets, rows_out, cols_out = [], [], [], []
    for r, (prompt, rows) in enumerate(groups.items()):
        P = len(prompt)
        ids[r, :P], pos[r, :P], seg[r, :P] = torch.tensor(prompt, dtype=input_ids.dtype), torch.arange(P), 0
        start = P
        for j, b in enumerate(rows, 1):
            n = lengths[b]
            ids[r, start:start + n] = cpu_ids[b, prompt_len:prompt_len + n]
            pos[r, start:start + n] = torch.arange(P, P + n)
            seg[r, start:start + n] = j
            # token t of the completion is predicted by the state before it: the prompt's last for t = 0
            states.append(r * S + torch.cat([torch.tensor([P - 1]), torch.arange(start, start + n - 1)]))
            targets.append(cpu_ids[b, prompt_len:prompt_len + n])
            rows_out.append(torch.full((n,), b))
            cols_out.append(torch.arange(n))
            start += n
    q, k = seg[:, :, None], seg[:, None, :]                                 # [R, S, 1], [R, 1, S]
    # (built even where worth_it then picks the plain layout: [R, S, S] booleans, small beside a forward)
    causal = torch.ones(S, S, dtype=torch.bool).tril()                      # [S, S] k <= q
    mask = causal & (q >= 0) & (k >= 0) & ((k == 0) | (k == q))             # [R, S, S]
    mask |= torch.eye(S, dtype=torch.bool) & (q < 0)                        # padding attends itself: no empty row
    device = input_ids.device
    cat = lambda xs: torch.cat(xs).to(device)                               # noqa: E731
    return {"input_ids": ids.to(device), "position_ids": pos.to(device), "mask": mask[:, None].to(device),
            "states": cat(states), "targets": cat(targets), "rows": cat(rows_out), "cols": cat(cols_out)}


def packed_logprobs(model, packed, completion_mask, temperature=1.0, chunk_tokens=1024, with_entropy=True):
    """cegppo.completion_logprobs's (logp [B, T], entropy [B, T]) through the packed rows (pack): the
    body runs once over each group's prompt and its completions' tokens; 0 after each completion's EOS."""
    body, head = model.get_decoder(), model.get_output_embeddings()
    hidden = body(input_ids=packed["input_ids"], attention_mask=packed["mask"], position_ids=packed["position_ids"],
                  use_cache=False).last_hidden_state                                   # [R, S, d]
    h = hidden.reshape(-1, hidden.shape[-1])[packed["states"]]                          # [N, d]
    weight, bias = head_operands(head, h.device.type)
    logp, entropy = _TokenLogProb.apply(h, weight, bias, packed["targets"], temperature,
                                        chunk_size(h.shape[0], chunk_tokens), with_entropy)
    where = (packed["rows"], packed["cols"])
    return (logp.new_zeros(completion_mask.shape).index_put(where, logp),                # [B, T]
            entropy.new_zeros(completion_mask.shape).index_put(where, entropy))


SHARE = 0.9          # packing is used where it costs at most this share of the plain layout


def cost(rows, width, hidden, intermediate, kv):
    """The forward's work over `rows` rows of `width` positions, in multiply-adds per layer: the linear
    layers' per position (q, k, v, o and the MLP; kv: the width of k and v) and attention's per pair
    of positions a row holds (q k^T and the weighted sum of v, over every head), masked pairs
    included: no kernel skips them."""
    return rows * width * (hidden * (2 * hidden + 2 * kv) + 3 * hidden * intermediate) + rows * width * width * 2 * hidden


def dims(config):
    """(hidden, intermediate, kv) of a transformers config, as cost takes them."""
    h = config.hidden_size
    head = getattr(config, "head_dim", None) or h // config.num_attention_heads
    return h, config.intermediate_size, config.num_key_value_heads * head


def unsupported(config):
    """Why this model cannot take the packed rows, or None: only SDPA attention takes a boolean mask as
    the may-attend mask (eager attention adds its mask to the scores; FlashAttention takes none)."""
    attention = getattr(config, "_attn_implementation", "sdpa")
    return None if attention == "sdpa" else f"attention is {attention!r}, and the packed mask needs 'sdpa'"


def worth_it(packed, input_ids, config):
    """Does the packed block (padding included) cost at most SHARE of the plain layout's, which holds
    every column of the micro-batch? Never where the model cannot take it (unsupported). Not for
    prompts short beside long completions, nor for groups of one."""
    if unsupported(config):
        return False
    R, S = packed["input_ids"].shape
    B, W = input_ids.shape
    return cost(R, S, *dims(config)) <= SHARE * cost(B, W, *dims(config))
