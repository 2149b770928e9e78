"""Loading the policy: the model (4-bit NF4 + LoRA), the one precision rule, CPU threads.

Everything here is engineering around the algorithm in cegppo.py; nothing here changes what CE-GPPO computes.

    load_model      a Hub name or a local folder -> (model, tokenizer), 4-bit + LoRA if asked
    resolve_model   'tiny' and 'lab' (built in code by engine/lab.py) -> their local folders
    set_threads     torch's CPU threads (oversubscription on a busy machine is the usual trap)
    compute_dtype, autocast   the one precision rule: bf16 / fp16 / fp32 by device, autocast on CUDA
"""

import contextlib
import logging
import os
import re
import socket
import sys
import urllib.parse
import warnings

# Before bitsandbytes is imported (peft and transformers import it): on CPUs with AVX512-BF16 it
# looks for an optional inference kernel package ("kernels") and logs a warning that reads like a
# broken install when it is absent. That kernel serves only the inference layout that
# cpu_safe_4bit switches off, so the message gives the user nothing to act on. Since transformers
# 5.25 installs "kernels", the lookup goes to the Hub instead, and offline (the tests, a classroom
# without network) that package logs a skipped "publisher trust check" for the same kernel: as
# little to act on, and the lookup then fails back to bitsandbytes' own CPU code, as without it.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
logging.getLogger("kernels").setLevel(logging.ERROR)
# peft 0.21 asks transformers 5 for `is_gradient_checkpointing`, a deprecated alias of
# `is_activation_checkpointing` with the same value: the warning is about peft's spelling, not ours.
warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)

import bitsandbytes as bnb  # noqa: E402
import torch  # noqa: E402
from huggingface_hub import constants as hub_constants  # noqa: E402
from huggingface_hub import try_to_load_from_cache  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402


from engine import lab  # noqa: E402
from engine.errors import UserError  # noqa: E402

# transformers' per-load progress bars ("Loading weights", "Writing model shards") for models that
# load in a second are noise on the first screen; downloads keep the Hub client's own bars.
hf_logging.disable_progress_bar()


CPU_HINT = "on a CPU, `python train.py --preset lab` runs the whole pipeline on a small model built in code"


# ----------------------------------------------------------------------------------------------
# CPU threads
# ----------------------------------------------------------------------------------------------
def set_threads(threads=0):
    """Set torch's intra-op threads; 0 = automatic. Returns the number in use.

    Automatic: $OMP_NUM_THREADS if set, else one thread per core this process may use. torch's own
    default is similar, but its threads spin while they wait: with another busy process on the
    same cores they fight over them and a run slows down 10-30x. Setting the number explicitly to
    what is free (--threads, or OMP_NUM_THREADS=1 for every job on a busy 2-core machine) fixes it.
    """
    threads = thread_count(threads)
    torch.set_num_threads(threads)
    return threads


def thread_count(threads=0):
    """What set_threads(threads) sets: `threads`, or for 0 $OMP_NUM_THREADS if set, else usable_cpus()."""
    if threads > 0:
        return threads
    env = os.environ.get("OMP_NUM_THREADS", "")
    return int(env) if env.isdigit() and int(env) > 0 else usable_cpus()


def usable_cpus():
    """The cores this process may run on: its CPU affinity where the OS has one (Linux), else all of
    them (os.sched_getaffinity does not exist on Windows and macOS)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def dtype_name(dtype):
    """The --dtype spelling of a torch dtype: bf16, fp16, fp32 (or torch's own name)."""
    return next((name for name, d in DTYPES.items() if d == dtype), str(dtype).split(".")[-1])


def native_bf16(device=None):
    """Does this CUDA GPU compute bf16 natively: compute capability 8.0 (Ampere) or newer?

    Not torch.cuda.is_bf16_supported(): that also says yes on 7.x cards (a T4 is 7.5), where bf16
    runs through emulation, slower than fp16 and without bf16 tensor cores."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 8


def compute_dtype(choice="auto"):
    """The compute dtype, one rule for every script: bf16 on GPUs with native bf16 (native_bf16),
    fp16 on older GPUs (train.py then scales the loss), fp32 on a CPU; or the explicit choice."""
    if choice != "auto":
        return DTYPES[choice]
    if torch.cuda.is_available():
        return torch.bfloat16 if native_bf16() else torch.float16
    return torch.float32


def autocast(device_type, dtype):
    """The context the forward passes run in: torch.autocast in `dtype` on CUDA when it is fp16 or
    bf16 (the LoRA matmuls, attention and the LM head then run in half precision; log-softmax,
    entropy, ratios and the loss stay float32, logprobs._TokenLogProb casts its logits up), and a
    plain nullcontext otherwise: fp32, and on a CPU, where the 4-bit layers compute in their own
    compute dtype and everything else stays float32. An autocast already entered by the caller
    stays in force inside the nullcontext."""
    if device_type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def model_autocast(model):
    """autocast() for `model`: its parameters' device and its compute dtype (model_compute_dtype)."""
    return autocast(next(model.parameters()).device.type, model_compute_dtype(model))


def model_compute_dtype(model):
    """The dtype a loaded model computes in: its 4-bit layers' compute dtype, else its input
    embeddings' dtype (without 4-bit nothing is cast up to float32)."""
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            return m.weight.quant_state.dtype if m.weight.quant_state is not None else m.compute_dtype
    return model.get_input_embeddings().weight.dtype


def float32_on_cpu(choice="auto"):
    """Does a run with --dtype `choice` compute in float32 on a CPU (where the sampler's own log-probs are pi_old)?"""
    return not torch.cuda.is_available() and compute_dtype(choice) == torch.float32


def enable_tf32():
    """TF32 tensor cores for the float32 matmuls and convolutions left on GPUs with compute capability
    8.0 or newer (10 mantissa bits instead of 23, 8x the throughput); nothing elsewhere."""
    if native_bf16():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")     # org/name, as the Hub spells repository ids


def resolve_model(name):
    """The built-in tasks' models ('tiny', 'lab', 'carry': lab.TASKS) are built locally (engine/lab.py);
    anything else is a Hub id or a folder, unchanged."""
    if name in lab.TASKS:
        return lab.warm_start_path(name)
    return name


def check_model_source(name, say_cpu=False):
    """Fail fast, in one line, when `name` is neither a folder nor a loadable Hub id (lab.TASKS' models are
    built in code). say_cpu: say first that a real model trains very slowly without a GPU.

    A Hub id that is not in the local cache needs the Hub; when it cannot be reached, the Hub client
    would retry for about half a minute before failing, so we look first (a 3 s connection).
    """
    if name in lab.TASKS:
        return
    if say_cpu and not torch.cuda.is_available():
        print(f"No CUDA GPU found: a real model trains very slowly on the CPU; {CPU_HINT}.", file=sys.stderr)
    if os.path.isdir(name):
        return
    if not HUB_ID.match(name) or name.startswith("."):
        raise UserError(f"--model {name}: no such folder (and not a Hub id like Qwen/Qwen2.5-0.5B-Instruct)")
    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return                                              # in the local Hub cache: no network needed
    if hub_constants.HF_HUB_OFFLINE:
        raise UserError(f"--model {name}: not in the local Hugging Face cache and the Hub is offline "
                        f"(HF_HUB_OFFLINE); pass a local folder with --model, or {CPU_HINT}")
    if not hub_reachable():
        raise UserError(f"--model {name}: cannot reach the Hugging Face Hub ({hub_constants.ENDPOINT}) to "
                        f"download it; pass a local folder with --model, or {CPU_HINT}")


def hub_reachable(timeout=3.0):
    """Can a TCP connection to the Hub's endpoint be opened within `timeout` seconds?"""
    url = urllib.parse.urlparse(hub_constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def load_model(name, four_bit=True, lora_rank=0, lora_alpha=None, adapter=None, trainable=False,
               gradient_checkpointing=True, dtype="auto"):
    """(model, tokenizer) from a Hub id (through the Hub cache) or a local folder.

    four_bit: NF4 with double quantisation (bitsandbytes); compute in `dtype` (compute_dtype).
              Otherwise the weights load in that compute dtype.
    lora_rank > 0: a fresh LoRA on all linear layers (dropout 0: dropout would make the ratio
              differ from 1 even on-policy). adapter: a LoRA folder saved by train.py instead.
    trainable: prepare for training (k-bit preparation, gradient checkpointing).
    """
    check_model_source(name)
    if adapter and not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
        raise UserError(f"--adapter {adapter}: no adapter_config.json there (a folder saved by train.py)")
    dt = compute_dtype(dtype)
    kwargs = {"dtype": dt}
    if four_bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dt)
    if torch.cuda.is_available():
        kwargs["device_map"] = {"": 0}
        enable_tf32()
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--model {name}: cannot load it ({first})") from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if trainable:
        prepare_for_training(model, four_bit, gradient_checkpointing)
    if adapter:
        model = PeftModel.from_pretrained(model, adapter, is_trainable=trainable)
    elif lora_rank > 0:
        model = get_peft_model(model, LoraConfig(
            r=lora_rank, lora_alpha=lora_alpha or 2 * lora_rank, lora_dropout=0.0,
            target_modules="all-linear", task_type="CAUSAL_LM"))
    cpu_safe_4bit(model)
    return model, tokenizer


def prepare_for_training(model, four_bit, gradient_checkpointing):
    """peft's k-bit preparation (norms in fp32, base frozen), then non-reentrant activation checkpointing.

    Checkpointing is switched on here, through transformers 5's own name for it, rather than by
    peft (which would call the deprecated alias). Non-reentrant checkpointing needs no
    requires-grad hook on the input embeddings."""
    if four_bit:
        prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def cpu_safe_4bit(model):
    """Keep 4-bit layers trainable on CPUs with AVX512-BF16.

    There, bitsandbytes repacks a Linear4bit weight into an inference-only layout on the first
    no-grad eval forward (generation); the next training forward then fails inside matmul_4bit
    ("a view of a leaf Variable that requires grad is being used in an in-place operation").
    Switching that path off costs a little CPU inference speed and changes nothing on a GPU.
    """
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False


def policy_model(cfg, adapter=None):
    """(model, tokenizer) of a train.py Config, ready to train: the 4-bit base with a fresh LoRA adapter, or
    `adapter` (a checkpoint's, or a trained one: engine/bench.py)."""
    model, tok = load_model(resolve_model(cfg.model), four_bit=cfg.load_in_4bit, lora_rank=cfg.lora_r,
                            lora_alpha=cfg.lora_alpha, adapter=adapter, trainable=True,
                            gradient_checkpointing=cfg.gradient_checkpointing, dtype=cfg.dtype)
    model.train()
    return model, tok


class Optimizer:
    """AdamW on the policy's trainable (LoRA) parameters, fused (one kernel for all of them, CPU and CUDA), with
    fp16's dynamic loss scaling: fp16 gradients underflow without it; bf16 and fp32 need none (the scaler is
    then a no-op). backward(loss) scales the loss; step() unscales, clips and applies the gradient, or, where
    it is not finite, applies nothing (a nan/inf never reaches the weights) and lowers the scale."""

    def __init__(self, model, cfg):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.adamw = torch.optim.AdamW(self.params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=True)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.scaler = torch.amp.GradScaler(device, enabled=compute_dtype(cfg.dtype) == torch.float16)
        self.max_grad_norm = cfg.max_grad_norm
        if self.scaler.is_enabled():
            why = "no native bf16 on this GPU" if cfg.dtype == "auto" else "--dtype fp16"
            print(f"fp16 compute ({why}): dynamic loss scaling on", file=sys.stderr)

    @property
    def lr(self):
        return self.adamw.param_groups[0]["lr"]

    def set_lr(self, lr):
        for group in self.adamw.param_groups:
            group["lr"] = lr

    def backward(self, loss):
        self.scaler.scale(loss).backward()

    def step(self, finite=True):
        """Clip and apply the accumulated gradient: its norm, or None (nothing applied) where it, or the loss
        (finite=False), is not finite. With fp16 the gradient is unscaled first, and an overflow lowers the
        loss scale for the next update (GradScaler's dynamic scaling)."""
        grad_norm = None
        if finite:
            self.scaler.unscale_(self.adamw)
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
            if torch.isfinite(norm):
                self.scaler.step(self.adamw)
                grad_norm = norm.item()
            if self.scaler.is_enabled():
                self.scaler.update()         # halves the scale after an overflow, grows it after a quiet run
        self.adamw.zero_grad(set_to_none=True)
        return grad_norm

    def loss_scale(self):
        return self.scaler.get_scale() if self.scaler.is_enabled() else None
