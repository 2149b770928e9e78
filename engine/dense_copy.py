"""The rollout's dense copy of the policy: 4-bit base dequantised, LoRA merged or kept apart, in a plain transformers model.

Generation through bitsandbytes' Linear4bit + peft's LoRA layers dequantises every weight of every
layer at every decode step and adds two small LoRA matmuls per layer; on a CPU (where
models.cpu_safe_4bit switches the 4-bit inference kernel off) that is most of the rollout. Before
each rollout train.py builds, from the current policy, a plain model of the same config whose
Linear weights are dequantize_4bit(W_4bit) (no bitsandbytes, no peft), lets generate() drive it,
and frees it before the updates. The LoRA adapters are merged into those weights (W + scaling *
B @ A, one matrix per layer) only in float32: rounded to bf16, W + s * B @ A is exactly W wherever
the adapter's change is below half a bf16 step of W (about 6e-5 at |W| = 0.02), which early in a run
at lr 1e-5 is most of it, and the copy would sample from the base model. In half precision each
Linear keeps its adapters apart (LoRALinear: W x + s * B (A x), with the policy's own A and B, as
peft computes it), so the copy samples from the policy it copies.

Only the sampling moves to the copy. The old log-probs (train.py step 4) are still computed by
the 4-bit + LoRA policy, so the first update's ratio is still exactly 1 and the loss unchanged;
the copy samples from a distribution whose rounding differs slightly (other kernels, another
summation order; in float32 the merged weights), which train.py logs every step as TRL logs its
vLLM mismatch, sampling/sampling_logp_difference/mean and /max = |log pi_sample - log pi_old| per
response token, and corrects for in the loss (cegppo.sampler_correction).

    dense_copy(policy, into=None, merge=None)  the copy (or refresh `into`, a copy built before, in place)
    merged_weight(layer)           one Linear's dense weight: dequantised base (+ scaling * B @ A)
    LoRALinear                     a dense Linear with its adapters apart (the half-precision copy)
    copy_bytes(policy)             the memory the copy adds (parameters shared with the policy excluded)
    held_while_sampling(policy, ...)  what sampling from it holds besides the weights (sizes.py's formulas)
    choose(mode, policy, ...)      'dense' or 'policy' for --rollout_model auto|dense|policy
    release(copy)                  free the copy's memory now (and give it back to the driver on CUDA)
    sampling_mismatch(...)         the two mismatch metrics
"""

import copy

from engine import models  # noqa: I001  (first: it quiets bitsandbytes' optional-kernel warning before the import)
import bitsandbytes as bnb
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM

from engine import sizes


def base_model(policy):
    """The transformers model inside a peft wrapper (or the model itself)."""
    return policy.get_base_model() if isinstance(policy, PeftModel) else policy


def _lora_adapters(layer):
    """The active adapters of a LoRA layer that hold weights here: [(A [r, in], B [out, r], scaling)]."""
    if not isinstance(layer, LoraLayer) or layer.disable_adapters:
        return []
    if layer.merged:
        raise ValueError("the policy's LoRA is merged into its base layers already; the copy would add it twice")
    out = []
    for name in layer.active_adapters:
        if name not in layer.lora_A:
            continue
        if layer.use_dora.get(name) or getattr(layer, "lora_bias", {}).get(name):
            raise NotImplementedError("the dense rollout copy merges plain LoRA only (no DoRA, no LoRA bias)")
        out.append((layer.lora_A[name].weight, layer.lora_B[name].weight, layer.scaling[name]))
    return out


def _base_weight(layer):
    base = layer.get_base_layer() if isinstance(layer, LoraLayer) else layer
    return base.weight, getattr(base, "bias", None)


@torch.no_grad()
def merged_weight(layer, dtype=None, out=None, merge=True):
    """A Linear's dense weight [out, in]: dequantised base (if 4-bit) plus, with merge, scaling * B @ A
    per active LoRA adapter, in `dtype` (default: the 4-bit layers' compute dtype, else the weight's
    own). out: a tensor of that shape to write into (no allocation). The policy is only read."""
    w, _ = _base_weight(layer)
    if isinstance(w, bnb.nn.Params4bit):
        dtype = dtype or w.quant_state.dtype
        if out is not None and out.dtype == w.quant_state.dtype and out.is_cuda:
            bnb.functional.dequantize_4bit(w.data, w.quant_state, out=out)    # (no CPU kernel for out=)
        else:
            deq = bnb.functional.dequantize_4bit(w.data, w.quant_state)         # [out, in] compute dtype
            out = deq.to(dtype) if out is None else out.copy_(deq)
    else:
        dtype = dtype or w.dtype
        if out is None:
            out = torch.empty(w.shape, dtype=dtype, device=w.device)
        out.copy_(w)
    for A, B, s in _lora_adapters(layer) if merge else []:
        # W += s * B @ A, accumulated by the matmul kernel in float32 and rounded to out's dtype once
        out.addmm_(B.to(out.dtype), A.to(out.dtype), alpha=s)
    return out


class LoRALinear(torch.nn.Module):
    """A dense Linear whose LoRA adapters stay apart: W x + b + scaling * B (A x) per adapter, computed as
    peft's LoRA layers compute it (under autocast in its dtype; otherwise in the adapter's dtype and cast
    back), so that no part of the adapter's change is rounded away into W. A and B are the policy's own
    tensors (shared: always current, no memory); only W and b belong to the copy."""

    def __init__(self, weight, bias, adapters):
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
        self.adapters = adapters                      # [(A [r, in], B [out, r], scaling)]

    def forward(self, x):
        result = torch.nn.functional.linear(x, self.weight, self.bias)
        autocast = torch.is_autocast_enabled(x.device.type)
        for A, B, s in self.adapters:
            out = torch.nn.functional.linear(torch.nn.functional.linear(x if autocast else x.to(A.dtype), A), B) * s
            result = result + (out if autocast else out.to(result.dtype))
        return result


def _plain_config(policy):
    cfg = copy.deepcopy(base_model(policy).config)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    return cfg


def _pairs(dense, base):
    """(name, dense module, policy module) for every module of the plain model."""
    for name, dmod in dense.named_modules():
        yield name, dmod, base.get_submodule(name) if name else base


def _device(policy):
    return next(policy.parameters()).device


@torch.no_grad()
def dense_copy(policy, into=None, merge=None):
    """A plain transformers model (no bitsandbytes, no peft) computing what `policy` computes, for generate().

    Every nn.Linear gets merged_weight() of the policy's layer of the same name, in the compute
    dtype, and where that layer has LoRA adapters and merge is False becomes a LoRALinear holding
    them apart. merge None: merge in float32 only (see the module docstring). The other tensors
    (embeddings, norms, biases, rotary buffers) are frozen in the policy: the copy shares them when
    their dtype and device already match (no memory), else holds a converted copy; a tensor shared
    by two modules (a tied LM head) stays shared.
    into: a copy built before from the same policy; only its merged Linear weights are rewritten
    (the other tensors cannot have changed; a LoRALinear's adapters are the policy's own), with no
    allocation.
    """
    base = base_model(policy)
    if into is not None:
        for _, dmod, pmod in _pairs(into, base):
            if type(dmod) is torch.nn.Linear and _lora_adapters(pmod):
                merged_weight(pmod, out=dmod.weight.data)
        return into
    dtype, device = models.model_compute_dtype(policy), next(base.parameters()).device
    merge = dtype == torch.float32 if merge is None else merge
    with torch.device("meta"):
        dense = AutoModelForCausalLM.from_config(_plain_config(policy), dtype=dtype)
    made = {}                                                     # source tensor -> its tensor in the copy

    def converted(src, dt):
        key = (src.data_ptr(), src.dtype, tuple(src.shape), dt)
        if key not in made:
            made[key] = src if (src.dtype == dt and src.device == device) else src.to(device=device, dtype=dt)
        return made[key]

    for name, dmod, pmod in _pairs(dense, base):
        for pname, p in list(dmod.named_parameters(recurse=False)):
            if isinstance(dmod, torch.nn.Linear) and pname == "weight":
                w, _ = _base_weight(pmod)
                if isinstance(w, bnb.nn.Params4bit) or _lora_adapters(pmod):
                    t = merged_weight(pmod, dtype, merge=merge)
                else:
                    t = converted(w, dtype)                       # a plain Linear (the LM head): shared
            elif isinstance(dmod, torch.nn.Linear) and pname == "bias":
                t = converted(_base_weight(pmod)[1], dtype)
            else:
                t = converted(getattr(pmod, pname), dtype)
            dmod._parameters[pname] = torch.nn.Parameter(t, requires_grad=False)
        for bname, b in list(dmod.named_buffers(recurse=False)):
            src = getattr(pmod, bname)
            dmod._buffers[bname] = converted(src, src.dtype)      # rotary frequencies keep their float32
    left = [n for n, t in [*dense.named_parameters(), *dense.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"dense rollout copy: no source for {left[:3]}")
    if not merge:                                                 # the adapters apart, beside W
        for name, dmod, pmod in list(_pairs(dense, base)):
            if isinstance(dmod, torch.nn.Linear) and _lora_adapters(pmod):
                parent, _, child = name.rpartition(".")
                setattr(dense.get_submodule(parent) if parent else dense, child,
                        LoRALinear(dmod.weight.data, None if dmod.bias is None else dmod.bias.data,
                                   _lora_adapters(pmod)))
    dense.generation_config = copy.deepcopy(base.generation_config)
    dense.eval()
    return dense


def copy_bytes(policy, dtype=None):
    """Bytes the dense copy adds to memory: every Linear weight a LoRA or 4-bit layer holds, in the
    compute dtype, plus the other parameters (biases included) whose dtype differs from it (those
    are converted, not shared). Counted from the policy's tensors' shapes; nothing is built."""
    base, dtype = base_model(policy), dtype or models.model_compute_dtype(policy)
    size, seen, total = torch.tensor([], dtype=dtype).element_size(), set(), 0
    for m in base.modules():
        if id(m) in seen or not (isinstance(m, (LoraLayer, bnb.nn.Linear4bit))):
            continue
        w, bias = _base_weight(m)
        shape = w.quant_state.shape if isinstance(w, bnb.nn.Params4bit) else w.shape
        total += size * torch.Size(shape).numel()
        if bias is not None and bias.dtype != dtype:                   # converted too (dense_copy)
            total += size * bias.numel()
        seen.update(id(x) for x in [*m.modules(), *m.parameters()])   # its base layer and LoRA: not again
    for p in base.parameters():
        if id(p) not in seen and p.dtype != dtype:
            seen.add(id(p))
            total += size * p.numel()
    return total


def held_while_sampling(policy, sequences=1, tokens=1, prompt_tokens=None, micro_batch=0, top_p=1.0, prompts=None):
    """Bytes sampling from the copy holds besides the weights: generate()'s KV cache, its prefill's
    activations and its logits for `sequences` sequences of `prompt_tokens` (default: all `tokens`)
    prompt and `tokens` positions in all, or, when larger, the no-grad log-prob pass over
    `micro_batch` sequences that the mismatch metric runs while the copy is held. memory.py's
    formulas (sizes.py), on the policy's shape, in the copy's compute dtype: merged Linears in float32,
    LoRA layers in half precision (dense_copy)."""
    shape = sizes.ModelShape.from_config(base_model(policy).config)
    dtype = models.model_compute_dtype(policy)
    elem = torch.tensor([], dtype=dtype).element_size()
    return sizes.sampling_bytes(shape, sequences, tokens if prompt_tokens is None else prompt_tokens, tokens, elem,
                                lora=dtype != torch.float32, micro_batch=micro_batch, top_p=top_p, prompts=prompts)


def choose(mode, policy, sequences=1, tokens=1, margin=0.1, prompt_tokens=None, micro_batch=0, top_p=1.0,
           prompts=None):
    """'dense' or 'policy' for --rollout_model. auto: dense on a GPU when everything sampling from the
    copy holds (copy_bytes + held_while_sampling: the copy, the KV cache, the prefill's activations, the
    logits, the mismatch metric's log-prob pass) fits in its free memory with `margin` of it to
    spare; the policy on a CPU, where the copy did not pay for itself (docs/benchmarks.md: at
    Qwen2.5-0.5B's shapes, float32, generation ran 1.27x faster but the step, with the mismatch
    metric's extra forward pass, 1.06-1.10x slower). train.py passes generation batch x (prompt +
    completion) tokens, the prompt length and the micro-batch."""
    if mode != "auto":
        return mode
    device = _device(policy)
    if device.type != "cuda":
        return "policy"
    need = copy_bytes(policy) + held_while_sampling(policy, sequences, tokens, prompt_tokens, micro_batch, top_p, prompts)
    return "dense" if need <= (1 - margin) * free_gpu_bytes(device) else "policy"


def free_gpu_bytes(device):
    """What this process can still allocate on a CUDA device: the driver's free memory plus what
    torch's allocator holds cached (reused before anything new is asked for), or less under a
    per-process cap (torch.cuda.set_per_process_memory_fraction; the driver does not see it):
    the cap minus what is allocated."""
    free, total = torch.cuda.mem_get_info(device)
    allocated = torch.cuda.memory_allocated(device)
    free += torch.cuda.memory_reserved(device) - allocated
    fraction = torch.cuda.get_per_process_memory_fraction(device)
    return min(free, fraction * total - allocated) if fraction < 1 else free


def release(dense):
    """Free a dense copy now, whoever still refers to it: its own tensors (the merged weights, the
    converted ones) are swapped for empty meta tensors, those it shares with the policy are only
    dropped from it (the policy keeps them), and on CUDA the freed blocks go back from torch's
    cache to the driver (torch.cuda.empty_cache), so that the updates, and anything else on the
    card, get the memory back. The copy cannot be used afterwards; build a new one (dense_copy)."""
    for module in dense.modules():
        if isinstance(module, LoRALinear):
            module.adapters = []                                  # the policy's own: only dropped
        for name, p in module._parameters.items():
            if p is not None:
                module._parameters[name] = torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
        for name, b in module._buffers.items():
            if b is not None:
                module._buffers[name] = torch.empty_like(b, device="meta")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sampling_mismatch(sample_logp, old_logp, mask):
    """TRL's names for |log pi_sample - log pi_old| over the response tokens: mean and max."""
    d = (sample_logp.float() - old_logp.float()).abs()[mask.bool()]
    if d.numel() == 0:
        return {"sampling/sampling_logp_difference/mean": 0.0, "sampling/sampling_logp_difference/max": 0.0}
    return {"sampling/sampling_logp_difference/mean": d.mean().item(),
            "sampling/sampling_logp_difference/max": d.max().item()}
