"""train.py --seeds with --jobs: the seeds of one command in processes of their own give each seed the
numbers it gets one after another; a killed sweep resumes; a failing seed is reported; and the lab's
step-size map is drawn from such run folders (plot.py --map)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import plot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model", "tiny", "--dataset", "tiny", "--max_steps", "4"]
NOT_NUMBERS = ("time/", "peak_mem")        # wall time and memory differ between any two runs


def train(*args, check=True):
    p = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True)
    if check and p.returncode != 0:
        raise AssertionError(f"{args} exited {p.returncode}:\n{p.stderr[-3000:]}")
    return p


def numbers(run):
    """Every metric of every step, wall time and memory left out."""
    return [{k: v for k, v in json.loads(line).items() if not k.startswith(NOT_NUMBERS)}
            for line in open(os.path.join(run, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def one_after_another(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("jobs") / "jobs1")
    train(*TINY, "--seeds", "1,2,3", "--output_dir", out)
    return out


@pytest.fixture(scope="module")
def two_at_a_time(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("jobs") / "jobs2")
    return out, train(*TINY, "--seeds", "1,2,3", "--jobs", "2", "--output_dir", out)


def test_jobs_give_each_seed_exactly_its_numbers(one_after_another, two_at_a_time):
    out, p = two_at_a_time
    for seed in (1, 2, 3):
        a, b = os.path.join(one_after_another, f"seed-{seed}"), os.path.join(out, f"seed-{seed}")
        assert numbers(b) == numbers(a), seed               # the same floats, not merely close ones
        assert len(numbers(b)) == 4
        # each seed's own output went to its log, not to the terminal: the step lines are there
        log = open(os.path.join(b, "train.log")).read()
        assert "step    4 |" in log and f"--seed {seed}" in log and "--threads 1" in log
    # the terminal shows one plain line per seed and update (not a terminal: no bars, no \r), each
    # seed's last one says it is done
    lines = p.stderr.splitlines()
    assert "\r" not in p.stderr
    for seed in (1, 2, 3):
        mine = [line for line in lines if line.startswith(f"seed {seed}: ")]
        assert mine and mine[-1].startswith(f"seed {seed}: step 4/4") and mine[-1].endswith("| done")
    assert "step    1 |" not in p.stderr                    # no seed's own step lines interleaved here
    assert lines[0] == "3 seeds, 2 at a time; each seed's output in its folder's train.log"
    assert any("| sweep: " in line and " left" in line for line in lines)   # what the whole sweep has left


def test_a_killed_sweep_resumes_to_the_same_numbers(one_after_another, tmp_path):
    out = str(tmp_path / "killed")
    args = [sys.executable, "train.py", *TINY, "--seeds", "1,2,3", "--jobs", "2", "--output_dir", out]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = os.path.join(out, "seed-1", "metrics.jsonl")
    t = time.time()
    while not (os.path.exists(first) and len(open(first).read().splitlines()) >= 2):
        assert proc.poll() is None and time.time() - t < 240
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)                        # the parent dies at once, saving nothing
    proc.wait()
    # its seeds notice, finish their step, save and stop: nothing runs on unseen
    logs = [os.path.join(out, f"seed-{s}", "train.log") for s in (1, 2)]
    t = time.time()
    while not all("continue with --resume" in open(log).read() for log in logs):
        assert time.time() - t < 120, [open(log).read()[-500:] for log in logs]
        time.sleep(0.2)
    assert not os.path.exists(os.path.join(out, "seed-3"))  # never started
    time.sleep(1.0)                                         # the processes exit after their last line
    p = train(*TINY, "--seeds", "1,2,3", "--jobs", "2", "--output_dir", out, "--resume")
    assert "resumed from" in open(os.path.join(out, "seed-1", "train.log")).read()
    for seed in (1, 2, 3):
        assert numbers(os.path.join(out, f"seed-{seed}")) == numbers(os.path.join(one_after_another, f"seed-{seed}"))
    assert "compare the seeds with" in p.stderr


def test_a_failing_seed_is_one_error_line_and_a_nonzero_exit(tmp_path):
    out = str(tmp_path / "failing")
    train("--model", "tiny", "--dataset", "tiny", "--max_steps", "2", "--seeds", "1,2", "--jobs", "2",
          "--output_dir", out)
    with open(os.path.join(out, "seed-2", "checkpoint", "state.pt"), "wb") as f:
        f.write(b"not a checkpoint")                       # seed 2 cannot resume; seed 1 can
    p = train("--model", "tiny", "--dataset", "tiny", "--max_steps", "3", "--seeds", "1,2", "--jobs", "2",
              "--output_dir", out, "--resume", check=False)
    assert p.returncode == 1
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: seed 2 failed (exit code ")
    assert f"{out}/seed-2/train.log" in errors[0]
    assert len(numbers(os.path.join(out, "seed-1"))) == 3   # the other seed finished
    # a seed folder that holds a run already is refused before anything starts, as without --jobs
    p = train("--model", "tiny", "--dataset", "tiny", "--seeds", "1,3", "--jobs", "2", "--output_dir", out, check=False)
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].startswith(f"error: --output_dir {out}/seed-1: holds")
    assert not os.path.exists(os.path.join(out, "seed-3"))


def test_step_size_map_from_run_folders(one_after_another, two_at_a_time, tmp_path):
    # CE-GPPO at the tiny preset's lr (5e-3, seeds 1 and 2 of the runs above) and at 1e-2, GRPO at both
    runs = {("cegppo", 5e-3): os.path.join(two_at_a_time[0], "seed-{}")}
    for algo, lr in (("grpo", 5e-3), ("grpo", 1e-2), ("cegppo", 1e-2)):
        out = str(tmp_path / f"{algo}-{lr:g}")
        train(*TINY, "--algo", algo, "--learning_rate", str(lr), "--seeds", "1,2", "--jobs", "2", "--output_dir", out)
        runs[(algo, lr)] = os.path.join(out, "seed-{}")
    dirs = [runs[k].format(s) for k in runs for s in (1, 2)]
    png = str(tmp_path / "map.png")
    p = subprocess.run([sys.executable, "plot.py", *dirs, "--map", png, "--baseline", "algo=grpo"], cwd=ROOT,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert os.path.getsize(png) > 10_000
    table = [line for line in p.stdout.splitlines() if line.startswith("| algo=")]
    assert len(table) == 4                                   # two settings at two learning rates
    for (algo, lr) in runs:
        row = next(line for line in table if line.startswith(f"| algo={algo}") and f"| {lr:g} |" in line)
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[2:5] == ["4", "2", "0 of 2"]
        if algo == "grpo":
            assert cells[-1] == "(baseline)"
            continue
        # the difference columns are the per-seed differences of the two settings' held-out accuracy, by hand
        diffs = {}
        for key in ("heldout_end", "heldout_auc"):
            mine = [plot.run_summary(runs[(algo, lr)].format(s))[key] for s in (1, 2)]
            base = [plot.run_summary(runs[("grpo", lr)].format(s))[key] for s in (1, 2)]
            diffs[key] = plot.mean_se([a - b for a, b in zip(mine, base)])
        m, se = diffs["heldout_end"]
        assert cells[12] == f"{m:+.3f} ± {se:.3f}" + (" *" if abs(m) > 2 * se else "")
        # the verdict: held-out at the end or its area beyond two standard errors, by sign
        signs = {d > 0 for d, e in diffs.values() if abs(d) > 2 * e}
        assert cells[-1] == ("mixed" if len(signs) == 2 else "ahead" if True in signs
                             else "behind" if False in signs else "level")
    # the verdict's rule on hand-made differences (mean, standard error)
    assert plot.verdict_of([(0.01, 0.02), (-0.001, 0.004)]) == "level"
    assert plot.verdict_of([(-0.066, 0.036), (-0.058, 0.013)]) == "behind"     # the AUC alone is beyond
    assert plot.verdict_of([(0.05, 0.01), (0.001, 0.01)]) == "ahead"
    assert plot.verdict_of([(0.05, 0.01), (-0.05, 0.01)]) == "mixed"
    assert plot.verdict_of([(0.05, float("nan"))]) == "level"                  # one seed: never beyond
    p = subprocess.run([sys.executable, "plot.py", *dirs, "--map", png, "--baseline", "algo=nope"], cwd=ROOT,
                       capture_output=True, text=True)
    assert p.returncode == 2 and "no setting's label starts with it" in p.stderr
