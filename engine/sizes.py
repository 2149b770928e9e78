"""Tensor sizes of a Qwen2-style model, in bytes: the arithmetic that memory.py's table and dense_copy.choose share.

One formula, one home: memory.py prints what a step holds (engine/memory.py); dense_copy.choose
decides, inside train.py, whether the dense copy and its sampling fit the GPU. Both use the
functions below, which import no module of the project but engine/logprobs.py (its chunk size).

    ModelShape          the parts of a config that decide memory
    kv_cache_bytes      generate()'s KV cache
    prefill_bytes       a no-grad forward's activations (generate()'s prefill, a log-prob pass)
    generate_bytes      generate() at its peak: the prefill or the full cache, and the logits
    sampling_bytes      everything sampling holds besides the weights (generate, or the copy's log-prob pass)
    logprob_chunk_bytes the LM-head chunk of logprobs._TokenLogProb
"""

import math
from dataclasses import dataclass
from typing import Optional

from engine import logprobs

BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}


@dataclass(frozen=True)
class ModelShape:
    """The parts of a Qwen2-style config that decide memory."""
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = True
    qkv_bias: bool = True          # Qwen2 has biases on q, k and v
    head_size: Optional[int] = None    # a config's own head_dim, where it is not hidden / heads

    @property
    def head_dim(self):
        return self.head_size or self.hidden // self.heads

    def linears(self):
        """(in, out) of the seven nn.Linear of one decoder block: q, k, v, o, gate, up, down."""
        h, i, kv = self.hidden, self.intermediate, self.kv_heads * self.head_dim
        q = self.heads * self.head_dim
        return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]

    @classmethod
    def from_config(cls, config, name=""):
        """From a transformers config (Qwen2Config or the like)."""
        return cls(name=name or getattr(config, "name_or_path", ""), hidden=config.hidden_size,
                   intermediate=config.intermediate_size, layers=config.num_hidden_layers,
                   heads=config.num_attention_heads,
                   kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
                   vocab=config.vocab_size, tied=bool(getattr(config, "tie_word_embeddings", False)),
                   head_size=getattr(config, "head_dim", None))


def kv_cache_bytes(m, sequences, tokens, elem_bytes):
    """generate()'s cache: K and V of every layer for `sequences` x `tokens` positions."""
    return sequences * tokens * m.layers * 2 * m.kv_heads * m.head_dim * elem_bytes


def layer_forward_elems(m, lora=True):
    """Elements per token that one decoder block's forward without gradient holds at its peak, which is
    in the MLP: the residual, the block input, the normed input and the MLP input (4 h), then
    silu(gate) and up's output and their product (3 I). Through LoRA layers (the policy; lora=True)
    up's output exists twice for a moment, before and after its LoRA term is added, and the term
    itself once more (4 I); a plain Linear (the dense copy) writes it once. Measured with the CPU
    profiler on 4-bit + LoRA and dense models whose MLP is 8x and 16x the hidden size
    (tests/test_memory.py); attention's tensors (q, k, v, its output: about 4 h) are smaller."""
    return 4 * m.hidden + (4 if lora else 3) * m.intermediate


def prefill_bytes(m, sequences, tokens, elem_bytes, lora=True):
    """A no-grad forward over `sequences` x `tokens` positions, one block at a time (generate()'s
    prefill of the prompts; a log-prob pass): the block's transient tensors, in the residual dtype."""
    return sequences * tokens * layer_forward_elems(m, lora) * elem_bytes


def sampling_logits_bytes(m, sequences, elem_bytes=4, top_p=1.0):
    """What one decode step holds of [sequences, V] tensors at its peak: the model's logits (in the
    residual dtype, `elem_bytes`), and in float32 generate()'s copy of them, the temperature warper's
    output, the sampling softmax, and the recorder's log-softmax of this step beside the last step's
    (cegppo.SampledTokenLogProbs: p and entr(p) beside its log-softmax): 5 x [sequences, V] float32.
    top_p < 1 sorts them too (values, int64 indices, their cumulative sum, masks: 4 float32's worth
    more). Measured on generate() itself, op by op (tests/test_memory.py): 6 and 9.5 float32's worth
    at top_p 1 and 0.9 with float32 logits."""
    return sequences * m.vocab * (elem_bytes + 5 * 4 + (16 if top_p < 1 else 0))


def logprob_chunk_bytes(m, positions):
    """logprobs._TokenLogProb over `positions` positions: at most two float32 [chunk, V] tensors."""
    return 2 * logprobs.chunk_size(positions) * m.vocab * 4


def logprob_pass_bytes(m, sequences, tokens, completion_tokens, elem_bytes, lora=True):
    """A no-grad log-prob pass (train.py's step 4) over `sequences` of `tokens` positions, the last
    `completion_tokens` of them scored: the body's forward, its last hidden states, the LM-head chunk."""
    return (prefill_bytes(m, sequences, tokens, elem_bytes, lora) + sequences * tokens * m.hidden * elem_bytes
            + logprob_chunk_bytes(m, sequences * completion_tokens))


def generate_bytes(m, sequences, prompt_tokens, tokens, elem_bytes, lora=True, top_p=1.0, prompts=None, kv_bytes=None):
    """generate() at its peak: during the prefill, its activations and the prompts' part of the KV
    cache; later the whole cache of `tokens` positions (the prefill's tensors are gone by then);
    the sampling logits throughout. prompts: with a shared prefill (engine/generation.py) the prefill
    runs over the sub-batch's distinct prompts only (sub_batch_prompts), whose cache is then expanded
    to the sequences.
    kv_bytes: the cache's element size where it differs from the residual stream's (under autocast
    generation.CastKVCache keeps the 4-bit policy's float32 keys and values in the compute dtype)."""
    kv = kv_bytes or elem_bytes
    if prompts:
        shared, expanded = kv_cache_bytes(m, prompts, prompt_tokens, kv), kv_cache_bytes(m, sequences, prompt_tokens, kv)
        prefill = prefill_bytes(m, prompts, prompt_tokens, elem_bytes, lora) + shared
        # expanding to the sequences layer by layer, each layer's prompt cache freed once expanded
        prefill = max(prefill, shared + expanded / m.layers, expanded + shared / m.layers)
        later = kv_cache_bytes(m, sequences, tokens, kv)
    else:
        prefill = prefill_bytes(m, sequences, prompt_tokens, elem_bytes, lora) + kv_cache_bytes(
            m, sequences, prompt_tokens, kv)
        later = kv_cache_bytes(m, sequences, tokens, kv)
    return max(prefill, later) + sampling_logits_bytes(m, sequences, elem_bytes, top_p)


def sampling_bytes(m, sequences, prompt_tokens, tokens, elem_bytes, lora=True, micro_batch=0, top_p=1.0, prompts=None,
                   kv_bytes=None):
    """What sampling holds besides the weights, at its peak: generate() over `sequences` sequences of
    `prompt_tokens` prompt and `tokens` positions in all (generate_bytes); or, when larger, a no-grad
    log-prob pass over `micro_batch` sequences (the dense copy's mismatch metric, computed while the
    copy is held; 0: none). elem_bytes: the residual stream's (float32 in the 4-bit policy, the
    compute dtype in the dense copy); lora: through unmerged LoRA layers (the policy) or not (the copy);
    prompts, kv_bytes: the distinct prompts of a shared prefill and the cache's element size (generate_bytes)."""
    logprob = logprob_pass_bytes(m, micro_batch, tokens, tokens - prompt_tokens, elem_bytes, lora) if micro_batch else 0
    return max(generate_bytes(m, sequences, prompt_tokens, tokens, elem_bytes, lora, top_p, prompts, kv_bytes), logprob)


def sub_batch_prompts(sequences, group_size):
    """The distinct prompts among `sequences` consecutive rows of a rollout (G = group_size rows per
    prompt) that start at a multiple of `sequences`, as engine/generation.py's sub-batches do (halving keeps
    that): sequences / G where groups fit whole, 1 inside one group, else one more than whole groups."""
    if sequences % group_size == 0 or group_size % sequences == 0:
        return max(1, sequences // group_size)
    return math.ceil(sequences / group_size) + 1


def shared_prefill_prompts(cfg):
    """The distinct prompts one generate() sub-batch's shared prefill encodes (engine/generation.py) under a
    train.py Config, or None: without --shared_prefix, or with one completion per prompt. memory.py and the
    dense copy's fit check count the same."""
    if not cfg.shared_prefix or cfg.num_generations == 1:
        return None
    gen_batch = min(cfg.generation_batch_size, cfg.prompts_per_step * cfg.num_generations)
    return min(cfg.prompts_per_step, sub_batch_prompts(gen_batch, cfg.num_generations))
