"""The CPU lab learns: a shortened run of `train.py --preset lab` raises the reward from a fixed seed."""
import json
import statistics

import lab
import train


def test_shortened_lab_learns(tmp_path, monkeypatch):
    # The lab with a shorter warm start (its cache key includes these settings) and 40 RL steps:
    # about two minutes on two CPU cores. A learning test, not a timed one.
    monkeypatch.setitem(lab.WARM, "lab", dict(lab.WARM["lab"], steps=500))
    out = str(tmp_path / "lab")
    assert train.main(["--preset", "lab", "--max_steps", "40", "--eval_steps", "40", "--output_dir", out]) == 0
    rows = [json.loads(line) for line in open(f"{out}/metrics.jsonl")]
    first = statistics.mean(r["reward"] for r in rows[:10])
    last = statistics.mean(r["reward"] for r in rows[-10:])
    assert 0.05 < first < 0.8                      # the warm start sometimes succeeds, sometimes not
    assert last - first >= 0.1, (first, last)
    assert all(r["updates"] > 1 for r in rows if r["frac_reward_zero_std"] < 0.5)   # several updates per rollout
