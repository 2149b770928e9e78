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

The mask is a custom [rows, 1, S, S] boolean one, which transformers passes to attention as it is
(True: may attend). On a GPU, SDPA's memory-efficient kernel takes it without materialising the
[S, S] scores; the CPU's math kernel materialises them, as it does for the plain layout's.

    pack(input_ids, attention_mask, completion_mask, prompt_len)   the packed rows of a micro-batch
    completion_logprobs(model, input_ids, attention_mask, completion_mask, prompt_len, ...)
                  the same numbers as cegppo.completion_logprobs, through the packed rows
    worth_it(...)  whether packing removes enough tokens to pay (train.py falls back otherwise)
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
    causal = torch.ones(S, S, dtype=torch.bool).tril()                      # [S, S] k <= q
    mask = causal & (q >= 0) & (k >= 0) & ((k == 0) | (k == q))             # [R, S, S]
    mask |= torch.eye(S, dtype=torch.bool) & (q < 0)                        # padding attends itself: no empty row
    device = input_ids.device
    cat = lambda xs: torch.cat(xs).to(device)                               # noqa: E731
    return {"input_ids": ids.to(device), "position_ids": pos.to(device), "mask": mask[:, None].to(device),
            "states": cat(states), "targets": cat(targets), "rows": cat(rows_out), "cols": cat(cols_out)}


def completion_logprobs(model, input_ids, attention_mask, completion_mask, prompt_len, temperature=1.0,
                        chunk_tokens=1024, with_entropy=True):
    """cegppo.completion_logprobs's (logp [B, T], entropy [B, T]) through the packed rows: the body runs
    once over each group's prompt and its completions' tokens; 0 after each completion's EOS."""
    packed = pack(input_ids, attention_mask, completion_mask, prompt_len)
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


def worth_it(input_ids, attention_mask, completion_mask, prompt_len, share=0.9):
    """Does packing leave at most `share` of the plain layout's tokens? (Not for very short prompts, or
    groups of one.) The plain layout holds every column of the micro-batch, padding included."""
    packed = sum(len(p) for p in segments(input_ids, attention_mask, prompt_len)) + int(completion_mask.sum())
    return packed <= share * input_ids.numel()
