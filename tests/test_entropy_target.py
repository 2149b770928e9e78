"""--entropy_target end to end on the tiny model: the betas in force logged and shown, restored exactly on a
--resume after kill -9, drawn and tabled by plot.py; the flags refused where they make no sense.
(The rule itself on hand-made entropy sequences: tests/test_loss.py.)"""
import json
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the tiny model's entropy is about 0.25 nats per token: a target of 5 is far above it, so the rule moves the
# betas at its full rate (0.05 a step): beta1 down from 0.5, beta2 held at its bound 1
ARGS = ["train.py", "--preset", "tiny", "--max_steps", "6", "--entropy_target", "5.0"]


def script(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=os.environ.copy())


def rows(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("target") / "whole")
    p = script(*ARGS, "--output_dir", out)
    assert p.returncode == 0, p.stderr[-3000:]
    return out, p.stdout


def test_the_betas_in_force_are_logged_and_shown(whole):
    out, stdout = whole
    rs = rows(out)
    # the row of step s holds the betas its updates used: step 1 the flags' (0.5, 1), then each step 0.05 less
    # beta1, as long as the smoothed entropy stays more than 5% off the target (it stays about 20 times below)
    assert [r["cegppo/beta1"] for r in rs] == pytest.approx([0.5, 0.45, 0.4, 0.35, 0.3, 0.25])
    assert [r["cegppo/beta2"] for r in rs] == [1.0] * 6
    assert all(r["entropy"] < 1.0 for r in rs)
    lines = [line for line in stdout.splitlines() if "step    " in line]
    assert "| b1 0.50 b2 1.00" in lines[0] and "| b1 0.25 b2 1.00" in lines[-1]


def test_a_run_killed_with_kill_9_resumes_with_the_same_betas(whole, tmp_path):
    base, _ = whole
    out = str(tmp_path / "killed")
    proc = subprocess.Popen([sys.executable, *ARGS, "--output_dir", out], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    path, t = os.path.join(out, "metrics.jsonl"), time.time()
    while not (os.path.exists(path) and len(open(path).read().splitlines()) >= 3):   # a checkpoint at step 2
        assert proc.poll() is None and time.time() - t < 240, proc.stderr.read()[-2000:]
        time.sleep(0.02)
    proc.kill()                                                     # SIGKILL: nothing is saved on the way out
    proc.wait()
    p = script(*ARGS, "--output_dir", out, "--resume")
    assert p.returncode == 0, p.stderr[-3000:]
    for a, b in zip(rows(base), rows(out), strict=True):
        assert (a["step"], a["cegppo/beta1"], a["cegppo/beta2"]) == (b["step"], b["cegppo/beta1"], b["cegppo/beta2"])
        for k in ("reward", "entropy", "loss", "clip_ratio/low_mean"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), (a["step"], k)


def test_plot_draws_the_betas_and_tables_the_distance_from_the_target(whole, tmp_path):
    out, _ = whole
    png = str(tmp_path / "c.png")
    p = script("plot.py", out, "--output", png, "--table")
    assert p.returncode == 0, p.stderr[-2000:]
    import matplotlib.image
    height, width = matplotlib.image.imread(png).shape[:2]
    assert width > height * 2.2                                     # 2 rows of 6 panels (the ten and two betas)
    header, _, row = p.stdout.strip().splitlines()[-3:]
    assert "entropy off target, 2nd half" in header and "entropy_target=5" in row
    # the distance by hand: the mean |log(H / 5)| over steps 4-6
    import math
    want = sum(abs(math.log(r["entropy"] / 5.0)) for r in rows(out)[3:]) / 3
    cells = dict(zip([c.strip() for c in header.split("|")], [c.strip() for c in row.split("|")]))
    assert float(cells["entropy off target, 2nd half"].split(" ± ")[0]) == pytest.approx(want, abs=1e-3)
    p = script("plot.py", out, "--output", png, "--table", "--entropy_target", "0")
    assert p.returncode == 2 and p.stderr.strip() == "error: --entropy_target 0: must be > 0 (nats per token)"


@pytest.mark.parametrize("flags,line", [
    (["--entropy_target", "0"], "error: --entropy_target 0.0: must be > 0 (nats per token)"),
    (["--entropy_target", "-0.1"], "error: --entropy_target -0.1: must be > 0 (nats per token)"),
    (["--algo", "cispo", "--entropy_target", "0.1"], "error: --entropy_target 0.1: --algo cispo has no betas to move"),
])
def test_a_target_that_makes_no_sense_is_refused_in_one_line(flags, line, tmp_path):
    out = str(tmp_path / "refused")
    p = script("train.py", "--preset", "tiny", *flags, "--output_dir", out)
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1] == line and "Traceback" not in p.stderr
    assert not os.path.exists(out)                                  # nothing written
