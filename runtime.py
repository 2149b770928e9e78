"""The bookkeeping around train.py's loop: checkpoints and resume, RNG states, step timing, peak
memory, Ctrl-C and wandb. Nothing here changes what the loop computes; it lives apart so that
train.py reads as the algorithm's steps.

    check_resume, find_checkpoint, save_checkpoint, restore   atomic checkpoints, exact resume
    rng_state, set_rng_state      every generator, restorable on another device count or a CPU
    timed, sync                   wall time of a phase (on a GPU once its queued work has run)
    reset_peak_mem, peak_mem_gb, peak_mem_reserved_gb   this step's peak memory
    catch_ctrl_c, start_wandb     Ctrl-C finishes the step and saves; optional Weights & Biases
"""

import dataclasses
import json
import os
import random
import shutil
import signal
import sys
import time

import torch
from tqdm import tqdm

from loading import UserError


# ----------------------------------------------------------------------------------------------
# Checkpoints: written to a temp folder and renamed; a resume continues exactly
# ----------------------------------------------------------------------------------------------
def check_resume(cfg, may_change):
    """The checkpoint to resume from (or None); refuses a run folder that would be overwritten, and
    a resume whose flags differ from the saved config.json in anything but `may_change`."""
    out = cfg.output_dir
    if not cfg.resume:
        if os.path.exists(os.path.join(out, "metrics.jsonl")):
            raise UserError(f"--output_dir {out}: holds a run already; pass --resume to continue it or pick a new folder")
        return None
    ckpt = find_checkpoint(out)
    if ckpt is None:
        raise UserError(f"--resume: no checkpoint in {out}")
    saved = json.load(open(os.path.join(out, "config.json")))
    for k, v in dataclasses.asdict(cfg).items():
        if k not in may_change and saved.get(k) != v:
            raise UserError(f"--resume: --{k} is {v!r} here but {saved.get(k)!r} in {out}/config.json")
    return ckpt


def find_checkpoint(out):
    for name in ("checkpoint", "checkpoint.old"):   # .old only survives a crash between two renames
        path = os.path.join(out, name)
        if os.path.isfile(os.path.join(path, "state.pt")):
            return path
    return None


def save_checkpoint(out, model, optimizer, scaler, state):
    """7. Adapter + optimizer + loss scale + the loop's State + RNG, written to a temp folder and renamed."""
    final, tmp, old = (os.path.join(out, n) for n in ("checkpoint", "checkpoint.tmp", "checkpoint.old"))
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(os.path.join(tmp, "adapter"))
    torch.save({"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "rng": rng_state(),
                **dataclasses.asdict(state)}, os.path.join(tmp, "state.pt"))
    if os.path.isdir(final):
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def restore(ckpt, out, optimizer, scaler, state_cls):
    """The loop's State (a `state_cls`) from a checkpoint, with the optimizer, loss scale and RNG;
    metrics and sample rows written after it (a crash) are dropped, to be redone."""
    # map_location: a checkpoint saved on a GPU loads on a CPU too; load_state_dict then moves each
    # optimizer state tensor to its parameter's device (and dtype), wherever that is
    saved = torch.load(os.path.join(ckpt, "state.pt"), weights_only=False, map_location="cpu")
    optimizer.load_state_dict(saved["optimizer"])
    if scaler.is_enabled() and saved["scaler"]:     # a run saved without fp16 (or moved to fp16) starts a fresh scale
        scaler.load_state_dict(saved["scaler"])
    set_rng_state(saved["rng"])
    state = state_cls(**{f.name: saved[f.name] for f in dataclasses.fields(state_cls) if f.name in saved})
    for name in ("metrics.jsonl", "samples.jsonl"):
        path = os.path.join(out, name)
        rows = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows if r["step"] <= state.step)
        os.replace(tmp, path)
    print(f"resumed from {ckpt} at step {state.step}", file=sys.stderr)
    return state


def rng_state():
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s):
    """The saved generators back, on whatever machine resumes: the CUDA states of the GPUs it has
    (the first min(saved, visible); none without CUDA), so a run saved on a GPU resumes on a CPU
    and one saved with 2 GPUs visible resumes with 1 (or 1 with 2: the others keep their seeds)."""
    random.setstate(s["python"])
    torch.set_rng_state(s["torch"].cpu())
    cuda = s.get("cuda") or []
    if torch.cuda.is_available():
        for i, state in enumerate(cuda[:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state.cpu(), i)


# ----------------------------------------------------------------------------------------------
# Time and memory of a step
# ----------------------------------------------------------------------------------------------
def timed(times, name, fn, *args):
    """fn(*args), its wall time added to times[name]. On a GPU the clock is read once the work queued
    before and by fn has run (CUDA calls return before their kernels finish)."""
    sync()
    t = time.time()
    out = fn(*args)
    sync()
    times[name] = times.get(name, 0.0) + time.time() - t
    return out


def sync():
    """Wait for the GPU's queued work, when CUDA is in use."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_peak_mem():
    """Start a new peak: CUDA's peak allocated and reserved, or on Linux the process's peak RSS (VmHWM)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                    # Linux >= 4.0: resets VmHWM to the current RSS
    except OSError:
        pass                                # elsewhere the peak stays the process's lifetime peak


def peak_mem_gb():
    """Peak memory since reset_peak_mem(): CUDA allocated (the tensors), or RSS on CPU (model loading
    included otherwise, whose transient peak would hide the training step's). None where the OS
    tells neither (Windows: no /proc and no `resource` module)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    try:
        with open("/proc/self/status") as f:
            return int(next(line.split()[1] for line in f if line.startswith("VmHWM:"))) / 1e6   # kB
    except (OSError, StopIteration):
        pass
    try:
        import resource         # Unix only, so not at the top: the training path runs on Windows too
    except ImportError:
        return None
    # the process's lifetime peak: Linux reports ru_maxrss in KiB, macOS in bytes
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1e9 if sys.platform == "darwin" else 1e6)


def peak_mem_reserved_gb():
    """Peak CUDA memory reserved by torch's caching allocator since reset_peak_mem() (what the card
    had to hold: the tensors of peak_mem_gb plus cached and fragmented blocks); None without CUDA."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_reserved() / 1e9
    return None


# ----------------------------------------------------------------------------------------------
# Ctrl-C and wandb
# ----------------------------------------------------------------------------------------------
def catch_ctrl_c():
    """Ctrl-C finishes the step in progress (a half-updated step cannot be checkpointed), then saves."""
    stop = {"asked": False}

    def on_sigint(signum, frame):
        if stop["asked"]:
            raise KeyboardInterrupt
        stop["asked"] = True
        tqdm.write("Ctrl-C: finishing this step, then saving a checkpoint (Ctrl-C again to abort)")
    signal.signal(signal.SIGINT, on_sigint)
    return stop


def start_wandb(cfg):
    if not cfg.wandb:
        return None
    try:
        import wandb            # optional: only for --wandb
    except ImportError:
        raise UserError("--wandb: wandb is not installed (pip install wandb)")
    return wandb.init(project="cegppo", name=os.path.basename(cfg.output_dir), config=dataclasses.asdict(cfg))
