"""gpu_check.py, the maintainers' GPU acceptance check: the pieces that run on a CPU, and its refusal."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

import gpu_check
import train
from engine import memory, runlog
from engine.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_refuses_without_cuda_in_one_line():
    p = subprocess.run([sys.executable, "gpu_check.py"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert lines[-1].startswith("error: gpu_check.py checks the GPU path and needs a CUDA GPU")
    assert not any(line.startswith("error") for line in lines[:-1])


def test_arguments():
    a = gpu_check.parse_args([])
    assert a.parts == list("abcde") and a.deadline_s == 480 and a.cap_gb == 8
    assert gpu_check.parse_args(["--parts", "c,a"]).parts == ["a", "c"]
    assert gpu_check.parse_args(["--parts", "bd"]).parts == ["b", "d"]
    for bad in (["--parts", "x"], ["--parts", ","], ["--deadline_s", "0"], ["--cap_gb", "-1"]):
        with pytest.raises(UserError):
            gpu_check.parse_args(bad)


@pytest.mark.parametrize("size,params", [("1.5b", 1.54e9), ("0.5b", 0.494e9)])
def test_shaped_models_are_qwens(size, params):
    """The random models have Qwen2.5's shapes: memory.QWEN's, and Qwen's parameter counts (tied head)."""
    from transformers import Qwen2ForCausalLM
    cfg = gpu_check.shaped_config(size)
    shape = memory.ModelShape.from_config(cfg, gpu_check.QWEN[size])
    want = memory.QWEN[gpu_check.QWEN[size]]
    assert dataclasses.replace(shape, head_size=None) == want and shape.head_dim == want.head_dim
    with torch.device("meta"):
        n = sum(p.numel() for p in Qwen2ForCausalLM(cfg).parameters())
    assert n == pytest.approx(params, rel=0.01)


def test_estimate_is_memory_pys_for_the_same_settings():
    cfg = train.parse_config(["--dtype", "bf16", "--rollout_model", "auto"])
    got = gpu_check.estimate_gb("1.5b", cfg, "dense", 40)
    want = memory.peak_gb(memory.QWEN["Qwen2.5-1.5B"], dataclasses.replace(cfg, rollout_model="dense",
                                                                         max_prompt_length=40))
    assert got == want
    assert gpu_check.estimate_gb("1.5b", cfg, "policy", 40) < got      # without the copy


def fake_rows(n, **extra):
    return [{"step": i, "loss": 0.1, "grad_norm": 0.5, "time/step_s": float(i), "peak_mem_gb": 5.0 + i,
             "time/rollout_copy_s": 0.2, **extra} for i in range(1, n + 1)]


def test_summaries_table_and_json(tmp_path):
    rows = gpu_check.summarize_train("a", fake_rows(4), {"rc": 0}, 4, resumed=True)
    by = {r["check"]: r for r in rows}
    assert by["steps written"]["ok"] is True and by["resumed from the checkpoint"]["ok"] is True
    assert by["step time (s), after the first"]["measured"] == 3.0 and by["sampler"]["measured"] == "dense"
    bad = gpu_check.summarize_train("a", fake_rows(2), {"error": "OutOfMemoryError: CUDA out of memory"}, 3)
    assert bad[0]["ok"] is False and any(r["check"] == "error" for r in bad)
    nan = fake_rows(3)
    nan[1]["loss"] = float("nan")
    assert {r["check"]: r["ok"] for r in gpu_check.summarize_train("c", nan, {}, 3)}["loss, grad_norm finite"] is False
    mem = gpu_check.summarize_memory("b", fake_rows(3), {"max_reserved_gb": 7.5}, 8.0, 6.1)
    assert mem[0]["measured"] == 8.0 and mem[0]["reference"] == "memory.py estimate 6.10"
    assert mem[1]["measured"] == 7.5 and mem[0]["ok"] is True           # reserved within the cap
    fp16 = gpu_check.summarize_fp16("c", fake_rows(3, loss_scale=65536.0, skipped_updates=0), {})
    assert all(r["ok"] is not False for r in fp16) and "65536" in fp16[1]["measured"]
    assert gpu_check.summarize_fp16("c", fake_rows(3), {})[1]["ok"] is False       # no loss_scale: not the T4 path
    roll = gpu_check.summarize_rollout("d", {"rows": [
        {"dtype": "bf16", "sampler": "dense", "tokens_per_s": 1234.5,
         "sampling/sampling_logp_difference/mean": 1e-3, "sampling/sampling_logp_difference/max": 2e-2},
        {"dtype": "fp16", "sampler": "dense", "error": "NonFiniteLogits: the sampler's logits are not finite"}]})
    assert roll[0]["measured"] == 1234.5 and roll[-1]["ok"] is False
    trl = gpu_check.summarize_trl("e", fake_rows(3), {"trl_step_s": 4.0, "trl_peak_mem_gb": 9.0,
                                                      "trl_peak_mem_reserved_gb": 10.0})
    assert trl[0]["measured"] == "3.00 / 4.00" and trl[0]["reference"] == "ratio 0.75"   # median of steps 2, 3
    assert trl[1]["measured"] == "8.00 / 9.00"
    shared = gpu_check.summarize_shared_prefix("e", fake_rows(3, **{"shared_prefix/packed_share": 1.0}),
                                               [dict(r, **{"time/step_s": 2 * r["time/step_s"]}) for r in fake_rows(3)])
    assert shared[0]["measured"] == "3.00 / 6.00" and shared[0]["reference"] == "ratio 0.50" and shared[0]["ok"]
    slower = gpu_check.summarize_shared_prefix("e", [dict(r, **{"time/update_s": 2.0}) for r in fake_rows(3)],
                                               [dict(r, **{"time/update_s": 1.0}) for r in fake_rows(3)])
    assert [r["ok"] for r in slower if r["check"].startswith("updates")] == [False]   # shared slower: NO
    assert shared[-1]["measured"] == 1.0 and shared[-1]["ok"] is True
    unpacked = gpu_check.summarize_shared_prefix("e", fake_rows(3, **{"shared_prefix/packed_share": 0.0}), fake_rows(3))
    assert unpacked[-1]["ok"] is False                  # both runs in the plain layout: the check says so
    table = gpu_check.write_results(str(tmp_path), rows + mem + roll, {"a": {"rc": 0}}, {"device": "test"})
    lines = table.splitlines()
    assert lines[0] == "| part | check | measured | reference | ok |" and len(lines) == 2 + len(rows + mem + roll)
    assert all(line.count("|") == 6 for line in lines)
    saved = json.load(open(tmp_path / "gpu_check.json"))
    assert saved["device"] == "test" and saved["table"] == json.loads(json.dumps(rows + mem + roll))
    assert saved["parts"] == {"a": {"rc": 0}} and (tmp_path / "gpu_check.md").read_text() == table + "\n"


def test_train_worker_runs_train_py_in_its_own_process(tmp_path):
    """The plumbing of parts a-c on the tiny model (on a CPU, no cap): train.py's rows, worker.json."""
    out = str(tmp_path / "run")
    args = gpu_check.train_args("tiny", out, "--preset", "tiny", "--max_steps", "2")
    res, err = gpu_check.in_own_process("train_worker", {"args": args}, out, timeout=300)
    assert res["rc"] == 0 and "error" not in res and res["max_allocated_gb"] == 0      # no CUDA here
    rows = gpu_check.metrics(out)
    assert [r["step"] for r in rows] == [1, 2] and os.path.isfile(os.path.join(out, "log.txt"))
    summary = {r["check"]: r for r in gpu_check.summarize_train("x", rows, res, 2)}
    assert summary["steps written"]["ok"] and summary["sampler"]["measured"] == "policy"
    bad, _ = gpu_check.in_own_process("train_worker", {"args": args + ["--beta1", "-1"]}, str(tmp_path / "bad"), 300)
    assert bad["error"].startswith("error: --beta1 -1.0")
    # a run stopped for lack of signal is a result, not an error: groups of 2 under the coin reward, seed 7,
    # run into a step whose groups are each all right or all wrong (split, exit code 4) within 30 steps
    split = gpu_check.train_args("tiny", str(tmp_path / "split"), "--preset", "tiny", "--max_steps", "30",
                                 "--num_generations", "2", "--prompts_per_step", "2", "--max_generation_rounds", "1",
                                 "--collapse_patience", "1", "--seed", "7")
    stopped, err = gpu_check.in_own_process("train_worker", {"args": split}, str(tmp_path / "split"), 300)
    assert stopped["rc"] == runlog.SPLIT and "error" not in stopped and "\nsplit: " in err


def test_rollout_worker_measures_both_samplers(tmp_path):
    """Part d's worker on the tiny model (float32 on a CPU): tokens/s of both samplers and the mismatch."""
    out = str(tmp_path / "d")
    args = gpu_check.train_args("tiny", out, "--preset", "tiny", "--prompts_per_step", "2")
    res, err = gpu_check.in_own_process("rollout_worker", {"args": args, "dtypes": ["fp32"]}, out, timeout=300)
    assert "error" not in res, err[-2000:]
    assert [(r["dtype"], r["sampler"]) for r in res["rows"]] == [("fp32", "dense"), ("fp32", "policy")]
    for r in res["rows"]:
        assert "error" not in r and r["tokens_per_s"] > 0
        # float32 on both sides: rounding only (tests/test_rollout_copy.py)
        assert 0 <= r["sampling/sampling_logp_difference/mean"] <= r["sampling/sampling_logp_difference/max"] < 1e-3
    table = {r["check"]: r["measured"] for r in gpu_check.summarize_rollout("d", res)}
    assert "rollout tokens/s, dense fp32" in table and "logp mismatch mean / max, policy fp32" in table
    # python -m engine.bench --mismatch's rows: in float32 the copy merges, the first update would clip nothing and
    # the sampler correction's weights are 1
    assert [(r["dtype"], r["sampler"]) for r in res["mismatch"]] == [("fp32", "copy, LoRA merged"),
                                                                       ("fp32", "4-bit policy")]
    assert all(r["would_clip_at_first_update"] == 0 and abs(r["mean"] - 1) < 1e-5 for r in res["mismatch"])
    assert "outside the clip range at the first update (upper bound) / correction (sequence_mask) mean, masked, " \
        "4-bit policy, fp32, small random adapter" in table
    assert table["sampling tokens/s, 4-bit policy, fp32, small random adapter"] > 0
    # fp16's row of the log-prob head's rounding: the pi_old pass's time with the head in fp16 and float32
    head = {"dtype": "fp16", "sampler": "log-prob head fp16 vs float32", "tokens": 9, "logp_diff_mean": 1e-4,
            "logp_diff_max": 2e-3, "pass_s_head_fp16": 0.5, "pass_s_head_fp32": 0.75}
    table = {r["check"]: r["measured"] for r in gpu_check.summarize_rollout("d", {"mismatch": [head]})}
    assert table == {"logp mismatch mean / max, log-prob head fp16 vs float32, fp16, small random adapter":
                     "1.00e-04 / 2.00e-03",
                     "pi_old pass (s), log-prob head fp16 vs float32, fp16, small random adapter: head in fp16 / float32":
                     "0.500 / 0.750"}
