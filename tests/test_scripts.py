"""train.py, eval.py and plot.py run end to end on the tiny model, through 4-bit + LoRA, offline."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
from engine import lab, runfiles

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ["step", "reward", "reward_std", "frac_reward_zero_std", "entropy", "clip_ratio/low_mean",
        "clip_ratio/high_mean", "clip_ratio/region_mean", "clip_ratio/dual_mean", "approx_kl", "ratio/mean",
        "ratio/max", "completions/mean_length", "completions/clipped_ratio", "num_tokens", "loss", "sft_loss",
        "grad_norm", "learning_rate", "time/step_s", "time/rollout_s", "time/update_s", "peak_mem_gb",
        *[f"quadrants/{q}_{m}" for q in ("pa_hp", "pa_lp", "na_hp", "na_lp") for m in ("frac", "drive")]]


def script(*args, cwd=ROOT, check=True):
    p = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, env=os.environ.copy())
    if check and p.returncode != 0:
        raise AssertionError(f"{args} exited {p.returncode}:\n{p.stderr[-3000:]}")
    return p


def rows(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def baseline_run(tmp_path_factory):
    """One uninterrupted tiny run: 6 steps, a checkpoint every 2. Returns (folder, its stderr)."""
    out = str(tmp_path_factory.mktemp("runs") / "baseline")
    p = script("train.py", "--model", "tiny", "--dataset", "tiny", "--max_steps", "6", "--output_dir", out)
    return out, p.stderr


@pytest.fixture(scope="module")
def baseline(baseline_run):
    return baseline_run[0]


def test_first_screen_has_no_warnings(baseline_run):
    # a normal run prints its step lines, a progress bar and where things went: nothing a user
    # cannot act on (library warnings, deprecation notices, loading bars)
    err = baseline_run[1]
    for noise in ("Warning", "warning", "warn(", "kernels", "deprecated", "Loading weights", "Writing model"):
        assert noise not in err, noise
    assert "done: 6 steps" in err


def test_train_end_to_end(baseline, tiny_path):
    from safetensors.torch import load_file
    rs = rows(baseline)
    assert [r["step"] for r in rs] == [1, 2, 3, 4, 5, 6]
    for r in rs:
        for k in KEYS:
            assert k in r and math.isfinite(r[k]), (k, r.get(k))
    assert any(r["updates"] > 1 for r in rs)                         # several updates per rollout
    assert any(r["clip_ratio/low_mean"] + r["clip_ratio/high_mean"] > 0 for r in rs)
    assert "eval/accuracy" in rs[0] and "eval/accuracy" in rs[-1]
    # the final adapter holds only LoRA weights, and they moved (peft starts lora_B at zero)
    w = load_file(os.path.join(baseline, "adapter_model.safetensors"))
    assert w and all("lora_" in k for k in w)
    assert any(v.abs().max() > 0 for k, v in w.items() if "lora_B" in k)
    # the base model on disk was not touched (trained weights live only in the adapter)
    base = lab.warm_start_path("tiny")
    cfg = json.load(open(os.path.join(baseline, "adapter_config.json")))
    assert os.path.realpath(cfg["base_model_name_or_path"]) == os.path.realpath(base)
    for name in ("config.json", "samples.jsonl", "curves.png", "checkpoint/state.pt", "tokenizer.json"):
        assert os.path.exists(os.path.join(baseline, name)), name
    saved = json.load(open(os.path.join(baseline, "config.json")))
    assert (saved["algo"], saved["beta1"], saved["beta2"], saved["epsilon_low"], saved["dual_clip"]) == \
        ("cegppo", 0.5, 1.0, 0.2, 10.0)


def test_base_weights_unchanged(tiny_path, tmp_path):
    """Train from a copy of a base folder and check its bytes afterwards."""
    import hashlib
    import shutil
    base = str(tmp_path / "base")
    shutil.copytree(lab.warm_start_path("tiny"), base)
    digest = lambda: hashlib.md5(open(os.path.join(base, "model.safetensors"), "rb").read()).hexdigest()
    before = digest()
    script("train.py", "--preset", "tiny", "--model", base, "--max_steps", "2", "--output_dir", str(tmp_path / "o"))
    assert digest() == before


def wait_for_rows(out, n, proc, timeout=240):
    t = time.time()
    path = os.path.join(out, "metrics.jsonl")
    while time.time() - t < timeout:
        if os.path.exists(path) and len(open(path).read().splitlines()) >= n:
            return
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.02)
    raise AssertionError("timed out waiting for metrics")


def same_run(a, b):
    ra, rb = rows(a), rows(b)
    assert [r["step"] for r in rb] == [r["step"] for r in ra]
    for x, y in zip(ra, rb):      # the same data, samples and updates as the uninterrupted run
        for k in ("reward", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "completions/mean_length", "loss"):
            assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-6), (x["step"], k)


def test_resume_after_a_crash(baseline, tmp_path):
    out = str(tmp_path / "crash")
    args = [sys.executable, "train.py", "--model", "tiny", "--dataset", "tiny", "--max_steps", "6", "--output_dir", out]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_rows(out, 3, proc)          # checkpoint at step 2, row 3 written after it
    proc.kill()
    proc.wait()
    state = __import__("torch").load(os.path.join(out, "checkpoint", "state.pt"), weights_only=True)
    assert state["step"] in (2, 4)
    script("train.py", *args[2:], "--resume")
    same_run(baseline, out)


class PickledCall:
    """An object whose unpickling would call open(path, "w"): what a malicious state.pt could do."""
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_checkpoint_with_a_pickled_object_is_refused(baseline, tmp_path):
    import shutil
    import torch
    out = str(tmp_path / "shared")
    shutil.copytree(baseline, out)                       # a run folder from a classmate, say
    state = os.path.join(out, "checkpoint", "state.pt")
    marker = str(tmp_path / "code-ran")
    torch.save({**torch.load(state, weights_only=True), "extra": PickledCall(marker)}, state)
    p = script("train.py", "--model", "tiny", "--dataset", "tiny", "--max_steps", "8", "--output_dir", out,
               "--resume", check=False)
    assert p.returncode == 2
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: --resume: {state} holds a pickled ") and "could run code" in last
    assert "Traceback" not in p.stderr and not os.path.exists(marker)
    assert len(rows(out)) == 6                           # nothing lost


def test_resume_after_a_power_cut_takes_the_last_complete_checkpoint(baseline, tmp_path):
    # a cut before the newest checkpoint's data reached the disk leaves `checkpoint` with an empty
    # file and the one before it as `checkpoint.old`; one between the two renames leaves only .old
    import shutil
    out = str(tmp_path / "cut")
    args = ["--model", "tiny", "--dataset", "tiny", "--output_dir", out]
    script("train.py", *args, "--max_steps", "2")
    shutil.copytree(os.path.join(out, "checkpoint"), str(tmp_path / "at-step-2"))
    script("train.py", *args, "--max_steps", "4", "--resume")
    shutil.move(str(tmp_path / "at-step-2"), os.path.join(out, "checkpoint.old"))
    open(os.path.join(out, "checkpoint", "state.pt"), "wb").close()
    os.makedirs(os.path.join(out, "checkpoint.tmp", "adapter"))   # a half-written next one
    assert runfiles.find_checkpoint(out) == os.path.join(out, "checkpoint.old")
    p = script("train.py", *args, "--max_steps", "6", "--resume")
    assert f"resumed from {out}/checkpoint.old at step 2" in p.stderr
    same_run(baseline, out)                              # steps 3 and 4 redone, exactly
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint")) == ["checkpoint"]
    shutil.rmtree(os.path.join(out, "checkpoint"))       # nothing complete at all: one clear line
    p = script("train.py", *args, "--max_steps", "8", "--resume", check=False)
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1] == f"error: --resume: no checkpoint in {out}"


def test_ctrl_c_saves_and_resumes(baseline, tmp_path):
    out = str(tmp_path / "sigint")
    args = [sys.executable, "train.py", "--model", "tiny", "--dataset", "tiny", "--max_steps", "6", "--output_dir", out]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_rows(out, 1, proc)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "--resume" in err
    state = __import__("torch").load(os.path.join(out, "checkpoint", "state.pt"), weights_only=True)
    assert state["step"] == len(rows(out)) < 6
    script("train.py", *args[2:], "--resume")
    same_run(baseline, out)


def test_resume_refuses_changed_algorithm(baseline, tmp_path):
    p = script("train.py", "--model", "tiny", "--dataset", "tiny", "--output_dir", baseline, "--resume",
               "--beta1", "0.9", "--max_steps", "8", check=False)
    assert p.returncode == 2 and "--beta1" in p.stderr and "Traceback" not in p.stderr


def test_eval_with_adapter(baseline, tmp_path):
    out = str(tmp_path / "ev")
    p = script("eval.py", "--model", "tiny", "--adapter", baseline, "--dataset", "tiny", "--limit", "6",
               "--max_completion_length", "28", "--output_dir", out)
    res = json.load(open(os.path.join(out, "results.json")))
    recs = [json.loads(line) for line in open(os.path.join(out, "completions.jsonl"))]
    assert res["n_questions"] == 6 and res["k"] == 1 and len(recs) == 6
    assert res["accuracy"] == pytest.approx(sum(r["reward"] for r in recs) / 6)
    assert {"stderr", "unanswered", "truncated", "settings"} <= set(res)
    assert "accuracy" in p.stdout
    # avg@k: k samples per question
    out2 = str(tmp_path / "ev2")
    script("eval.py", "--model", "tiny", "--dataset", "tiny", "--limit", "3", "--k", "4", "--temperature", "0.6",
           "--top_p", "0.95", "--max_completion_length", "28", "--output_dir", out2)
    assert len(open(os.path.join(out2, "completions.jsonl")).read().splitlines()) == 12


BAD = {   # case: (flags, what the one error line must say); train.py and, where it has the flag, eval.py
    "missing_field": (["--dataset", "{data}"], "{data}: row 1: field 'answer' is missing or empty"),
    "no_file": (["--dataset", "{tmp}/nope.jsonl"], "no such file"),
    "unknown_dataset": (["--dataset", "gsm9k"], "--dataset gsm9k: unknown"),
    "no_model": (["--model", "{tmp}/no_model_here"], "no such folder"),
    "one_generation": (["--num_generations", "1"], "--num_generations 1: a group needs at least 2"),
    "negative_beta1": (["--beta1", "-1"], "--beta1 -1.0: must be >= 0"),
    "negative_beta2": (["--beta2", "-0.5"], "--beta2 -0.5: must be >= 0"),
    "epsilon_low_1": (["--epsilon_low", "1"], "--epsilon_low 1.0: must be in [0, 1)"),
    "epsilon_high_negative": (["--epsilon_high", "-0.1"], "--epsilon_high -0.1: must be in [0, 1)"),
    "dual_clip_below_1": (["--dual_clip", "0.5"], "--dual_clip 0.5: must be 0 (off) or greater than 1"),
    "top_p_0": (["--top_p", "0"], "--top_p 0.0: must be in (0, 1]"),
    "top_p_above_1": (["--top_p", "1.5"], "--top_p 1.5: must be in (0, 1]"),
    "learning_rate_0": (["--learning_rate", "0"], "--learning_rate 0.0: must be > 0"),
    "negative_sft_coef": (["--sft_coef", "-0.1"], "--sft_coef -0.1: must be >= 0"),
    "fewer_rows_than_prompts": (["--dataset", "{small}", "--prompts_per_step", "4"],
                                "--dataset {small}: 2 usable prompts, fewer than --prompts_per_step 4"),
}
EVAL_HAS = {"missing_field", "no_file", "unknown_dataset", "no_model", "top_p_above_1"}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_clear_line(case, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"question": "1+1?", "answer": "2"}\n{"question": "2+2?"}\n')
    small = tmp_path / "small.jsonl"
    small.write_text('{"question": "1+1?", "answer": "2"}\n{"question": "2+2?", "answer": "4"}\n')
    fill = lambda s: s.format(data=data, tmp=tmp_path, small=small)
    flags, message = [fill(a) for a in BAD[case][0]], fill(BAD[case][1])
    for prog in ("train.py", "eval.py"):
        if prog == "eval.py" and case not in EVAL_HAS:
            continue
        base = ["--model", "tiny", "--dataset", "tiny"] if prog == "eval.py" else ["--preset", "tiny"]
        out = tmp_path / prog
        p = script(prog, *base, *flags, "--output_dir", str(out), check=False)
        assert p.returncode == 2, p.stderr[-2000:]
        last = p.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and message in last, last
        assert "Traceback" not in p.stderr
        assert not out.exists()                      # a failed run leaves no folder behind


def test_help_shows_each_algorithms_defaults_once():
    p = script("train.py", "--help")
    text = " ".join(p.stdout.split())
    assert "(default: cegppo 0.5, grpo 0, dapo 0, gppo 1, cispo -)" in text              # --beta1
    assert "(default: cegppo 0.2, grpo 0.2, dapo 0.28, gppo 0.2, cispo 4)" in text       # --epsilon_high
    assert "{cegppo,grpo,dapo,gppo,cispo}" in text and "cispo: its own loss" in text
    assert "default: None" not in text and text.count("(default:") == text.count("(default: ")
    assert "{tiny,lab,carry}" in text and "same as --load_in_4bit false" in text


def test_plot_two_runs(baseline, tmp_path):
    import shutil
    other = str(tmp_path / "other")
    shutil.copytree(baseline, other)
    cfg = json.load(open(os.path.join(other, "config.json")))
    cfg.update(algo="grpo", beta1=0.0, beta2=0.0)
    json.dump(cfg, open(os.path.join(other, "config.json"), "w"))
    png = str(tmp_path / "cmp.png")
    p = script("plot.py", baseline, other, "--output", png)
    assert os.path.getsize(png) > 10_000 and "wrote" in p.stdout
    import plot
    (la, ra), (lb, rb) = plot.group_by_setting([baseline, other])
    assert (ra, rb) == ([baseline], [other]) and "algo=cegppo" in la and "algo=grpo" in lb and "beta1=0.5" in la
    from PIL import Image
    assert Image.open(png).size[0] > 1000


def fake_run(folder, seed, beta1, entropies):
    os.makedirs(folder)
    json.dump({"algo": "cegppo", "beta1": beta1, "beta2": 1.0, "seed": seed, "output_dir": folder},
              open(os.path.join(folder, "config.json"), "w"))
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        for step, h in enumerate(entropies, 1):
            f.write(json.dumps({"step": step, "entropy": h, "reward": 0.5}) + "\n")


def test_seeds_of_one_setting_become_one_band(tmp_path):
    import plot
    runs = [str(tmp_path / n) for n in ("b0-s1", "b0-s2", "b1-s1", "b1-s2")]
    fake_run(runs[0], 1, 0.0, [1.0, 0.8, 0.6])
    fake_run(runs[1], 2, 0.0, [1.0, 0.6, 0.2])
    fake_run(runs[2], 1, 1.0, [1.0, 0.5, 0.3])
    fake_run(runs[3], 2, 1.0, [0.9, 0.5, 0.1])
    groups = plot.group_by_setting(runs)
    # runs that differ only by seed are one setting, labelled by what differs between settings
    assert groups == [("beta1=0 (2 seeds)", runs[:2]), ("beta1=1 (2 seeds)", runs[2:])]
    # a knob a setting does not have (None, as CISPO's betas) neither makes a flag differ nor is shown:
    # beside settings that differ in beta1 only, a CISPO run is labelled by what it has that differs
    cispo = str(tmp_path / "cispo")
    fake_run(cispo, 1, None, [1.0, 0.9, 0.8])
    config = json.load(open(os.path.join(cispo, "config.json")))
    json.dump({**config, "algo": "cispo", "beta2": None}, open(os.path.join(cispo, "config.json"), "w"))
    assert [label for label, _ in plot.group_by_setting(runs + [cispo])] == [
        "algo=cegppo beta1=0 (2 seeds)", "algo=cegppo beta1=1 (2 seeds)", "algo=cispo"]
    # an entropy target that is off (None) is a setting of its own: steered runs are never pooled with fixed ones
    steered = str(tmp_path / "steered")
    fake_run(steered, 1, 1.0, [1.0, 0.9, 0.8])
    config = json.load(open(os.path.join(steered, "config.json")))
    json.dump({**config, "entropy_target": 0.5}, open(os.path.join(steered, "config.json"), "w"))
    assert plot.group_by_setting(runs[2:] + [steered]) == [("algo=cegppo beta1=1 beta2=1 (2 seeds)", runs[2:]), ("entropy_target=0.5", [steered])]
    curves = [{r["step"]: r["entropy"] for r in plot.read_rows(run)} for run in runs[:2]]
    steps, mean, low, high = plot.seed_band(curves)
    assert steps == [1, 2, 3] and mean == pytest.approx([1.0, 0.7, 0.4])
    assert low == [1.0, 0.6, 0.2] and high == [1.0, 0.8, 0.6]
    png = str(tmp_path / "bands.png")
    assert plot.main([*runs, "--output", png, "--window", "1"]) == 0 and os.path.getsize(png) > 10_000


def test_gradient_weight_figure(tmp_path):
    import plot
    # F by autograd through cegppo_loss. PPO-clip: F = r inside, 0 where the clip binds;
    # CE-GPPO: beta * bound there instead (0.5 * 0.8 = 0.4 low, 1 * 1.2 = 1.2 high).
    assert plot.gradient_weight([1.1, 1.5], 1.0) == pytest.approx([1.1, 0.0], abs=1e-12)
    assert plot.gradient_weight([0.5, 1.5], -1.0) == pytest.approx([0.0, 1.5], abs=1e-12)   # A < 0, r high: r
    assert plot.gradient_weight([0.5], -1.0, beta1=0.5) == pytest.approx([0.4])
    assert plot.gradient_weight([1.5], 1.0, beta2=1.0) == pytest.approx([1.2])
    assert plot.gradient_weight([0.5], 1.0, beta1=0.5, beta2=1.0) == pytest.approx([0.5])   # A > 0, low r: kept
    # CISPO: min(r, 1 + eps) for every token, either sign of A (cap 1.2 here)
    assert plot.gradient_weight([0.5, 1.1, 1.5], 1.0, algo="cispo") == pytest.approx([0.5, 1.1, 1.2])
    assert plot.gradient_weight([0.5, 1.5], -1.0, algo="cispo") == pytest.approx([0.5, 1.2])
    png = str(tmp_path / "gw.png")
    assert plot.main(["--gradient_weight", png]) == 0 and os.path.getsize(png) > 10_000


def test_long_prompts_are_skipped_and_counted(tmp_path):
    # every tiny prompt is about 33 tokens: with a limit of 5 all 64 are skipped, counted, and the run stops
    p = script("train.py", "--preset", "tiny", "--max_prompt_length", "5", "--output_dir", str(tmp_path / "o"),
               check=False)
    assert "skipped 64 prompts longer than --max_prompt_length 5" in p.stderr
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1] == "error: --dataset tiny: no usable prompts"


def test_zero_advantage_groups_get_no_forward_or_backward_with_grad(tmp_path, monkeypatch):
    # Spy on the log-prob pass (the real one runs): every pass with grad on is a training pass,
    # and it must see exactly the responses of the groups whose rewards differ.
    import torch
    import train
    from engine import logprobs
    real, trained = logprobs.Scorer.micro_batch_logprobs, []

    def spy(self, model, batch, *a, **k):    # every log-prob pass, packed (shared prefix) or plain
        if torch.is_grad_enabled():
            trained.append(batch[0].shape[0])
        return real(self, model, batch, *a, **k)

    monkeypatch.setattr(logprobs.Scorer, "micro_batch_logprobs", spy)
    handler = signal.getsignal(signal.SIGINT)
    try:
        out = str(tmp_path / "z")
        assert train.main(["--model", "tiny", "--max_steps", "6", "--num_iterations", "2", "--eval_limit", "0",
                           "--output_dir", out]) == 0
    finally:
        signal.signal(signal.SIGINT, handler)
    r = rows(out)
    assert sum(x["frac_reward_zero_std"] for x in r) > 0             # some groups were all right or all wrong
    assert sum(trained) == 2 * sum(x["trained_responses"] for x in r)
    assert all(x["trained_responses"] == 4 * x["generation/groups_kept"] for x in r)
    # the all-equal groups of every round are counted, and the kept ones are what the step trained on
    assert all(x["frac_reward_zero_std"] == pytest.approx(
        (x["generation/groups_all_wrong"] + x["generation/groups_all_right"]) / x["generation/prompts"]) for x in r)


def test_sft_term_changes_the_update(tmp_path):
    # the same seed gives the same first rollout; with --sft_coef the first update's gradient differs
    # by the SFT term on the fully rewarded responses (its value is tested by hand in test_loss.py).
    # One update per step: the logged sft_loss and grad_norm are means over the step's updates, and
    # from the second update on the two runs' policies differ (the term under test moved one of
    # them), so only the first update's numbers are comparable; with one update they are the row's.
    import train
    handler = signal.getsignal(signal.SIGINT)
    try:
        runs = {}
        for coef in ("0", "0.5"):
            out = str(tmp_path / coef)
            assert train.main(["--model", "tiny", "--max_steps", "1", "--eval_limit", "0", "--sft_coef", coef,
                               "--steps_per_generation", "1", "--output_dir", out]) == 0
            runs[coef] = rows(out)[0]
    finally:
        signal.signal(signal.SIGINT, handler)
    a, b = runs["0"], runs["0.5"]
    assert a["updates"] == b["updates"] == 1
    assert a["reward"] == b["reward"] > 0                              # the same rollout, some right answers
    # the same policy, rollout and tokens: the SFT term's value is the same computation in both runs
    assert a["sft_loss"] > 0 and a["sft_loss"] == pytest.approx(b["sft_loss"], rel=1e-6)   # logged either way
    assert a["grad_norm"] != pytest.approx(b["grad_norm"], rel=1e-3)  # but only one run trained on it


def test_resume_of_a_seeds_run_starts_the_seeds_not_yet_begun(tmp_path):
    # an interrupted `--seeds 1,2` run: seed 1 has a checkpoint, seed 2 never started
    out = str(tmp_path / "seeds")
    script("train.py", "--preset", "tiny", "--max_steps", "2", "--seed", "1", "--output_dir", f"{out}/seed-1")
    script("train.py", "--preset", "tiny", "--max_steps", "3", "--seeds", "1,2", "--output_dir", out, "--resume")
    assert [r["step"] for r in rows(f"{out}/seed-1")] == [1, 2, 3]          # continued
    assert [r["step"] for r in rows(f"{out}/seed-2")] == [1, 2, 3]          # started


def test_print_config_shows_what_a_command_runs_with(tmp_path):
    # a preset, --algo's knobs and a flag, resolved by train.py itself: what memory.py and the tools read
    out = str(tmp_path / "never")
    p = script("train.py", "--preset", "lab", "--algo", "grpo", "--beta2", "0.5", "--output_dir", out, "--print_config")
    cfg = json.loads(p.stdout)
    assert (cfg["model"], cfg["algo"], cfg["beta1"], cfg["beta2"], cfg["epsilon_low"], cfg["learning_rate"]) == \
        ("lab", "grpo", 0.0, 0.5, 0.1, 5e-5)
    assert not os.path.exists(out)                                   # nothing is loaded or written
    bad = script("train.py", "--algo", "nope", "--print_config", check=False)
    assert bad.returncode == 2 and "--algo" in bad.stderr and not bad.stdout
