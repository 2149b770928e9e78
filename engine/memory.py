"""What one default train.py step holds in GPU memory, computed from tensor sizes (not measured): memory.py's table.

Where the bytes are, for the default path (4-bit NF4 base + LoRA, engine/models.py's policy_model):
  * 4-bit weights: every nn.Linear of the decoder layers as NF4, two weights per byte, plus
    bitsandbytes' double quantisation: one uint8 absmax per block of 64 weights, one float32
    absmax per 256 of those, the 16-value NF4 code, the 256-value code of the absmax
    quantisation and one float32 offset per layer (QuantState).
  * Not quantised: the embeddings and the LM head (transformers keeps the output embedding out of
    the 4-bit conversion; with a tied head, as Qwen2.5-0.5B / 1.5B have, the two are one tensor),
    the RMSNorm weights and the q/k/v biases. peft's prepare_model_for_kbit_training casts all of
    them to float32, whatever the compute dtype: at V = 151,936 the embedding table is the largest
    single tensor of a 4-bit 1.5B model (0.93 GB).
  * The same cast makes the residual stream float32 (the embedding output is float32, RMSNorm
    returns its input's dtype), and a Linear4bit returns its input's dtype: so the KV cache, the
    hidden states kept at layer boundaries and most of a layer's saved activations are float32;
    only the 4-bit matmuls run in the compute dtype. Without --load_in_4bit none of this happens:
    everything but the LoRA weights is in the compute dtype.
  * LoRA on all seven linear layers of each block, rank r: r * (in + out) weights each, float32
    (peft keeps adapters in float32), plus their float32 gradients and AdamW's two moments.
  * Rollout (generation, no gradient): the KV cache of generation_batch_size sequences of prompt
    + completion tokens, 2 (K, V) x kv_heads x head_dim per token and layer; the prefill, the first
    forward over all prompt tokens at once, one layer's transient tensors at a time (its MLP's
    intermediate tensors dominate: sizes.layer_forward_elems); and the sampling logits (a few
    [batch, V] float32 tensors). With --rollout_model dense, the dense copy (engine/dense_copy.py) is
    held too, and the sampling's tensors are in its compute dtype; the table's `auto` counts the
    4-bit policy, as auto takes the copy only where the GPU has room for it (dense_copy.choose,
    with the same formulas from sizes.py).
  * Update (forward + backward of one micro-batch): with gradient checkpointing, each layer's
    input hidden state ([micro_batch, prompt + completion, hidden]) plus one layer's activations
    while it is recomputed; without it, every layer's activations. The log-prob pass adds
    logprobs._TokenLogProb's chunk: at most two float32 [chunk, V] tensors, chunk = logprobs.chunk_size.
  * The rollout and the update do not overlap (the KV cache is freed when generate() returns), so
    the peak is persistent + max(rollout, update).

Not counted: the CUDA context (0.3-0.5 GB outside torch's allocator), the allocator's
fragmentation, the half-precision copy of the float32 LM head that autocast makes at each decode
step when sampling through the policy (vocab x hidden x 2 bytes, 0.47 GB at 1.5B, transient; the
dense copy holds its head in the compute dtype), the old-log-prob pass (no gradient: smaller than
the update's), evaluation
(greedy generation of eval batches, same KV-cache formula). The flag suggestions keep 1 GB of
headroom for those. One layer's recompute is a per-token count of the tensors a Qwen2
block saves for its backward (listed in layer_activation_elems); tests/test_memory.py checks it
against the tiny model's saved tensors and every other line against real tensor sizes (the
prefill's against the CPU profiler's allocations).
"""

import argparse
import copy
import math

from engine import cli, logprobs, sizes
from engine.sizes import (BYTES, ModelShape, kv_cache_bytes, logprob_chunk_bytes, prefill_bytes,  # noqa: F401
                          sampling_bytes, sampling_logits_bytes)


QWEN = {
    "Qwen2.5-0.5B": ModelShape("Qwen2.5-0.5B", 896, 4864, 24, 14, 2, 151936, tied=True),
    "Qwen2.5-1.5B": ModelShape("Qwen2.5-1.5B", 1536, 8960, 28, 12, 2, 151936, tied=True),
}
GB = 1e9                           # as train.py's peak_mem_gb
NF4_BLOCK, NESTED_BLOCK = 64, 256  # bitsandbytes' 4-bit block size and the double-quant block size


# ----------------------------------------------------------------------------------------------
# Tensor sizes, one function per line of the table (bytes)
# ----------------------------------------------------------------------------------------------
def nf4_bytes(numel):
    """One Linear4bit weight with double quantisation: packed NF4 + its QuantState."""
    blocks = math.ceil(numel / NF4_BLOCK)
    packed = math.ceil(numel / 2)                                 # two 4-bit codes per byte
    absmax = blocks * 1                                           # uint8 (quantised absmax)
    nested = math.ceil(blocks / NESTED_BLOCK) * 4                 # float32 absmax of the absmax
    constants = 16 * 4 + 256 * 4 + 4                             # NF4 code, absmax code, offset
    return packed + absmax + nested + constants


def quantised_bytes(m):
    """The decoder layers' linear weights as NF4 (bitsandbytes, double quantisation)."""
    return m.layers * sum(nf4_bytes(i * o) for i, o in m.linears())


def unquantised_numel(m, four_bit=True):
    """Parameters outside the 4-bit layers: embeddings, head (untied), norms, q/k/v biases
    (with four_bit=False also the linear weights)."""
    n = m.vocab * m.hidden * (1 if m.tied else 2)
    n += (2 * m.layers + 1) * m.hidden                              # two RMSNorms per block + final
    if m.qkv_bias:
        n += m.layers * (m.heads + 2 * m.kv_heads) * m.head_dim
    if not four_bit:
        n += m.layers * sum(i * o for i, o in m.linears())
    return n


def base_weight_bytes(m, dtype="fp16", four_bit=True):
    """(4-bit bytes, unquantised bytes). In 4-bit, peft's k-bit preparation makes the rest float32."""
    if four_bit:
        return quantised_bytes(m), 4 * unquantised_numel(m, True)
    return 0, BYTES[dtype] * unquantised_numel(m, False)


def lora_numel(m, rank):
    """LoRA on all linear layers of every block ("all-linear": the LM head excluded)."""
    return m.layers * sum(rank * (i + o) for i, o in m.linears())


def dense_copy_bytes(m, dtype, four_bit=True):
    """The dense rollout copy (dense_copy.dense_copy; dense_copy.copy_bytes counts the same from a
    loaded policy's tensors): every decoder Linear weight dequantised, in the compute dtype (LoRA's A
    and B are the policy's own where the copy keeps them apart), plus in 4-bit
    the embeddings, head, norms and biases, which k-bit preparation made float32 and the copy
    converts (in float32 compute, and without 4-bit, it shares them with the policy)."""
    rest = unquantised_numel(m, True) if four_bit and dtype != "fp32" else 0
    return BYTES[dtype] * (m.layers * sum(i * o for i, o in m.linears()) + rest)


def residual_bytes(dtype, four_bit):
    """Bytes per element of the residual stream, the KV cache and the saved hidden states."""
    return 4 if four_bit else BYTES[dtype]


def layer_activation_elems(m, rank, four_bit=True):
    """(elements in the residual dtype, float32 elements) one Qwen2 block with LoRA on its seven
    linears saves for its backward, per token. Counted from the tensors the block hands to
    autograd (torch.autograd.graph.saved_tensors_hooks on the tiny model, tests/test_memory.py):
      both RMSNorms: their float32 input and rsqrt (2h + 2)   rotary cos and sin (2 head_dim)
      SDPA: rotated q, k, v, the output and a log-sum-exp per head (2q + 2kv + heads; no [S, S]
            tensor: K and V are not repeated to all heads when SDPA takes GQA itself)
      MLP: gate and up outputs, silu(gate) (3I) and the product, down's float32 input (I)
      LoRA: the seven r-dim A outputs
      the LoRA inputs: peft casts each linear's input to float32 (its adapter dtype). In 4-bit the
            residual stream is float32 already, so the four RMSNorm outputs / MLP inputs are shared
            (2h); with 16-bit weights each linear saves its own float32 copy (6h; down's is the I above).
    A frozen base layer saves nothing of its own (no weight gradient): bitsandbytes' 4-bit matmul
    keeps only the weight, whose input cast to the compute dtype is transient."""
    h, i, kv, hd = m.hidden, m.intermediate, m.kv_heads * m.head_dim, m.head_dim
    q = m.heads * m.head_dim
    resid = 2 * hd + 2 * q + 2 * kv + 3 * i               # rotary, attention, MLP (in the residual dtype)
    fp32 = 2 * h + 2 + m.heads + 7 * rank + i              # norm inputs + rsqrt, lse, LoRA A outputs, silu*up
    fp32 += 2 * h if four_bit else 6 * h                   # LoRA inputs (see above)
    if four_bit:                                           # the residual dtype is float32 too
        return 0, resid + fp32
    return resid, fp32


def estimate(m, cfg):
    """{line: bytes} for one train.py step of model shape m under train.Config cfg (see the docstring)."""
    dtype = "fp32" if cfg.dtype == "auto" else cfg.dtype     # auto: the caller picks; see main()
    four_bit = cfg.load_in_4bit
    rb = residual_bytes(dtype, four_bit)
    q4, rest = base_weight_bytes(m, dtype, four_bit)
    lora = lora_numel(m, cfg.lora_r)
    seq = cfg.max_prompt_length + cfg.max_completion_length
    gen_batch = min(cfg.generation_batch_size, cfg.prompts_per_step * cfg.num_generations)
    mb = cfg.micro_batch_size
    resid, comp = layer_activation_elems(m, cfg.lora_r, four_bit)
    positions, packed_rows, packed_len = update_positions(m, cfg)
    # logprobs.head_operands: the head multiplies in float32, or in fp16 under fp16 autocast, cast once a
    # pass and kept for its backward; a float32 head (4-bit: k-bit preparation made it so) needs no copy
    head_dtype = "fp16" if dtype == "fp16" else ("fp32" if not four_bit and dtype == "bf16" else None)
    per_layer = positions * (resid * rb + comp * 4)
    boundaries = (m.layers + 2) * positions * m.hidden * rb        # each block's input, final norm in/out
    prompts = sizes.shared_prefill_prompts(cfg)
    head = sampler_head_bytes(m, cfg)
    # the sampler: the 4-bit + LoRA policy, or with --rollout_model dense its dense copy, whose residual
    # stream is in the compute dtype (auto is counted as the policy: it takes the copy only where it fits)
    dense = getattr(cfg, "rollout_model", "auto") == "dense"
    sb = BYTES[dtype] if dense else rb
    kvb = BYTES[dtype]                    # the cache: the compute dtype (generation.CastKVCache under autocast)
    lines = {
        "4-bit weights (NF4 + double-quant absmax)": q4,
        "embeddings / head, norms, biases (fp32)" if four_bit else f"base weights ({dtype})": rest,
        "LoRA weights (fp32)": 4 * lora,
        "LoRA grads + AdamW moments (fp32)": 3 * 4 * lora,
        **({f"rollout: dense copy (dequantised weights, {dtype})": dense_copy_bytes(m, dtype, four_bit)} if dense else {}),
        "rollout: KV cache": kv_cache_bytes(m, gen_batch, seq, kvb),
        **({"rollout: the prompts' shared cache": kv_cache_bytes(m, prompts, cfg.max_prompt_length, kvb)}
           if prompts else {}),
        "rollout: prefill activations (one layer)": prefill_bytes(m, prompts or gen_batch, cfg.max_prompt_length, sb,
                                                                  lora=not dense or dtype != "fp32"),
        "rollout: sampling logits (5 x [batch, V] fp32 + the step's)": sampling_logits_bytes(m, gen_batch, sb,
                                                                                             cfg.top_p),
        **({f"rollout: the LM head in {dtype} (generation.head_cast_once)": head} if head else {}),
        ("update: layer-boundary hidden states" if cfg.gradient_checkpointing
         else "update: all layers' activations"): boundaries if cfg.gradient_checkpointing else
        (m.layers * per_layer + 2 * positions * m.hidden * rb),
        "update: one layer's recompute": per_layer if cfg.gradient_checkpointing else 0,
        # the boolean mask, and the additive bias SDPA makes of it in the compute dtype and keeps for the
        # backward: one layer's with checkpointing, every layer's without
        **({"update: packed attention mask (bool + bias)": packed_rows * packed_len ** 2 * (
            1 + BYTES[dtype] * (1 if cfg.gradient_checkpointing else m.layers))} if packed_rows else {}),
        **({f"update: the LM head cast for the log-prob chunks ({head_dtype})": m.vocab * m.hidden * BYTES[head_dtype]}
           if head_dtype else {}),
        "update: log-prob chunk (2 x chunk x V fp32)": logprob_chunk_bytes(m, mb * cfg.max_completion_length),
    }
    persistent = sum(v for k, v in lines.items() if not k.startswith(("rollout", "update")))
    # the rollout's lines do not all coexist: the prefill's activations are gone before the cache is
    # full (sizes.generate_bytes); the same function as dense_copy.choose's, with the copy on top
    rollout = rollout_phase_bytes(m, cfg)
    update = sum(v for k, v in lines.items() if k.startswith("update"))
    lines["peak = persistent + max(rollout, update)"] = persistent + max(rollout, update)
    return lines


def update_positions(m, cfg):
    """(positions, packed rows, packed row length) of one update micro-batch's forward, at the worst
    case: micro_batch_size rows of prompt + completion; with --shared_prefix (logprobs.pack) one
    row per group it touches (it can cut a group at either end), each a prompt and up to G
    completions, padded to the longest: rows x length positions (0 rows: the plain layout, where
    packing would not pay by logprobs.worth_it's rule)."""
    mb, G, L, T = cfg.micro_batch_size, cfg.num_generations, cfg.max_prompt_length, cfg.max_completion_length
    plain = mb * (L + T)
    if not cfg.shared_prefix or G == 1:
        return plain, 0, 0
    rows, length = min(mb, math.ceil(mb / G) + (1 if mb % G else 0)), L + min(mb, G) * T
    kv = m.kv_heads * m.head_dim
    if logprobs.cost(rows, length, m.hidden, m.intermediate, kv) > \
            logprobs.SHARE * logprobs.cost(mb, L + T, m.hidden, m.intermediate, kv):
        return plain, 0, 0
    return rows * length, rows, length


def rollout_phase_bytes(m, cfg):
    """The rollout phase at its peak: sizes.sampling_bytes for the sampler cfg picks, plus the dense
    copy if it is one (with its log-prob pass for the mismatch metric, as dense_copy.choose counts)."""
    dtype = "fp32" if cfg.dtype == "auto" else cfg.dtype
    dense = getattr(cfg, "rollout_model", "auto") == "dense"
    sb = BYTES[dtype] if dense else residual_bytes(dtype, cfg.load_in_4bit)
    gen_batch = min(cfg.generation_batch_size, cfg.prompts_per_step * cfg.num_generations)
    held = sampling_bytes(m, gen_batch, cfg.max_prompt_length, cfg.max_prompt_length + cfg.max_completion_length,
                          sb, lora=not dense or dtype != "fp32", micro_batch=cfg.micro_batch_size if dense else 0,
                          top_p=cfg.top_p, prompts=sizes.shared_prefill_prompts(cfg), kv_bytes=BYTES[dtype])
    return held + (dense_copy_bytes(m, dtype, cfg.load_in_4bit) if dense else 0) + sampler_head_bytes(m, cfg)


def sampler_head_bytes(m, cfg):
    """Sampling through the 4-bit policy under half-precision autocast: its float32 LM head cast to the
    compute dtype once per rollout (generation.head_cast_once), held while it samples. The dense copy holds
    its head in the compute dtype already (dense_copy_bytes)."""
    dtype = "fp32" if cfg.dtype == "auto" else cfg.dtype
    dense = getattr(cfg, "rollout_model", "auto") == "dense"
    return m.vocab * m.hidden * BYTES[dtype] if cfg.load_in_4bit and not dense and dtype in ("bf16", "fp16") else 0


def peak_gb(m, cfg):
    return list(estimate(m, cfg).values())[-1] / GB


# The ladder of flags tried, in order, to fit a card: the cheapest in learning signal first.
LADDER = [("generation_batch_size", 32), ("micro_batch_size", 4), ("generation_batch_size", 16),
          ("micro_batch_size", 2), ("max_completion_length", 384), ("max_completion_length", 256),
          ("micro_batch_size", 1), ("generation_batch_size", 8), ("max_completion_length", 128)]
HEADROOM_GB = 1.0
CARDS_GB = (6, 8, 12)


def fit(m, cfg, card_gb):
    """The first cumulative set of LADDER flags whose peak + HEADROOM_GB fits card_gb: ({flag: value}, peak GB),
    or (None, peak) if even the whole ladder does not fit."""
    changed = {}
    while True:
        p = peak_gb(m, with_flags(cfg, **changed))
        if p + HEADROOM_GB <= card_gb:
            return changed, p
        step = next(((k, v) for k, v in LADDER if changed.get(k, getattr(cfg, k)) > v), None)
        if step is None:
            return None, p
        changed[step[0]] = step[1]


def flags_text(changed):
    if changed is None:
        return "does not fit"
    return " ".join(f"--{k} {v}" for k, v in changed.items()) or "the defaults"


def table(models, cfg):
    """The markdown table (and the flags that fit 8 GB and 12 GB cards) for shapes `models`."""
    ests = [estimate(m, cfg) for m in models]
    out = ["| computed, not measured (GB) | " + " | ".join(m.name for m in models) + " |",
           "|---|" + "---:|" * len(models)]
    for k in ests[0]:
        cells = " | ".join(f"{e[k] / GB:.2f}" for e in ests)
        out.append(f"| **{k}** | {cells} |" if k.startswith("peak") else f"| {k} | {cells} |")
    for card in CARDS_GB:
        out.append(f"| fits a {card} GB card with | " + " | ".join(
            flags_text(fit(m, cfg, card)[0]) for m in models) + " |")
    return "\n".join(out)


def describe(cfg):
    return (f"P {cfg.prompts_per_step} x G {cfg.num_generations}, prompt <= {cfg.max_prompt_length} + completion "
            f"<= {cfg.max_completion_length} tokens, generation batch {cfg.generation_batch_size}, micro-batch "
            f"{cfg.micro_batch_size}, LoRA r {cfg.lora_r}, {'4-bit NF4' if cfg.load_in_4bit else 'no 4-bit'}, "
            f"compute {cfg.dtype}, gradient checkpointing {'on' if cfg.gradient_checkpointing else 'off'}, "
            f"{'each prompt once' if cfg.shared_prefix else 'every row its own prompt'}"
            + (", sampling from the dense copy" if cfg.rollout_model == "dense" else ""))


def with_flags(cfg, **changed):
    """A copy of a Config (or of cli.resolved_config's object) with some flags changed."""
    out = copy.copy(cfg)
    for k, v in changed.items():
        setattr(out, k, v)
    return out


def main(argv=None):
    """The table for Qwen2.5-0.5B and 1.5B under train.py's defaults, or under the train.py flags given (which
    train.py itself resolves: cli.resolved_config)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], argument_default=argparse.SUPPRESS)
    for f in ("prompts_per_step", "num_generations", "max_prompt_length", "max_completion_length",
              "generation_batch_size", "micro_batch_size", "lora_r"):
        parser.add_argument(f"--{f}", type=int)
    parser.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16",
                        help="compute dtype (auto is fp16 on a T4, bf16 on newer GPUs: the same bytes)")
    parser.add_argument("--rollout_model", choices=("auto", "dense", "policy"), default="auto",
                        help="dense: the rollout samples from the dense copy, held with its sampling (auto is "
                             "counted as the policy: it takes the copy only where the GPU has room)")
    parser.add_argument("--no_load_in_4bit", dest="load_in_4bit", action="store_false")
    parser.add_argument("--no_gradient_checkpointing", dest="gradient_checkpointing", action="store_false")
    parser.add_argument("--no_shared_prefix", dest="shared_prefix", action="store_false",
                        help="every row its own prompt in the prefill and the updates (train.py --shared_prefix false)")
    given = {"dtype": "fp16", **vars(parser.parse_args(argv))}
    dtype = given.pop("dtype")      # set after train.py resolves the rest: its check of this host's GPU (bf16 on a
    cfg = with_flags(cli.resolved_config([f for k, v in given.items() for f in (f"--{k}", str(v).lower())]),
                     dtype=dtype)   # T4) is not this table's business, which counts bytes for any card
    print(f"Memory of one train.py step, computed from tensor sizes, not measured ({describe(cfg)}; "
          f"GB = 1e9 bytes; the fits keep {HEADROOM_GB:g} GB for the CUDA context and fragmentation):\n")
    print(table(list(QWEN.values()), cfg))
    return 0
