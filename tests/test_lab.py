"""The CPU lab: its task is right and big enough, and a shortened `train.py --preset lab` learns."""
import json
import random
import re
import statistics

import cegppo
import train
from engine import lab


def test_lab_task_pieces():
    # Fast: no model. Answers are right, splits disjoint, one held-out question worth at most 0.01.
    train_rows, test_rows = lab.toy_rows("train"), lab.toy_rows("test")
    assert len(test_rows) >= 100 and len(train_rows) >= 4 * len(test_rows)
    assert not {q for q, _ in train_rows} & {q for q, _ in test_rows}
    for q, a in train_rows + test_rows:
        x, y, z = map(int, re.fullmatch(r"What is (\d)\+(\d)\+(\d)\?", q).groups())
        assert int(a) == x + y + z
    # Warm-start targets: with no slips and no guesses every worked answer is right, in all 4 ways;
    # guesses are always wrong.
    rng, ways = random.Random(0), set()
    for q, a in train_rows[:50]:
        expr = q[len("What is "):-1]
        for _ in range(8):
            worked = lab.sum_solution(expr, rng, guess_frac=0.0, slip=0.0)
            assert cegppo.math_reward(worked, a) == 1.0, (q, worked)
            first, second = worked.split(",")
            ways.add((first.startswith(expr[:3]), second.startswith(first.split("=")[1] + "+")))
        assert cegppo.math_reward(lab.sum_solution(expr, rng, guess_frac=1.0, slip=0.0), a) == 0.0
    assert len(ways) == 4
    # The tiny task the fast tests use is unchanged: 64 / 16 rows of one-step digit arithmetic.
    assert len(lab.toy_rows("train", tiny=True)) == 64 and len(lab.toy_rows("test", tiny=True)) == 16


def test_shortened_lab_learns(tmp_path):
    # The lab preset's faster-stepping command (README: lr 2e-4, where clipping is easy to see; its
    # full warm start, built once per test session), cut to 30 RL steps: about two and a half minutes
    # on two CPU cores. A learning test, not a timed one.
    out = str(tmp_path / "lab")
    assert train.main(["--preset", "lab", "--learning_rate", "2e-4", "--max_steps", "30", "--eval_steps", "30",
                       "--eval_limit", "20", "--output_dir", out]) == 0
    rows = [json.loads(line) for line in open(f"{out}/metrics.jsonl")]
    first = statistics.mean(r["reward"] for r in rows[:10])
    last = statistics.mean(r["reward"] for r in rows[-10:])
    assert 0.05 < first < 0.8                      # the warm start sometimes succeeds, sometimes not
    assert last - first >= 0.1, (first, last)
    assert all(r["updates"] > 1 for r in rows if r["frac_reward_zero_std"] < 0.5)   # several updates per rollout
    # tokens leave the clip range: the restored gradients have something to act on
    assert statistics.mean(r["clip_ratio/region_mean"] for r in rows) > 0.01
