"""pass@k: the unbiased estimator by hand, and eval.py's numbers from its own completions on the tiny model."""
import json
import math
import os
import subprocess
import sys

import pytest

import eval as eval_script
from engine import cli
from engine.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_pass_at_k_by_hand():
    p = eval_script.pass_at_k
    assert p(16, 0, 1) == 0.0 and p(16, 0, 16) == 0.0              # never right: 0 at any k
    assert p(16, 16, 1) == 1.0 and p(16, 16, 16) == 1.0            # always right: 1 at any k
    for c in range(9):                                            # k = 1 is avg@1: c / n
        assert p(8, c, 1) == pytest.approx(c / 8)
    assert p(8, 1, 8) == 1.0 and p(8, 0, 8) == 0.0                 # k = n: right at least once or not
    # n = 4, c = 1, k = 2: 1 - C(3, 2) / C(4, 2) = 1 - 3/6 = 0.5; n = 5, c = 2, k = 3: 1 - C(3, 3) / C(5, 3) = 0.9
    assert p(4, 1, 2) == pytest.approx(0.5) and p(5, 2, 3) == pytest.approx(0.9)
    # fewer wrong than k: some right one is always drawn
    assert p(10, 8, 3) == 1.0
    # against the definition: the share of k-subsets of the n samples with a right one, enumerated
    import itertools
    samples = [1, 0, 0, 1, 0, 0]
    subsets = list(itertools.combinations(samples, 3))
    assert p(6, 2, 3) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))


def test_pass_k_flags():
    assert cli.pass_k_list(None, 16, "--pass_k") == [1, 2, 4, 8, 16]
    assert cli.pass_k_list(None, 12, "--pass_k") == [1, 2, 4, 8, 12]
    assert cli.pass_k_list("16,1,4", 16, "--pass_k") == [1, 4, 16]
    for bad in ("0,4", "4,17", "a,b", ","):
        with pytest.raises(UserError, match="--pass_k"):
            cli.pass_k_list(bad, 16, "--pass_k")


def test_eval_pass_at_k_from_its_own_completions(tmp_path):
    out = tmp_path / "e"
    p = subprocess.run([sys.executable, "eval.py", "--model", "tiny", "--dataset", "tiny", "--limit", "6", "--k", "4",
                        "--temperature", "1.0", "--max_completion_length", "12", "--output_dir", str(out)],
                       cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.load(open(out / "results.json"))
    records = [json.loads(line) for line in open(out / "completions.jsonl")]
    assert sorted(res["pass@k"]) == ["1", "2", "4"] and len(records) == 24
    right = [sum(r["reward"] == 1.0 for r in records if r["index"] == i) for i in range(6)]
    for k in (1, 2, 4):
        by_hand = [eval_script.pass_at_k(4, c, k) for c in right]
        mean = sum(by_hand) / 6
        se = math.sqrt(sum((x - mean) ** 2 for x in by_hand) / 5 / 6)
        assert res["pass@k"][str(k)] == pytest.approx(mean) and res["pass@k_stderr"][str(k)] == pytest.approx(se)
    assert res["pass@k"]["1"] == pytest.approx(res["accuracy"])        # pass@1 is avg@k
    assert res["pass@k"]["1"] <= res["pass@k"]["2"] <= res["pass@k"]["4"]
    assert "pass@1 " in p.stdout and "pass@4 " in p.stdout
    # a k above the samples per question: one error line
    p = subprocess.run([sys.executable, "eval.py", "--model", "tiny", "--dataset", "tiny", "--k", "4", "--temperature",
                        "1", "--pass_k", "8", "--output_dir", str(tmp_path / "x")], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1] == \
        "error: --pass_k 8: each must be between 1 and the samples per question (4)"
