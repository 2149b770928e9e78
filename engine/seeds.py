"""--seeds and --jobs: the seeds of one command, one after another or at once in processes of their own.

    run_seeds            train.py's main for --seeds: each seed in output_dir/seed-<n>
    run_seed_processes   --jobs: at most N seeds at once, each in a process of its own, one progress line each
"""

import dataclasses
import os
import signal
import subprocess
import sys
import time

from tqdm import tqdm

from engine import models
from engine.errors import UserError
from engine.cli import seed_list
from engine.rows import complete_rows
from engine.runfiles import find_checkpoint
from engine.runlog import NO_SIGNAL_EXIT, PARENT_PID


def run_seeds(cfg, train, script):
    """Train once per seed of --seeds, each in output_dir/seed-<n>: one after another (`train(cfg)`; a seed that
    stopped for lack of signal is a result, and the next seeds still run), or with --jobs N, N at a time, each
    `script` (train.py) in a process of its own with its share of the CPU threads."""
    runs = seed_configs(cfg)
    if cfg.jobs > 1 and len(runs) > 1:
        threads = max(1, models.thread_count(cfg.threads) // min(cfg.jobs, len(runs)))
        rc = run_seed_processes([(c.seed, [sys.executable, os.path.abspath(script), *config_flags(c, threads)],
                                  c.output_dir) for c in runs], cfg.jobs, cfg.max_steps)
    else:
        for c in runs:
            rc = train(c)
            if rc and rc not in NO_SIGNAL_EXIT:
                return rc
        rc = 0
    if rc == 0:
        print(f"compare the seeds with: python plot.py {cfg.output_dir}/seed-* --output seeds.png --table",
              file=sys.stderr)
    return rc


def seed_configs(cfg):
    """One Config per seed of --seeds, each in output_dir/seed-<n>; with --resume, the seeds that had
    not started yet start now. Refuses, before anything runs, a seed folder that holds a run already."""
    runs = []
    for seed in seed_list(cfg.seeds):
        out = os.path.join(cfg.output_dir, f"seed-{seed}")
        started = find_checkpoint(out) or os.path.exists(os.path.join(out, "metrics.jsonl"))
        if started and not cfg.resume:
            raise UserError(f"--output_dir {out}: holds a run already; pass --resume to continue it or pick a new folder")
        runs.append(dataclasses.replace(cfg, seed=seed, seeds=None, jobs=1, output_dir=out,
                                        resume=bool(cfg.resume and started)))
    return runs


def config_flags(cfg, threads):
    """The command-line flags that give back exactly `cfg` (every field, unset ones left out), on
    `threads` CPU threads: how --jobs starts a seed's process."""
    flags = []
    for f in dataclasses.fields(cfg):
        value = threads if f.name == "threads" else getattr(cfg, f.name)
        if value is not None:
            flags += [f"--{f.name}", str(value).lower() if isinstance(value, bool) else str(value)]
    return flags


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
