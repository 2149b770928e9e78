"""The lab with headroom (`--preset carry`): its task is right and has the carry share it should, and the
README's carry commands run (shortened) and log pass@k without changing training."""
import glob
import json
import os
import random
import re
import shlex
import statistics
import subprocess
import sys

import cegppo
import train
from engine import lab

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_carry_task_pieces():
    # Fast: no model. Answers right, splits disjoint, about 7 in 10 questions need a carry.
    train_rows, test_rows = lab.carry_rows("train"), lab.carry_rows("test")
    assert len(test_rows) >= 500 and len(train_rows) >= 4 * len(test_rows)
    assert not {q for q, _ in train_rows} & {q for q, _ in test_rows}
    for q, a in train_rows + test_rows:
        x, y = map(int, re.fullmatch(r"What is (\d\d)\+(\d\d)\?", q).groups())
        assert int(a) == x + y and lab.needs_carry(q) == (x % 10 + y % 10 >= 10)
    held_out = test_rows[:140]                                       # the preset's eval_limit
    assert 0.65 < statistics.mean(lab.needs_carry(q) for q, _ in held_out) < 0.85
    # Warm-start targets, by hand: 47 + 38 worked with the carry, and without it (off by 10)
    rng = random.Random(0)
    assert lab.carry_solution(47, 38, rng, carry=1.0, slip=0.0) == "7+8=15,4+3=7,7+1=8,\\boxed{85}"
    assert lab.carry_solution(47, 38, rng, carry=0.0, slip=0.0) == "7+8=15,4+3=7,\\boxed{75}"
    assert lab.carry_solution(23, 41, rng, carry=0.0, slip=0.0) == "3+1=4,2+4=6,\\boxed{64}"   # no carry needed
    assert lab.carry_solution(87, 58, rng, carry=1.0, slip=0.0) == "7+8=15,8+5=13,13+1=14,\\boxed{145}"
    # every worked target is right where it carries and slips not, and wrong exactly where a carry is skipped
    for q, a in train_rows[:300]:
        x, y = map(int, q[8:-1].split("+"))
        assert cegppo.math_reward(lab.carry_solution(x, y, rng, carry=1.0, slip=0.0), a) == 1.0, q
        assert cegppo.math_reward(lab.carry_solution(x, y, rng, carry=0.0, slip=0.0), a) == float(not lab.needs_carry(q))
    # the warm start writes the carry step in CARRY_RATE of the targets that need one
    rng = random.Random(1)
    steps = [",7+1=8," in lab.carry_solution(47, 38, rng, lab.CARRY_RATE, 0.0) for _ in range(20000)]
    assert abs(statistics.mean(steps) - lab.CARRY_RATE) < 0.005


def readme_carry_commands():
    """The README's commands of the lab with headroom (its <!-- carry --> block), as argument lists."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    code = readme.split("<!-- carry -->")[1].split("<!-- /carry -->")[0].split("```bash\n")[1].split("```")[0]
    return [shlex.split(line, comments=True)[1:] for line in code.splitlines() if line.startswith("python ")]


def test_the_readmes_carry_commands_run_shortened(tmp_path):
    # Each of the README's train.py commands for the carry lab, cut to 3 steps, one seed and 6 held-out questions,
    # on the carry task's own warm start (built once per test session: about 2 minutes at one thread), then its
    # plot.py command on their folders. pass@1, 4 and 16 come at each evaluation, from a random stream of their
    # own: the training steps are those of the same run without them.
    cfg = train.parse_config(["--preset", "carry"])
    assert (cfg.model, cfg.dataset, cfg.eval_samples, cfg.eval_pass_k) == ("carry", "carry", 16, "1,4,16")
    cmds = readme_carry_commands()
    trains, plots = [c[1:] for c in cmds if c[0] == "train.py"], [c[1:] for c in cmds if c[0] == "plot.py"]
    assert len(trains) >= 3 and len(plots) == 1
    short = ["--max_steps", "3", "--eval_steps", "3", "--eval_limit", "6", "--steps_per_generation", "2",
             "--num_iterations", "1", "--seeds", "1", "--jobs", "1"]
    for args in trains:
        out = str(tmp_path / args[args.index("--output_dir") + 1])
        assert train.main([*args, *short, "--output_dir", out]) == 0, args
    assert len(glob.glob(str(tmp_path / "runs/carry/*/seed-1/metrics.jsonl"))) == len(trains)
    first = trains[0]
    with_k = [json.loads(line) for line in open(tmp_path / first[first.index("--output_dir") + 1] / "seed-1" / "metrics.jsonl")]
    assert [sorted(k for k in r if k.startswith("eval/pass@")) for r in with_k] == \
        [["eval/pass@1", "eval/pass@16", "eval/pass@4"], [], ["eval/pass@1", "eval/pass@16", "eval/pass@4"]]
    for r in with_k:
        if "eval/pass@1" in r:
            assert 0 <= r["eval/pass@1"] <= r["eval/pass@4"] <= r["eval/pass@16"] <= 1
    out = str(tmp_path / "without")
    assert train.main([*first, *short, "--eval_samples", "0", "--eval_pass_k", "", "--output_dir", out]) == 0
    without = [json.loads(line) for line in open(os.path.join(out, "seed-1", "metrics.jsonl"))]
    for a, b in zip(with_k, without):          # training untouched by the sampled evaluation
        for key in ("reward", "entropy", "loss", "num_tokens", "eval/accuracy"):
            assert a.get(key) == b.get(key), key
    # the README's figure and table command, on these runs
    args = [a.replace("runs/carry", str(tmp_path / "runs/carry")) for a in plots[0]]
    args[args.index("--output") + 1] = str(tmp_path / "carry.png")
    p = subprocess.run([sys.executable, "plot.py", *[x for a in args for x in (glob.glob(a) if "*" in a else [a])]],
                       cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    assert os.path.isfile(tmp_path / "carry.png") and "pass@16, end" in p.stdout and "Differences from" in p.stdout
