"""Each group's prompt once in a log-prob pass: the G completions packed behind their shared prompt.

The G completions of a group share their prompt, and cegppo.completion_logprobs, the plain
definition, runs that prompt G times: its batch is [G, L + T]. Packed, a group is one row

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

    pack(input_ids, attention_mask, completion_mask, prompt_len)   the packed rows of a micro-batch
    completion_logprobs(model, packed, completion_mask, ...)   the same numbers as
                  cegppo.completion_logprobs, through the packed rows
    worth_it(packed, input_ids, config)   whether packing is cheaper by a tenth (train.py falls back otherwise)
    unsupported(config)   why a model cannot take the packed rows at all (not SDPA attention), or None
"""

import torch

import cegppo


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


def completion_logprobs(model, packed, completion_mask, temperature=1.0, chunk_tokens=1024, with_entropy=True):
    """cegppo.completion_logprobs's (logp [B, T], entropy [B, T]) through the packed rows (pack): the
    body runs once over each group's prompt and its completions' tokens; 0 after each completion's EOS."""
    body, head = model.get_decoder(), model.get_output_embeddings()
    hidden = body(input_ids=packed["input_ids"], attention_mask=packed["mask"], position_ids=packed["position_ids"],
                  use_cache=False).last_hidden_state                                   # [R, S, d]
    h = hidden.reshape(-1, hidden.shape[-1])[packed["states"]]                          # [N, d]
    weight, bias = cegppo.head_operands(head, h.device.type)
    logp, entropy = cegppo._TokenLogProb.apply(h, weight, bias, packed["targets"], temperature,
                                               cegppo.chunk_size(h.shape[0], chunk_tokens), with_entropy)
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
