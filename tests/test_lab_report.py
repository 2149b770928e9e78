"""What a class compares: GPPO among the algorithms, the seed table with collapses counted, and
rewards that are right on a user's own worked-solution data."""
import json
import os


import cegppo
import plot
import train
from engine import data


def test_gppo_is_beta1_beta2_1_with_cegppo_clip_range():
    cfg = train.parse_config(["--algo", "gppo"])
    assert (cfg.beta1, cfg.beta2) == (1.0, 1.0)
    assert (cfg.epsilon_low, cfg.epsilon_high, cfg.dual_clip) == tuple(
        cegppo.ALGOS["cegppo"][k] for k in ("epsilon_low", "epsilon_high", "dual_clip"))


def fake_run(folder, seed, algo, rewards, entropy, evals, kl=0.01, stopped=None):
    """A train.py output folder with the fields the seed table reads."""
    os.makedirs(folder)
    json.dump({"algo": algo, "beta1": 0.0, "beta2": 0.0, "seed": seed, "output_dir": folder},
              open(os.path.join(folder, "config.json"), "w"))
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        for step, (r, h) in enumerate(zip(rewards, entropy), 1):
            row = {"step": step, "reward": r, "entropy": h, "clip_ratio/low_mean": 0.01,
                   "clip_ratio/high_mean": 0.02, "approx_kl": kl}
            if step in evals:
                row["eval/accuracy"] = evals[step]
            if step == len(rewards) and stopped:
                row["stopped"] = stopped
            f.write(json.dumps(row) + "\n")


def test_collapse_is_detected_counted_and_kept_out_of_the_second_row(tmp_path):
    up = [0.5] * 10 + [0.9] * 10                                       # learns
    crash = [0.5] * 10 + [0.8] * 3 + [0.0] * 7                         # learns, then loses it all
    runs = {}
    for seed in (1, 2, 3):
        runs[("grpo", seed)] = str(tmp_path / f"grpo-{seed}")
        fake_run(runs[("grpo", seed)], seed, "grpo", up, [0.2] * 16 + [0.1 * seed] * 4, {20: 0.9})
        runs[("gppo", seed)] = str(tmp_path / f"gppo-{seed}")
        rewards = crash if seed == 2 else up
        fake_run(runs[("gppo", seed)], seed, "gppo", rewards, [0.2] * 16 + [0.1 * seed + 0.05] * 4,
                 {20: 0.0 if seed == 2 else 0.95})
    assert plot.collapse_step(plot.read_rows(runs[("gppo", 2)])) == 18     # 5-step mean: 0.16 at 17, 0 at 18
    assert plot.collapse_step(plot.read_rows(runs[("gppo", 1)])) is None
    # a run train.py stopped for collapse counts as collapsed at its last step; one stopped otherwise
    # (Ctrl-C, a crash, saturation: every group all right) does not
    fake_run(str(tmp_path / "stopped"), 9, "grpo", [0.0] * 5, [0.3] * 5, {}, stopped="collapsed")
    assert plot.run_summary(str(tmp_path / "stopped"))["collapse_step"] == 5
    fake_run(str(tmp_path / "short"), 9, "grpo", [0.0] * 5, [0.3] * 5, {})
    fake_run(str(tmp_path / "saturated"), 9, "grpo", [1.0] * 5, [0.3] * 5, {}, stopped="saturated")
    assert plot.run_summary(str(tmp_path / "short"))["collapse_step"] is None
    assert plot.run_summary(str(tmp_path / "saturated"))["collapse_step"] is None

    table = plot.seed_table(list(runs.values()), baseline="algo=grpo")
    lines = table.splitlines()
    grpo = next(line for line in lines if line.startswith("| algo=grpo") and "(3 seeds)" in line)
    gppo = next(line for line in lines if line.startswith("| algo=gppo") and "(3 seeds) |" in line)
    assert "| 0 of 3 |" in grpo and "| 1 of 3 (steps 18; 0 recovered) |" in gppo
    # entropy over the last 20% (4 of 20 steps): grpo 0.1, 0.2, 0.3 -> 0.2 ± 0.0577
    assert "0.2000 ± 0.0577" in grpo
    without = next(line for line in lines if "without the collapsed" in line)
    assert without.split("|")[2].strip() == "2"
    # paired by seed: gppo - grpo entropy is +0.05 in every seed: se 0, so beyond 2 standard errors
    diff = next(line for line in lines[lines.index(next(x for x in lines if x.startswith("Differences"))):]
                if line.startswith("| algo=gppo"))
    assert "+0.0500 ± 0.0000 *" in diff
    # held-out at the end: +0.05, -0.9, +0.05 -> mean -0.267, not beyond 2 se
    assert "-0.267 ± 0.317 |" in diff
    assert plot.main([*runs.values(), "--output", str(tmp_path / "b.png"), "--table", "--baseline", "nope"]) == 2


def test_the_boxed_answer_of_a_long_local_worked_solution_is_the_reference(tmp_path):
    worked = ("We expand step by step. " * 80) + "So the total is $\\frac{3}{4}\\cdot 8 = \\boxed{6}$. " \
             "Checking: \\boxed{x} was a placeholder above; the answer is \\boxed{\\frac{12}{2}}."
    assert len(worked) > cegppo.MAX_ANSWER_CHARS
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"problem": "What is 3/4 of 8?", "solution": worked}) + "\n"
                    + json.dumps({"problem": "What is 2+2?", "solution": "4"}) + "\n")
    rows = data.load_rows(str(path), question_field="problem", answer_field="solution")
    assert rows == [("What is 3/4 of 8?", "\\frac{12}{2}"), ("What is 2+2?", "4")]   # the last box; plain kept
    assert cegppo.math_reward("... so \\boxed{6}", rows[0][1]) == 1.0
    assert cegppo.math_reward("... so \\boxed{7}", rows[0][1]) == 0.0
    # a GSM8K-style reference still works the old way
    assert cegppo.math_reward("\\boxed{72}", "Natalia sold 48/2 = 24 clips.\n#### 72") == 1.0
