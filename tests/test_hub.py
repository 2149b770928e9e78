"""The path a user types: Hub ids for the model and the dataset, resolved offline through Hub-layout
caches in a temporary HF_HOME; and one clear line, with no retry spam, when the Hub is out of reach."""
import json
import os
import subprocess
import sys

import pytest

import hub_layout
from engine import lab

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--prompts_per_step", "2", "--num_generations", "2", "--max_completion_length", "8", "--max_steps", "1",
         "--eval_limit", "2", "--lora_r", "4", "--lora_alpha", "8"]


def run(script, *args, **env):
    e = {**os.environ, **env}
    for k, v in env.items():
        if v is None:
            e.pop(k)
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, env=e)


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory):
    """HF_HOME holding Qwen/Qwen2.5-1.5B-Instruct (the tiny warm model under that name) and openai/gsm8k."""
    home = str(tmp_path_factory.mktemp("hf_home"))
    hub_layout.model_cache(home, "Qwen/Qwen2.5-1.5B-Instruct", lab.warm_start_path("tiny"))
    rows = {split: [{"question": f"What is {i}+{i}?", "answer": f"{i} plus {i}\n#### {2 * i}"} for i in range(n)]
            for split, n in (("train", 6), ("test", 3))}
    hub_layout.dataset_cache(home, "openai/gsm8k", "main", rows, str(tmp_path_factory.mktemp("parquet")))
    return home


def test_default_train_and_eval_resolve_hub_ids_offline(hf_home, tmp_path):
    # `python train.py` with the default --model and --dataset (only sizes shrunk), through
    # from_pretrained and load_dataset, with the Hub offline: everything comes from the caches
    out = str(tmp_path / "run")
    p = run("train.py", *SMALL, "--output_dir", out, HF_HOME=hf_home, HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=None)
    assert p.returncode == 0, p.stderr[-3000:]
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert (cfg["model"], cfg["dataset"]) == ("Qwen/Qwen2.5-1.5B-Instruct", "gsm8k")
    adapter = json.load(open(os.path.join(out, "adapter_config.json")))
    assert adapter["base_model_name_or_path"] == "Qwen/Qwen2.5-1.5B-Instruct"
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert len(rows) == 1 and "eval/accuracy" in rows[0]
    ev = str(tmp_path / "eval")
    p = run("eval.py", "--adapter", out, "--limit", "2", "--max_completion_length", "8", "--output_dir", ev,
            HF_HOME=hf_home, HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=None)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.load(open(os.path.join(ev, "results.json")))
    assert res["n_questions"] == 2 and res["settings"]["model"] == "Qwen/Qwen2.5-1.5B-Instruct"


@pytest.mark.parametrize("prog", ["train.py", "eval.py"])
def test_unreachable_hub_is_one_line(prog, tmp_path):
    # A closed port on this machine stands in for a Hub that cannot be reached.
    env = dict(HF_HOME=str(tmp_path / "empty"), HF_HUB_OFFLINE=None, HF_DATASETS_OFFLINE=None,
               HF_ENDPOINT="http://127.0.0.1:9")
    p = run(prog, "--model", "Qwen/Qwen2.5-0.5B-Instruct", "--dataset", "tiny", "--output_dir",
            str(tmp_path / "o"), **env)
    assert p.returncode == 2
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --model Qwen/Qwen2.5-0.5B-Instruct: cannot reach the Hugging Face Hub"), last
    assert "--model" in last and "--preset lab" in last
    assert "Retry" not in p.stderr and "Traceback" not in p.stderr
    assert not os.path.exists(tmp_path / "o")
    # the named dataset, likewise
    p = run(prog, "--model", "tiny", "--dataset", "gsm8k", "--output_dir", str(tmp_path / "o"), **env)
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 2 and last.startswith("error: --dataset gsm8k: cannot reach the Hugging Face Hub"), last
    assert "Retry" not in p.stderr and not os.path.exists(tmp_path / "o")


def test_offline_and_not_cached_is_one_line(tmp_path):
    p = run("train.py", "--model", "Qwen/Qwen2.5-0.5B-Instruct", "--output_dir", str(tmp_path / "o"),
            HF_HOME=str(tmp_path / "empty"), HF_HUB_OFFLINE="1")
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 2 and "not in the local Hugging Face cache" in last and "--preset lab" in last, last
    # the CPU hint comes before anything slow: it is printed, and the data was never loaded
    assert "Traceback" not in p.stderr


def test_folder_like_names_are_not_hub_ids(tmp_path):
    for name in (str(tmp_path / "nope"), "./nope", "a/b/c"):
        p = run("train.py", "--preset", "tiny", "--model", name, "--output_dir", str(tmp_path / "o"))
        last = p.stderr.strip().splitlines()[-1]
        assert p.returncode == 2 and f"--model {name}: no such folder" in last, last
