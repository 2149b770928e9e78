"""The bookkeeping around train.py's loop: checkpoints and resume, RNG states, step timing, peak
memory, Ctrl-C and wandb. Nothing here changes what the loop computes; it lives apart so that
train.py reads as the algorithm's steps.

    check_resume, find_checkpoint, save_checkpoint, restore, start_over   atomic checkpoints, exact resume
    save_final                    the final adapter, each file whole
    write_json, keep_rows         files replaced whole and durably (a crash or power cut leaves old or new)
    rng_state, set_rng_state      every generator, restorable on another device count or a CPU
    timed, sync                   wall time of a phase (on a GPU once its queued work has run)
    GenerationProgress            a progress bar inside a long generate() call
    reset_peak_mem, peak_mem_gb, peak_mem_reserved_gb   this step's peak memory
    catch_ctrl_c, start_wandb     Ctrl-C finishes the step and saves; optional Weights & Biases
    run_seed_processes            --jobs: the seeds of one command in processes of their own
"""

import dataclasses
import json
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import torch
from tqdm import tqdm
from transformers import LogitsProcessor

from loading import UserError
from plot import complete_rows


# ----------------------------------------------------------------------------------------------
# Checkpoints: written to a temp folder, flushed to disk, marked complete and renamed; a resume
# continues exactly. A crash or power cut at any point leaves the newest complete checkpoint in place.
# ----------------------------------------------------------------------------------------------
ROWS = ("metrics.jsonl", "samples.jsonl", "tokens.jsonl")     # a run's logs, one row per line, each with its step


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


def step_lines(path):
    """[(step, line)] of a run's .jsonl, each line as written; no file, no rows. A line cut off by a
    crash or power cut (a partial last line, or the NUL bytes some file systems leave where an append
    had reached the file's size and not its data) is left out: only lines written after the last
    save's flush can be, and those are after its step, to be redone."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path, "rb") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:              # JSONDecodeError, or bytes that are not UTF-8
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                rows.append((row["step"], line if line.endswith(b"\n") else line + b"\n"))
    return rows


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
# Progress inside a long generate() call
# ----------------------------------------------------------------------------------------------
PROGRESS = ("auto", "on", "off")          # train.py's and eval.py's --progress


def progress_shown(mode):
    """Is a progress bar of --progress `mode` shown: on, or auto on a terminal (not in tests or logs)."""
    return mode == "on" or (mode == "auto" and sys.stderr.isatty())


class GenerationProgress(LogitsProcessor):
    """A progress bar that generate() ticks once per decoded token: sequences finished (the bar) and
    tokens generated. For cegppo.rollout's `processors`; it leaves the logits as they are.

    mode "auto": shown on a terminal once a rollout has run `delay_s` seconds (short ones, tests and
    logs stay quiet); "on": always (to `file`); "off": never. One object serves a whole rollout,
    whatever its generation sub-batches: a call whose input is not longer than the last one's is
    the first decode step of the next sub-batch."""

    def __init__(self, desc, sequences, eos_token_ids, mode="auto", delay_s=2.0, file=None):
        self.shown = progress_shown(mode)
        self.bar = tqdm(total=sequences, desc=desc, unit="seq", delay=0 if mode == "on" else delay_s,
                        disable=not self.shown, leave=False, dynamic_ncols=True, file=file or sys.stderr)
        self.eos = torch.tensor(list(eos_token_ids))
        self.tokens, self.done_before, self.last_len, self.sub_batch_tokens = 0, 0, 0, 0
        self.ended = None                                    # [b] bool: the sub-batch's rows that wrote an EOS

    def __call__(self, input_ids, scores):
        if self.ended is None or input_ids.shape[1] <= self.last_len:      # a sub-batch's first decode step
            self.done_before += 0 if self.ended is None else int(self.ended.sum())
            self.eos = self.eos.to(input_ids.device)
            self.ended = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
            self.sub_batch_tokens = 0
        else:                                                # the last column: the token decoded before
            self.ended |= torch.isin(input_ids[:, -1], self.eos)
        self.last_len = input_ids.shape[1]
        finished = int(self.ended.sum())
        self.tokens += input_ids.shape[0] - finished         # a token is decoded now for every live row
        self.sub_batch_tokens += input_ids.shape[0] - finished
        self.bar.update(self.done_before + finished - self.bar.n)
        self.bar.set_postfix_str(f"{self.tokens} tokens", refresh=False)
        return scores

    def retry(self):
        """The sub-batch in progress failed (out of memory) and starts again: what it had counted is dropped."""
        if self.ended is not None:
            self.tokens -= self.sub_batch_tokens
            self.ended = None
        self.sub_batch_tokens = 0

    def processors(self):
        """What to hand cegppo.rollout: this bar, or nothing where it would not show (no cost per token)."""
        return [self] if self.shown else []

    def close(self):
        self.bar.close()


# ----------------------------------------------------------------------------------------------
# Ctrl-C and wandb
# ----------------------------------------------------------------------------------------------
def catch_ctrl_c():
    """Ctrl-C finishes the step in progress (a half-updated step cannot be checkpointed), then saves.
    A seed's process started by --jobs does the same when the process that started it is gone."""
    stop = {"asked": False}

    def on_sigint(signum, frame):
        if stop["asked"]:
            raise KeyboardInterrupt
        stop["asked"] = True
        tqdm.write("Ctrl-C: finishing this step, then saving a checkpoint (Ctrl-C again to abort)")
    signal.signal(signal.SIGINT, on_sigint)
    if hasattr(signal, "SIGBREAK"):         # Windows: how run_seed_processes passes a Ctrl-C on
        signal.signal(signal.SIGBREAK, on_sigint)
    parent = os.environ.pop(PARENT_PID, None)
    if parent:
        threading.Thread(target=_watch_parent, args=(int(parent), stop), daemon=True).start()
    return stop


PARENT_PID = "CEGPPO_JOBS_PARENT"        # set by run_seed_processes for the processes it starts
# train.py's exit codes for a run stopped by --collapse_patience whose groups were all wrong (collapsed)
# or each all right or all wrong (split): results, not failures (--seeds runs the next seed)
COLLAPSED, SPLIT = 3, 4
NO_SIGNAL_EXIT = (COLLAPSED, SPLIT)


def _watch_parent(pid, stop, every_s=1.0):
    """Ask the loop to stop (finish the step, save) once the --jobs process that started this one has
    died (killed, say): a seed must not run on unseen and then collide with a --resume. The parent's
    death shows as a new parent id (POSIX: the orphan is adopted; not on Windows, where it runs on)."""
    while os.getppid() == pid:
        time.sleep(every_s)
    stop["asked"] = True


# ----------------------------------------------------------------------------------------------
# --jobs: the seeds of one command at once, in processes of their own
# ----------------------------------------------------------------------------------------------
def run_seed_processes(runs, jobs, max_steps, poll_s=1.0):
    """Run [(seed, argv, output_dir)] as processes, at most `jobs` at a time, each writing everything it
    prints to output_dir/train.log; show one progress line per seed. Returns 0, or 130 after Ctrl-C
    (every seed finishes its step and saves: --resume continues them), or 1 after one error line per
    seed that failed (a seed stopped for lack of signal, exit code 3 or 4, is a result, not a failure).

    Each process runs in a session of its own, so that a Ctrl-C reaches it once, from here, and not
    also from the terminal (a second Ctrl-C aborts a run without saving)."""
    pending, running, codes = list(runs), {}, {}
    progress = SeedProgress([(seed, out) for seed, _, out in runs], max_steps)
    progress.say(f"{len(runs)} seeds, {min(jobs, len(runs))} at a time; each seed's output in its folder's train.log")
    detach = {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP} if os.name == "nt" else {"start_new_session": True}
    try:
        while pending or running:
            while pending and len(running) < jobs:
                seed, argv, out = pending.pop(0)
                os.makedirs(out, exist_ok=True)
                log = open(os.path.join(out, "train.log"), "a")
                log.write(" ".join(argv) + "\n")
                log.flush()
                proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        env={**os.environ, PARENT_PID: str(os.getpid())}, **detach)
                running[seed] = (proc, log, out)
            for seed, (proc, log, out) in list(running.items()):
                progress.show(seed, out)
                if proc.poll() is not None:
                    log.close()
                    codes[seed] = proc.returncode
                    progress.show(seed, out, done=proc.returncode)
                    del running[seed]
            time.sleep(poll_s if running else 0)
    except KeyboardInterrupt:
        progress.say("Ctrl-C: every running seed finishes its step and saves a checkpoint")
        for proc, _, _ in running.values():
            proc.send_signal(signal.CTRL_BREAK_EVENT if os.name == "nt" else signal.SIGINT)
        for seed, (proc, log, out) in running.items():
            codes[seed] = proc.wait()
            log.close()
        progress.close()
        # a seed stopped in its step says 130; one still in its setup dies of the signal: both resume
        left = [str(seed) for seed, _, _ in pending] + [str(s) for s, c in codes.items() if c not in (0, *NO_SIGNAL_EXIT)]
        print(f"stopped; seeds {', '.join(left)} not finished: continue them with --resume", file=sys.stderr)
        return 130
    progress.close()
    failed = {seed: code for seed, code in codes.items() if code not in (0, *NO_SIGNAL_EXIT)}
    for seed, code in failed.items():
        out = next(o for s, _, o in runs if s == seed)
        print(f"error: seed {seed} failed (exit code {code}): {_last_line(os.path.join(out, 'train.log'))} "
              f"(all of it in {out}/train.log)", file=sys.stderr)
    return 1 if failed else 0


def _last_line(path):
    """The last non-empty line a seed's process wrote (its error line, when it failed)."""
    with open(path, errors="replace") as f:
        lines = [line.strip() for line in f.read().replace("\r", "\n").splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


class SeedProgress:
    """One line per seed: its step, last reward and held-out accuracy, and how long the whole sweep
    has left at the pace so far. On a terminal, a bar per seed redrawn in place; elsewhere (a log
    file, CI) a plain line per seed every tenth of the run."""

    def __init__(self, runs, max_steps):
        self.max_steps, self.tty, self.start = max_steps, sys.stderr.isatty(), time.time()
        self.bars = {s: tqdm(total=max_steps, desc=f"seed {s}", position=i, dynamic_ncols=True)
                     for i, (s, _) in enumerate(runs)} if self.tty else {}
        self.said, self.sizes = {s: -1 for s, _ in runs}, {}
        # where each seed stands (a resumed one partway), for the pace and what is left
        self.step = {s: len(complete_rows(os.path.join(out, "metrics.jsonl"))) for s, out in runs}
        self.begun = dict(self.step)

    def left(self):
        """' | sweep: about N min left' from the steps all seeds have made since the start (their pace
        together, so N jobs at once count N times), or '' until there are a few to go by."""
        done = sum(self.step[s] - self.begun[s] for s in self.step)
        if done < 3:
            return ""
        minutes = sum(self.max_steps - n for n in self.step.values()) / (done / (time.time() - self.start)) / 60
        return f" | sweep: about {minutes:.0f} min left" if minutes >= 1 else " | sweep: under a minute left"

    def show(self, seed, out, done=None):
        path = os.path.join(out, "metrics.jsonl")
        size = os.path.getsize(path) if os.path.exists(path) else 0
        if done is None and self.sizes.get(seed) == size:
            return                                  # nothing new since the last look
        self.sizes[seed] = size
        rows = complete_rows(path)
        step = self.step[seed] = rows[-1]["step"] if rows else 0
        evals = [r["eval/accuracy"] for r in rows if "eval/accuracy" in r]
        text = (f"reward {rows[-1]['reward']:.3f}" if rows else "starting") + \
            (f" | eval {evals[-1]:.3f}" if evals else "") + \
            (self.left() if done is None else " | done" if done == 0 else f" | exit code {done}")
        if self.tty:
            bar = self.bars[seed]
            bar.update(step - bar.n)
            bar.set_postfix_str(text)
        elif done is not None or step // max(1, self.max_steps // 10) > self.said[seed]:
            self.said[seed] = step // max(1, self.max_steps // 10)
            print(f"seed {seed}: step {step}/{self.max_steps} | {text}", file=sys.stderr, flush=True)

    def say(self, text):
        (tqdm.write if self.tty else print)(text, file=sys.stderr)

    def close(self):
        for bar in self.bars.values():
            bar.close()


def start_wandb(cfg):
    if not cfg.wandb:
        return None
    try:
        import wandb            # optional: only for --wandb
    except ImportError:
        raise UserError("--wandb: wandb is not installed (pip install wandb)") from None
    return wandb.init(project="cegppo", name=os.path.basename(cfg.output_dir), config=dataclasses.asdict(cfg))
