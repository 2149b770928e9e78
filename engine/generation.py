"""generate() at speed and within memory: what cegppo.rollout's `generate` is on a real run.

cegppo.generate is the definition: one generate() call over every row, with the sampler's own
recorder of log-probs. Generator computes the same completions and numbers (tests/test_model.py,
test_shared_prefix.py, test_sampling.py hold them equal) with:
    * sub-batches of `batch_size` rows; on CUDA out-of-memory the sub-batch halves and generate()
      runs again, and the size that fit stays for the next call (Generator.batch_size)
    * each prompt encoded once for its G completions (prompt_cache), per sub-batch, its cache
      expanded to the sub-batch's rows layer by layer
    * under autocast the KV cache kept in the compute dtype (CastKVCache) and the float32 LM head of
      the 4-bit policy cast once per call, not at every decoded token (head_cast_once)
    * a progress bar that ticks per decoded token (engine/progress.py)
"""

import contextlib
import warnings

import torch
import torch.nn.functional as F
from transformers import DynamicCache, LogitsProcessorList

import cegppo
from engine.progress import GenerationProgress


class Generator:
    """cegppo.rollout's `generate`: (model, input_ids [B, L], attention_mask [B, L], temperature, group_size) ->
    (completion [B, T], sample_logp [B, T], sample_entropy [B, T]; the last two None when greedy).

    batch_size: rows per generate() call, halved on out-of-memory (unless shrink_on_oom is False: the
    caller then has memory of its own to give back, a dense copy). share_prompts: encode each group's
    prompt once. progress: (description, --progress mode) of a bar made for each call; processors:
    logits processors that only watch the decoding, given to every call."""

    def __init__(self, batch_size=64, shrink_on_oom=True, share_prompts=True, progress=None, processors=()):
        self.batch_size, self.shrink_on_oom, self.share_prompts = batch_size, shrink_on_oom, share_prompts
        self.progress, self.processors = progress, list(processors)

    def __call__(self, model, input_ids, attention_mask, temperature, group_size=1):
        config = model.generation_config             # the one cegppo.sampling_config put in force
        watchers = list(self.processors)
        bar = None
        if self.progress:
            bar = GenerationProgress(self.progress[0], input_ids.shape[0], config.eos_token_id, self.progress[1])
            watchers += bar.processors()
        share = self.share_prompts and group_size > 1 and input_ids.shape[1] > 1
        prompts = (input_ids[::group_size], attention_mask[::group_size]) if share else None
        try:
            with head_cast_once(model):
                chunks, scored = self._sub_batches(model, input_ids, attention_mask, temperature, watchers,
                                                   prompts, group_size)
        finally:
            if bar is not None:
                bar.close()                       # also when generate() fails (a copy's fallback retries)
        T = max(c.shape[1] for c in chunks)
        completion = torch.cat([F.pad(c, (0, T - c.shape[1]), value=config.pad_token_id) for c in chunks])
        if not temperature:
            return completion, None, None
        return (completion, *(torch.cat([F.pad(s[k], (0, T - s[k].shape[1])) for s in scored]) for k in (0, 1)))

    def _sub_batches(self, model, input_ids, attention_mask, temperature, watchers, prompts, group_size):
        """[completion [b, t]] and [(logp, entropy) [b, t] each, or None] per sub-batch. Non-finite logits raise
        cegppo.NonFiniteLogits with the rows (of input_ids) where they appeared."""
        outs, scored, i = [], [], 0
        device = input_ids.device.type
        half = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None   # (a GPU's)
        while i < input_ids.shape[0]:
            rows = torch.arange(i, min(i + self.batch_size, input_ids.shape[0]), device=input_ids.device)
            recorder = cegppo.SampledTokenLogProbs(temperature) if temperature else cegppo.FiniteLogits()
            cache = out = None
            try:
                if prompts is not None:      # the sub-batch's prompts once, then their cache expanded to its rows
                    cache = expanded_prompt_cache(model, prompts, rows, group_size, half)
                elif half:                   # under autocast a cache that keeps k and v in the compute dtype
                    cache = CastKVCache(half)
                out = model.generate(input_ids=input_ids[rows], attention_mask=attention_mask[rows],
                                     logits_processor=LogitsProcessorList([recorder, *watchers]),
                                     **({"cache": cache} if cache is not None else {}))
            except torch.OutOfMemoryError:
                if self.batch_size == 1 or not self.shrink_on_oom:
                    raise
            except cegppo.NonFiniteLogits as e:
                e.rows = [i + r for r in e.rows]                                    # rows of the whole call
                raise
            if out is None:       # out of memory; here, past the except, the failed call's frames are freed
                del recorder, cache
                torch.cuda.empty_cache()
                for p in watchers:                        # a watcher (a progress bar) forgets the failed attempt
                    getattr(p, "retry", lambda: None)()
                self.batch_size = max(1, self.batch_size // 2)
                warnings.warn(f"out of memory in generation: retrying with generation batch {self.batch_size}",
                              stacklevel=3)
                continue
            completion = out[:, input_ids.shape[1]:]                                  # [b, t]
            outs.append(completion)
            scored.append(recorder.finish(completion[:, -1]) if temperature else None)
            i += len(rows)
        return outs, scored


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
