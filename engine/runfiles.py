"""A run folder's files: checkpoints written atomically, an exact resume, rows appended and read back.

    check_resume, find_checkpoint, save_checkpoint, restore, start_over   atomic checkpoints, exact resume
    save_final                    the final adapter, each file whole
    write_json, write_file, keep_rows   files replaced whole and durably (a crash or power cut leaves old or new)
    rng_state, set_rng_state      every generator, restorable on another device count or a CPU
"""

import dataclasses
import json
import os
import pickle
import random
import re
import shutil
import sys

import numpy as np
import torch

from engine import token_page
from engine.rows import step_lines, token_steps
from engine.errors import UserError


# ----------------------------------------------------------------------------------------------
# Checkpoints: written to a temp folder, flushed to disk, marked complete and renamed; a resume
# continues exactly. A crash or power cut at any point leaves the newest complete checkpoint in place.
# ----------------------------------------------------------------------------------------------
ROWS = ("metrics.jsonl", "samples.jsonl", "tokens.jsonl")     # a run's logs, one row per line, each with its step


def open_run(cfg, ckpt, optimizer, scaler, fresh):
    """The run folder, once every input was good: its config.json written whole, and the loop's state: `fresh`,
    or restored from `ckpt` (with the optimizer, the loss scale and every generator); the token page of a
    resumed run rebuilt from its rows up to the checkpoint (those after it are redone)."""
    os.makedirs(cfg.output_dir, exist_ok=True)
    write_json(os.path.join(cfg.output_dir, "config.json"), dataclasses.asdict(cfg))   # whole, or the old one
    state = restore(ckpt, cfg.output_dir, optimizer, scaler, type(fresh)) if ckpt else fresh
    if cfg.resume and os.path.exists(os.path.join(cfg.output_dir, "tokens.jsonl")):
        token_page.write_page(cfg.output_dir, token_steps(cfg.output_dir))
    return state


def check_resume(cfg, may_change):
    """The checkpoint to resume from, or None: a fresh start, or (with --resume) a run stopped before
    its first checkpoint, whose rows are dropped here so that it starts again from step 0 (start_over).
    Refuses a run folder that would be overwritten, and a resume whose flags differ from the saved
    config.json in anything but `may_change`."""
    out = cfg.output_dir
    started = os.path.exists(os.path.join(out, "metrics.jsonl"))
    if not cfg.resume:
        if started:
            raise UserError(f"--output_dir {out}: holds a run already; pass --resume to continue it or pick a new folder")
        return None
    ckpt = find_checkpoint(out)
    if ckpt is None and not started:
        raise UserError(f"--resume: no checkpoint in {out}")
    saved = saved_config(out)
    # no checkpoint, but rows past the run's first save: it had one (since lost), and cannot be redone
    if ckpt is None and last_step(out) > first_save({**dataclasses.asdict(cfg), **(saved or {})}):
        raise UserError(f"--resume: no checkpoint in {out}")
    for k, v in dataclasses.asdict(cfg).items():
        if saved is not None and k not in may_change and saved.get(k) != v:
            raise UserError(f"--resume: --{k} is {v!r} here but {saved.get(k)!r} in {out}/config.json")
    if ckpt is None:
        start_over(out)
    return ckpt


def saved_config(out):
    """The flags of the run in `out` (its config.json), or None where it has none (deleted, so as to
    resume unchecked: said in one line). An empty or damaged one is one clear line, not a traceback."""
    path = os.path.join(out, "config.json")
    if not os.path.exists(path):
        print(f"--resume: no {path}: the flags given here are taken as the run's, unchecked", file=sys.stderr)
        return None
    try:
        with open(path, "rb") as f:
            saved = json.loads(f.read())
    except (OSError, ValueError):           # JSONDecodeError, or bytes that are not text (NULs are JSON errors)
        saved = None
    if not isinstance(saved, dict):
        raise UserError(f"--resume: {path} is empty or damaged (cut off while written?), so the run's flags cannot "
                        "be checked; delete it to resume with the flags given here, unchecked")
    return saved


def first_save(flags):
    """The step of a run's first checkpoint, by its flags: save_steps, or max_steps when sooner (a
    Ctrl-C or a stop for lack of signal saves sooner still, and so leaves a checkpoint)."""
    return min(flags["save_steps"], flags["max_steps"])


def last_step(out):
    """The step of the last complete row of metrics.jsonl; 0 without one."""
    return max((step for step, _ in step_lines(os.path.join(out, "metrics.jsonl"))), default=0)


CHECKPOINT_FILES = ("state.pt", os.path.join("adapter", "adapter_config.json"),
                    os.path.join("adapter", "adapter_model.safetensors"))
# written and flushed after every other file of a checkpoint: its presence vouches for their data
COMPLETE = "COMPLETE"


def checkpoint_folders(out):
    """(checkpoint, checkpoint.tmp, checkpoint.old) of a run folder."""
    return tuple(os.path.join(out, n) for n in ("checkpoint", "checkpoint.tmp", "checkpoint.old"))


def is_complete(folder, unmarked=True):
    """Does `folder` hold a whole checkpoint: every file there, none empty, and the COMPLETE marker
    (a folder cut off before its data reached the disk has none)? `unmarked`: a folder without the
    marker counts too (checkpoints written before it existed), which checkpoint.tmp never does."""
    if not all(os.path.isfile(os.path.join(folder, f)) and os.path.getsize(os.path.join(folder, f)) > 0
               for f in CHECKPOINT_FILES):
        return False
    return unmarked or os.path.isfile(os.path.join(folder, COMPLETE))


def find_checkpoint(out):
    """The newest complete checkpoint folder of a run, or None: checkpoint.tmp once marked complete (a
    cut came before its renames), else `checkpoint`, else `checkpoint.old` (a cut came between the
    renames, or left `checkpoint` incomplete)."""
    final, tmp, old = checkpoint_folders(out)
    if is_complete(tmp, unmarked=False):
        return tmp
    return next((path for path in (final, old) if is_complete(path)), None)


def save_checkpoint(out, model, optimizer, scaler, state):
    """7. Adapter + optimizer + loss scale + the loop's State + RNG, written to checkpoint.tmp, flushed to
    disk with the run's rows, marked complete and renamed into place: atomic against a crash of the
    process and against a power cut, and the newest complete checkpoint is never removed before the
    next one has taken its place."""
    final, tmp, old = checkpoint_folders(out)
    if is_complete(tmp, unmarked=False):    # a save cut off after it was complete (the one resumed from)
        put_in_place(out)
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(os.path.join(tmp, "adapter"))
    # only tensors, numbers, strings and containers of them: restore loads it with weights_only=True
    torch.save({"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "rng": rng_state(),
                **dataclasses.asdict(state)}, os.path.join(tmp, "state.pt"))
    flush_to_disk(tmp)                      # the data on disk before the marker vouches for it
    for name in ROWS:                       # and the rows up to this step: a checkpoint never points past them
        if os.path.exists(os.path.join(out, name)):
            fsync_file(os.path.join(out, name))
    write_synced(os.path.join(tmp, COMPLETE), "every other file of this checkpoint was on disk before this one\n")
    fsync_folder(tmp)
    fsync_folder(out)                       # checkpoint.tmp's own entry, before anything else is removed
    put_in_place(out)


def put_in_place(out):
    """checkpoint.tmp (complete) becomes `checkpoint`. A complete `checkpoint` it replaces stays, as
    .old, until the renames have reached the disk; an incomplete one (a cut left it so, and .old is
    then the newest complete one) is deleted instead, and .old kept as long."""
    final, tmp, old = checkpoint_folders(out)
    if is_complete(final):
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    else:
        shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    fsync_folder(out)                       # the renames themselves
    shutil.rmtree(old, ignore_errors=True)


def save_final(out, model, tokenizer):
    """The final adapter and tokenizer in the run folder `out`, every file whole: written to out/final.tmp,
    flushed to disk, then each file renamed into `out` (atomic), the adapter's config last (eval.py reads
    it first: an adapter whose config is new has its weights in place). A cut leaves every file whole,
    old or new; final.tmp is written afresh by the next save."""
    tmp = os.path.join(out, "final.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    flush_to_disk(tmp)
    for name in sorted(os.listdir(tmp), key=lambda n: n == "adapter_config.json"):
        os.replace(os.path.join(tmp, name), os.path.join(out, name))
    fsync_folder(out)
    shutil.rmtree(tmp)


def flush_to_disk(folder):
    """fsync every file under `folder` and the folders themselves (where the platform allows: fsync_folder)."""
    for root, dirs, names in os.walk(folder):
        for name in names:
            fsync_file(os.path.join(root, name))
        fsync_folder(root)


def fsync_file(path):
    with open(path, "rb+") as f:            # opened for writing: Windows flushes only such a handle
        os.fsync(f.fileno())


def fsync_folder(folder):
    """fsync a folder's entries (a file created, renamed or removed there), where the platform lets a
    folder be opened: POSIX. On Windows os.open refuses a folder, and NTFS keeps its entries itself."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:                         # some file systems refuse to fsync a folder: nothing to be done
        pass
    finally:
        os.close(fd)


def write_synced(path, data):
    """`path` with `data` (text or bytes), flushed to disk before this returns."""
    with open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())


def write_file(path, data):
    """`path` with `data` (text or bytes), whole or not at all after a crash or power cut: written to a
    temp file beside it, flushed to disk, renamed over it, and the rename flushed too."""
    tmp = path + ".tmp"
    write_synced(tmp, data)
    os.replace(tmp, path)
    fsync_folder(os.path.dirname(path) or ".")


def write_json(path, obj):
    """`obj` as indented JSON in `path`, atomically and durably (write_file): a run's config.json."""
    write_file(path, json.dumps(obj, indent=2))


def keep_rows(out, step):
    """Cut metrics.jsonl, samples.jsonl and tokens.jsonl back to the rows of steps up to `step` (those
    after it are redone), each file replaced whole and durably."""
    for name in ROWS:
        path = os.path.join(out, name)
        if os.path.exists(path):
            write_file(path, b"".join(line for s, line in step_lines(path) if s <= step))


def restore(ckpt, out, optimizer, scaler, state_cls):
    """The loop's State (a `state_cls`) from a checkpoint, with the optimizer, loss scale and RNG;
    metrics and sample rows written after it (a crash) are dropped, to be redone."""
    saved = load_state(os.path.join(ckpt, "state.pt"))
    optimizer.load_state_dict(saved["optimizer"])
    if scaler.is_enabled() and saved["scaler"]:     # a run saved without fp16 (or moved to fp16) starts a fresh scale
        scaler.load_state_dict(saved["scaler"])
    set_rng_state(saved["rng"])
    state = state_cls(**{f.name: saved[f.name] for f in dataclasses.fields(state_cls) if f.name in saved})
    keep_rows(out, state.step)
    print(f"resumed from {ckpt} at step {state.step}", file=sys.stderr)
    return state


def start_over(out):
    """A --resume of a run stopped before its first checkpoint (check_resume, which then returns None):
    its rows dropped, it runs again from step 0, the same run as a fresh start. Said in one line."""
    keep_rows(out, 0)
    print(f"--resume: no checkpoint in {out} (the run stopped before its first one): starting it again from step 0",
          file=sys.stderr)


def load_state(path):
    """state.pt, unpickled with weights_only=True: tensors, numbers, strings and containers only, so
    that a checkpoint from someone else cannot run code. Anything else is one clear UserError."""
    try:
        # map_location: a checkpoint saved on a GPU loads on a CPU too; load_state_dict then moves each
        # optimizer state tensor to its parameter's device (and dtype), wherever that is
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+) was not an allowed global|Unsupported global: GLOBAL (\S+)", str(e))
        if found:
            raise UserError(f"--resume: {path} holds a pickled {found.group(1) or found.group(2)}, not only tensors "
                            "and numbers (not a checkpoint this program wrote); refusing to load it, since "
                            "unpickling it could run code") from None
        raise UserError(f"--resume: {path} is not a readable checkpoint (damaged, or not written by this program)") from None
    except (RuntimeError, EOFError, OSError):
        raise UserError(f"--resume: {path} is not a readable checkpoint (damaged, or not written by this program)") from None


def rng_state():
    """Every generator a run draws from: Python's, NumPy's, torch's and each GPU's, as tensors and numbers."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s):
    """The saved generators back, on whatever machine resumes: the CUDA states of the GPUs it has
    (the first min(saved, visible); none without CUDA), so a run saved on a GPU resumes on a CPU
    and one saved with 2 GPUs visible resumes with 1 (or 1 with 2: the others keep their seeds)."""
    random.setstate(s["python"])
    torch.set_rng_state(s["torch"].cpu())
    if s.get("numpy"):                  # (checkpoints written before NumPy's state was saved have none)
        n = s["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    cuda = s.get("cuda") or []
    if torch.cuda.is_available():
        for i, state in enumerate(cuda[:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state.cpu(), i)
