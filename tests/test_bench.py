"""engine/bench.py times train.py's own loop on the tiny model and writes bench.json."""
import json
import os
import subprocess
import sys

import pytest
from engine import bench, lab, models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_tiny(tmp_path):
    out = str(tmp_path / "b")
    p = subprocess.run([sys.executable, "-m", "engine.bench", "--model", "tiny", "--dataset", "tiny", "--steps", "2",
                        "--output_dir", out], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    b = json.load(open(os.path.join(out, "bench.json")))
    for k in ("step_s", "rollout_s", "old_logprob_s", "update_s", "reward_s", "rollout_tokens_per_s",
              "update_tokens_per_s", "peak_mem_gb"):
        assert b[k] >= 0, k
    assert b["rollout_tokens_per_s"] > 0 and b["peak_mem_gb"] > 0
    assert b["timed_steps"] == 2 and b["settings"]["num_generations"] == 4
    # the split adds up to no more than the whole step
    assert b["rollout_s"] + b["reward_s"] + b["old_logprob_s"] + b["update_s"] <= b["step_s"] + 1e-6
    rows = open(os.path.join(out, "ours", "metrics.jsonl")).read().splitlines()
    assert len(rows) == 3                                    # one warm-up step plus the two timed ones


def test_bench_local_model_folder(tmp_path):
    # any local folder works as --model (here the tiny model's warm-start folder, by path)
    out = str(tmp_path / "f")
    p = subprocess.run([sys.executable, "-m", "engine.bench", "--model", lab.warm_start_path("tiny"), "--dataset", "tiny",
                        "--steps", "1", "--output_dir", out], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    b = json.load(open(os.path.join(out, "bench.json")))
    assert b["model"] == lab.warm_start_path("tiny") and b["step_s"] > 0


def test_bench_bad_flag(tmp_path):
    p = subprocess.run([sys.executable, "-m", "engine.bench", "--model", "tiny", "--dataset", "nope", "--output_dir",
                        str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode != 0 and "--dataset nope" in p.stderr and "Traceback" not in p.stderr


def test_bench_vs_trl(tmp_path):
    pytest.importorskip("trl")       # TRL is not a requirement of the project; this runs where it is installed
    out = str(tmp_path / "t")
    p = subprocess.run([sys.executable, "-m", "engine.bench", "--model", "tiny", "--dataset", "tiny", "--steps", "2",
                        "--vs-trl", "--repeats", "2", "--output_dir", out], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    b = json.load(open(os.path.join(out, "bench.json")))
    assert b["trl_step_s"] > 0 and b["trl_peak_mem_gb"] > 0
    assert len(b["step_s_repeats"]) == len(b["trl_step_s_repeats"]) == 2
    assert b["trl_step_s"] in b["trl_step_s_repeats"] and b["step_s"] in b["step_s_repeats"]
    assert b["step_ratio"] == pytest.approx(b["step_s"] / b["trl_step_s"])


def test_logprob_pass_memory_is_a_fraction_of_the_logits():
    # Exact allocator totals (the profiler's on CPU), not timings. The naive pass holds about three
    # [N, V] float32 tensors (logits, log-softmax, its gradient); ours at most two chunks of N/16
    # positions, i.e. about 2/16 of the logits, under the bound of a quarter.
    vocab, hidden = 8192, 64
    for n in (64, 512):
        logits = n * vocab * 4 / 1e9
        naive = bench.logprob_pass_extra_gb(n, "naive", vocab, hidden)
        ours = bench.logprob_pass_extra_gb(n, "ours", vocab, hidden)
        assert naive >= 2.5 * logits
        assert ours <= 0.15 * logits


def test_synthetic_model_pieces():
    # --synthetic-0.5b: a padded tokenizer (decode-only filler tokens) and a coin-flip reward
    plain, padded = lab.build_tokenizer(), lab.build_tokenizer(vocab_size=500)
    assert len(plain) == 100 and len(padded) == 500
    text = "What is 7 * 8?\n\\boxed{56}"
    assert padded(text)["input_ids"] == plain(text)["input_ids"]     # encoding never makes a filler token
    assert padded.decode([99, 100, 498]) == "~0~1~399"               # decoding writes them out
    assert padded.convert_ids_to_tokens(499) == plain.convert_ids_to_tokens(99)   # the instruction token, last
    coins = [bench.coin_reward(f"~{i}", "56") for i in range(200)]
    assert set(coins) == {0.0, 1.0} and 80 < sum(coins) < 120                # fair, and the same every time
    assert coins == [bench.coin_reward(f"~{i}", "other") for i in range(200)]


def test_logprob_memory_command(tmp_path):
    p = subprocess.run([sys.executable, "-m", "engine.bench", "--logprob-memory", "--logprob-positions", "32,64",
                        "--output_dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = json.load(open(tmp_path / "logprob_memory.json"))["rows"]
    assert [r["positions"] for r in rows] == [32, 64]
    assert all(r["ours_extra_gb"] <= 0.25 * r["logits_fp32_gb"] < r["naive_extra_gb"] for r in rows)


def test_profile_command(tmp_path):
    # dynamic sampling on, so that the profiled step surely trains (engine/bench.py turns it off by default)
    p = subprocess.run([sys.executable, "-m", "engine.bench", "--profile", "--model", "tiny", "--dataset", "tiny",
                        "--max_generation_rounds", "8", "--steps", "1", "--output_dir", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    table = open(tmp_path / "ours" / "profile.txt").read()
    assert "aten::mm" in table and "_TokenLogProb" in table


def test_bench_both_rollouts(tmp_path):
    # --both-rollouts: our side once per --rollout_model (dense copy, then the 4-bit + LoRA policy)
    out = str(tmp_path / "r")
    p = subprocess.run([sys.executable, "-m", "engine.bench", "--model", "tiny", "--dataset", "tiny", "--steps", "1",
                        "--both-rollouts", "--output_dir", out], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    b = json.load(open(os.path.join(out, "bench.json")))
    assert b["rollout_copy_s"] > 0 and b["policy_rollout_copy_s"] < 1e-3        # only the dense side builds one
    assert 0 <= b["sampling_logp_difference_mean"] <= b["sampling_logp_difference_max"] < 1e-3
    assert b["policy_sampling_logp_difference_max"] < 1e-5     # the policy sampled: rounding only
    assert b["generate_tokens_per_s"] >= b["rollout_tokens_per_s"] > 0 and b["policy_generate_tokens_per_s"] > 0
    assert b["rollout_speedup"] == pytest.approx(b["generate_tokens_per_s"] / b["policy_generate_tokens_per_s"])
    assert os.path.isfile(os.path.join(out, "ours_policy", "metrics.jsonl"))


def test_rollout_copy_cost_command(tmp_path):
    p = subprocess.run([sys.executable, "-m", "engine.bench", "--model", "tiny", "--dataset", "tiny", "--rollout-copy-cost",
                        "--output_dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    c = json.load(open(tmp_path / "rollout_copy_cost.json"))
    assert c["build_fresh_s"] > 0 and c["refresh_in_place_s"] > 0 and c["copy_bytes_gb"] > 0
    assert c["max_abs_logit_diff"] < 1e-4 < c["max_abs_logit"]     # float32 rounding only (test_rollout_copy.py)


def test_mismatch_rows_per_dtype_and_sampler(tmp_path):
    # python -m engine.bench --mismatch on the tiny model: bf16 under CPU autocast beside float32; the half-precision
    # copy both ways (LoRA merged and kept apart), float32's merged only (it is exact there)
    out = str(tmp_path / "mm")
    assert bench.main(["--mismatch", "bf16,fp16,fp32", "--model", "tiny", "--dataset", "tiny", "--prompts_per_step",
                       "2", "--output_dir", out]) == 0
    rows = json.load(open(os.path.join(out, "mismatch.json")))
    samplers = [("copy, LoRA merged"), ("copy, LoRA kept apart"), ("4-bit policy")]
    assert [(r["dtype"], r["sampler"]) for r in rows] == [
        *(("bf16", s) for s in samplers), *(("fp16", s) for s in samplers), ("fp16", "log-prob head fp16 vs float32"),
        ("fp32", "copy, LoRA merged"), ("fp32", "4-bit policy")]
    bf16, head, fp32 = rows[:3], rows[6], rows[7:]
    assert all(r["logp_diff_max"] < 1e-4 and r["mean"] == pytest.approx(1.0, abs=1e-5) for r in fp32)
    assert all(r["logp_diff_mean"] > 10 * fp32[0]["logp_diff_mean"] for r in bf16)       # bf16's rounding shows
    assert all(r["tokens_per_s"] > 0 for r in rows if "tokens_per_s" in r) and len([r for r in rows if "tokens_per_s"
                                                                                  in r]) == 8
    # the fp16 head's rounding of pi_old, beside float32's: present, far below bf16's whole mismatch
    assert 0 < head["logp_diff_mean"] < bf16[2]["logp_diff_mean"] and head["pass_s_head_fp32"] > 0
    with pytest.raises(bench.UserError, match="--mismatch bf32: each one of"):
        bench.main(["--mismatch", "bf32", "--model", "tiny", "--dataset", "tiny", "--output_dir", out])


def test_gsm8k_length_prompts_and_the_plain_layout_beside(tmp_path):
    # --gsm8k-length-prompts: both sides read word problems as long as GSM8K's in the chat template
    # (100-150 tokens with the character-level tokenizer of the synthetic 0.5B model); --plain-too: our
    # side again with every row its own prompt, its numbers prefixed plain_ and the ratios beside
    import cegppo
    _, tok = models.load_model(lab.tiny_model_path("lab"), four_bit=False)
    path = bench.gsm8k_length_rows(str(tmp_path / "rows.jsonl"))
    lengths = [len(tok(cegppo.format_prompt(tok, json.loads(line)["question"]))["input_ids"]) for line in open(path)]
    assert 100 <= min(lengths) and max(lengths) <= 150
    out = str(tmp_path / "p")
    p = subprocess.run([sys.executable, "-m", "engine.bench", "--model", "tiny", "--dataset", "tiny", "--steps", "1",
                        "--gsm8k-length-prompts", "--plain-too", "--output_dir", out], cwd=ROOT, capture_output=True,
                       text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    b = json.load(open(os.path.join(out, "bench.json")))
    assert b["plain_step_s"] > 0 and len(b["plain_step_s_repeats"]) == 1
    assert b["shared_vs_plain_step_s"] == pytest.approx(b["step_s"] / b["plain_step_s"])
    configs = {side: json.load(open(os.path.join(out, side, "config.json"))) for side in ("ours", "ours_plain")}
    assert configs["ours"]["shared_prefix"] is True and configs["ours_plain"]["shared_prefix"] is False
    assert all(c["dataset"] == os.path.join(out, "gsm8k_length.jsonl") for c in configs.values())
