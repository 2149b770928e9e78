"""The entropy microscope (microscope.py): CE-GPPO's beta1 / beta2 on a tabular softmax policy.

A reduced grid (3 seeds, 30 steps) runs in-process in a few seconds; the assertions are the
directions that held for every set of seeds we tried, not exact numbers, and nothing is timed.
"""
import json
import os
import subprocess
import sys

import pytest

import microscope

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTS = dict(prompts=32, answers=32, correct=4, init="confident", favourite=4.0, group_size=16,
            steps=30, updates=8, optimizer="sgd", lr=0.3, momentum=0.0)


@pytest.fixture(scope="module")
def grid():
    settings = microscope.parse_grid("grpo,0:0,1:0,0:1,1:1")
    return microscope.run_grid(settings, [0, 1, 2], **OPTS)


def final(results, name, metric="entropy"):
    runs = results["curves"][name][metric]
    return sum(run[-1] for run in runs) / len(runs)


def test_larger_beta1_lowers_final_entropy_under_sgd(grid):
    # The NA&LP gradient that beta1 restores pushes rare wrong answers further down: sharper policy.
    for b2 in (0, 1):
        low_b1, high_b1 = final(grid, f"b1=0 b2={b2}"), final(grid, f"b1=1 b2={b2}")
        assert high_b1 < 0.8 * low_b1, (b2, low_b1, high_b1)


def test_both_clip_regions_are_visited(grid):
    # Several updates per batch move the ratios off 1, so both regions hold some answers.
    for name, c in grid["curves"].items():
        for key in ("clip_low", "clip_high"):
            mean = sum(sum(run) / len(run) for run in c[key]) / len(c[key])
            assert 0.002 < mean < 0.5, (name, key, mean)


def test_zero_betas_are_grpo_exactly(grid):
    assert grid["curves"]["b1=0 b2=0"] == grid["curves"]["grpo"]
    assert grid["curves"]["b1=1 b2=1"] != grid["curves"]["grpo"]


def test_a_seed_does_not_depend_on_its_neighbours():
    settings = microscope.parse_grid("0.5:1")
    opts = dict(OPTS, steps=5)
    alone = microscope.run_grid(settings, [1], **opts)["curves"]["b1=0.5 b2=1"]
    beside = microscope.run_grid(settings, [0, 1], **opts)["curves"]["b1=0.5 b2=1"]
    assert {k: v[0] for k, v in alone.items()} == {k: v[1] for k, v in beside.items()}


def run_cli(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    return subprocess.run([sys.executable, os.path.join(ROOT, "microscope.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_writes_curves_and_figure(tmp_path):
    out = tmp_path / "ms"
    p = run_cli("--seeds", "2", "--steps", "3", "--prompts", "4", "--answers", "8", "--correct", "2",
                "--group-size", "4", "--updates", "2", "--grid", "grpo,1:1", "--output_dir", str(out))
    assert p.returncode == 0, p.stderr
    assert "grpo" in p.stdout and "b1=1 b2=1" in p.stdout
    data = json.loads((out / "microscope.json").read_text())
    c = data["curves"]["b1=1 b2=1"]
    assert len(c["entropy"]) == 2 and len(c["entropy"][0]) == 4          # seeds x (steps + 1)
    for key in ("reward", "clip_low", "clip_high", "pa_lp_drive", "na_lp_drive", "pa_hp_drive", "na_hp_drive"):
        assert len(c[key]) == 2, key
    assert [r["setting"] for r in data["summary"]] == ["grpo", "b1=1 b2=1"]
    assert (out / "microscope.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args, flag", [(["--lr", "-1"], "--lr"), (["--correct", "32"], "--correct"),
                                        (["--grid", "grpo,x"], "--grid"), (["--seeds", "0"], "--seeds"),
                                        (["--optimizer", "rmsprop"], "--optimizer")])
def test_bad_flag_is_one_error_line(args, flag, capsys):
    with pytest.raises(SystemExit) as e:
        microscope.main(args)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2
    assert err.startswith("error: ") and flag in err and "\n" not in err, err


def test_bad_flag_exit_code_from_the_shell():
    p = run_cli("--answers", "1")
    assert p.returncode == 2
    assert p.stderr.strip().startswith("error: --answers 1") and "\n" not in p.stderr.strip(), p.stderr
