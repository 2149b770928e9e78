"""train.py, eval.py and plot.py run end to end on the tiny model, through 4-bit + LoRA, offline."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ["step", "reward", "accuracy", "entropy", "clip_frac_low", "clip_frac_high", "dual_clip_frac", "approx_kl",
        "response_length", "truncated_frac", "zero_std_groups", "loss", "grad_norm", "lr", "step_time_s",
        "rollout_time_s", "update_time_s", "peak_mem_gb",
        *[f"{q}_{m}" for q in ("pa_hp", "pa_lp", "na_hp", "na_lp") for m in ("frac", "drive")]]


def script(*args, cwd=ROOT, check=True):
    p = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, env=os.environ.copy())
    if check and p.returncode != 0:
        raise AssertionError(f"{args} exited {p.returncode}:\n{p.stderr[-3000:]}")
    return p


def rows(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """One uninterrupted tiny run: 6 steps, a checkpoint every 2."""
    out = str(tmp_path_factory.mktemp("runs") / "baseline")
    script("train.py", "--model", "tiny", "--dataset", "tiny", "--max_steps", "6", "--output_dir", out)
    return out


def test_train_end_to_end(baseline, tiny_path):
    from safetensors.torch import load_file
    import lab
    rs = rows(baseline)
    assert [r["step"] for r in rs] == [1, 2, 3, 4, 5, 6]
    for r in rs:
        for k in KEYS:
            assert k in r and math.isfinite(r[k]), (k, r.get(k))
    assert any(r["updates"] > 1 for r in rs)                         # several updates per rollout
    assert any(r["clip_frac_low"] + r["clip_frac_high"] > 0 for r in rs)
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
    import lab
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
        for k in ("reward", "entropy", "clip_frac_low", "clip_frac_high", "response_length", "loss"):
            assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-6), (x["step"], k)


def test_resume_after_a_crash(baseline, tmp_path):
    out = str(tmp_path / "crash")
    args = [sys.executable, "train.py", "--model", "tiny", "--dataset", "tiny", "--max_steps", "6", "--output_dir", out]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_rows(out, 3, proc)          # checkpoint at step 2, row 3 written after it
    proc.kill()
    proc.wait()
    state = __import__("torch").load(os.path.join(out, "checkpoint", "state.pt"), weights_only=False)
    assert state["step"] in (2, 4)
    script("train.py", *args[2:], "--resume")
    same_run(baseline, out)


def test_ctrl_c_saves_and_resumes(baseline, tmp_path):
    out = str(tmp_path / "sigint")
    args = [sys.executable, "train.py", "--model", "tiny", "--dataset", "tiny", "--max_steps", "6", "--output_dir", out]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_rows(out, 1, proc)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "--resume" in err
    state = __import__("torch").load(os.path.join(out, "checkpoint", "state.pt"), weights_only=False)
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


@pytest.mark.parametrize("case", ["missing_field", "no_file", "unknown_dataset", "no_model", "bad_flag_value"])
def test_bad_input_is_one_clear_line(case, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"question": "1+1?", "answer": "2"}\n{"question": "2+2?"}\n')
    args = {
        "missing_field": (["--dataset", str(data)], f"{data}: row 1: field 'answer' is missing or empty"),
        "no_file": (["--dataset", str(tmp_path / "nope.jsonl")], "no such file"),
        "unknown_dataset": (["--dataset", "gsm9k"], "--dataset gsm9k: unknown"),
        "no_model": (["--model", str(tmp_path / "no_model_here")], "no such folder"),
        "bad_flag_value": (["--num_generations", "1"], "--num_generations 1"),
    }[case]
    for prog in ("train.py", "eval.py"):
        if prog == "eval.py" and case == "bad_flag_value":
            continue
        base = ["--model", "tiny", "--dataset", "tiny"] if prog == "eval.py" else ["--preset", "tiny"]
        p = script(prog, *base, *args[0], "--output_dir", str(tmp_path / prog), check=False)
        assert p.returncode == 2, p.stderr[-2000:]
        last = p.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and args[1] in last, last
        assert "Traceback" not in p.stderr


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
    assert plot.label(baseline) != plot.label(other)
    from PIL import Image
    assert Image.open(png).size[0] > 1000


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
    import cegppo
    import train
    real, trained = cegppo.completion_logprobs, []

    def spy(model, input_ids, *a, **k):
        if torch.is_grad_enabled():
            trained.append(input_ids.shape[0])
        return real(model, input_ids, *a, **k)

    monkeypatch.setattr(cegppo, "completion_logprobs", spy)
    handler = signal.getsignal(signal.SIGINT)
    try:
        out = str(tmp_path / "z")
        assert train.main(["--model", "tiny", "--max_steps", "6", "--num_iterations", "2", "--eval_limit", "0",
                           "--output_dir", out]) == 0
    finally:
        signal.signal(signal.SIGINT, handler)
    r = rows(out)
    assert sum(x["zero_std_groups"] for x in r) > 0                  # some groups were all right or all wrong
    assert sum(trained) == 2 * sum(x["trained_responses"] for x in r)
    assert all(x["trained_responses"] == 4 * (4 - x["zero_std_groups"]) for x in r)
