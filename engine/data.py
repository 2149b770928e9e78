"""The data: named datasets from the Hub, the offline tasks built in code, local files -> [(question, answer)].

    load_rows       a named dataset, a built-in toy task or a local file -> [(question, answer)]
    load_data       a train.py Config's training rows and its fixed held-out subset
    usable_prompts  the chat-formatted prompts that fit --max_prompt_length (the others counted)
"""

import os
import sys

from huggingface_hub import constants as hub_constants
from huggingface_hub import try_to_load_from_cache

import cegppo
from engine import lab
from engine.errors import UserError
from engine.models import CPU_HINT, hub_reachable


# ----------------------------------------------------------------------------------------------
# The data
# ----------------------------------------------------------------------------------------------
# Named datasets: (Hub id, config, split for training, split for evaluation, question field, answer
# field). An answer field holding a worked solution (MATH's) gives its last \boxed{} (load_rows).
DATASETS = {
    "gsm8k": ("openai/gsm8k", "main", "train", "test", "question", "answer"),
    "math": ("DigitalLearningGmbH/MATH-lighteval", "default", "train", "test", "problem", "solution"),
    "math500": ("HuggingFaceH4/MATH-500", None, "test", "test", "problem", "answer"),
    "aime24": ("HuggingFaceH4/aime_2024", None, "train", "train", "problem", "answer"),
}
LOCAL_FILE = (".jsonl", ".json", ".parquet")


def load_rows(dataset, split="train", question_field=None, answer_field=None, limit=None):
    """[(question, answer), ...] from a named dataset (DATASETS, or lab.TASKS built in code: tiny, lab, carry)
    or a local .jsonl / .json / .parquet file. A missing or empty field stops with a UserError
    naming the file, the row and the field."""
    if dataset in lab.TASKS:
        return lab.rows(dataset, split)[:limit]
    if dataset in DATASETS:
        ds, qf, af, where = _hub_dataset(dataset, split)
    elif dataset.endswith(LOCAL_FILE):
        ds, qf, af, where = _local_dataset(dataset)
    else:
        raise UserError(f"--dataset {dataset}: unknown; use one of {', '.join([*lab.TASKS, *DATASETS])} "
                        "or a .jsonl / .json / .parquet file")
    qf, af = question_field or qf, answer_field or af
    rows = []
    for i, row in enumerate(ds):
        if limit is not None and i >= limit:
            break
        for f in (qf, af):
            v = row.get(f)
            if v is None or not str(v).strip():
                raise UserError(f"{where}: row {i}: field '{f}' is missing or empty")
        # A worked solution (MATH's, or a user's file) states its answer in its last \\boxed{}: that is
        # the reference; the whole solution would never equal a completion's boxed answer.
        answer = cegppo.extract_boxed(str(row[af])) or str(row[af])
        rows.append((str(row[qf]), answer))
    return rows


def _datasets(what):
    """The `datasets` package, imported here and not at the top: the built-in tasks (tiny, lab) need
    none, so train.py runs on a bare GPU image without it and its pyarrow and pandas (docs/gpu.md)."""
    try:
        import datasets
    except ImportError:
        raise UserError(f"--dataset {what}: reading it needs the datasets package (pip install datasets)") from None
    return datasets


def _hub_dataset(dataset, split):
    datasets = _datasets(dataset)
    load_dataset = datasets.load_dataset
    hub, cfg, train_split, eval_split, qf, af = DATASETS[dataset]
    prepared = os.path.join(datasets.config.HF_DATASETS_CACHE, hub.replace("/", "___"))   # datasets' own cache
    cached = os.path.isdir(prepared) or isinstance(try_to_load_from_cache(hub, "README.md", repo_type="dataset"), str)
    if not cached and not hub_constants.HF_HUB_OFFLINE and not hub_reachable():
        raise UserError(f"--dataset {dataset}: cannot reach the Hugging Face Hub to download {hub}; pass a "
                        f"local .jsonl / .json / .parquet file with --dataset, or {CPU_HINT}")
    try:
        ds = load_dataset(hub, cfg, split=train_split if split == "train" else eval_split)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(f"--dataset {dataset}: cannot load {hub} ({type(e).__name__}: {first}); offline, pass "
                        f"a local .jsonl / .json / .parquet file, or {CPU_HINT}") from e
    return ds, qf, af, hub


def _local_dataset(path):
    if not os.path.isfile(path):
        raise UserError(f"--dataset {path}: no such file")
    load_dataset = _datasets(path).load_dataset
    kind = "parquet" if path.endswith(".parquet") else "json"
    try:
        ds = load_dataset(kind, data_files=path, split="train")
    except Exception as e:
        raise UserError(f"--dataset {path}: cannot read it as {kind} ({type(e).__name__})") from e
    return ds, "question", "answer", path


def load_data(cfg):
    """The training rows and the fixed held-out subset of a train.py Config: [(question, answer)] each."""
    train_rows = load_rows(cfg.dataset, "train", cfg.question_field, cfg.answer_field)
    eval_name = cfg.eval_dataset or (None if cfg.dataset.endswith(LOCAL_FILE) else cfg.dataset)
    eval_rows = []
    if eval_name and cfg.eval_limit > 0:
        eval_rows = load_rows(eval_name, "test", cfg.question_field, cfg.answer_field, cfg.eval_limit)
    return train_rows, eval_rows


def usable_prompts(cfg, tok, rows):
    """Chat-formatted (prompt, answer) pairs that fit --max_prompt_length; the others are counted."""
    formatted = [(cegppo.format_prompt(tok, q), a) for q, a in rows]
    prompts = [(p, a) for p, a in formatted if len(tok(p)["input_ids"]) <= cfg.max_prompt_length]
    if len(prompts) < len(formatted):
        print(f"skipped {len(formatted) - len(prompts)} prompts longer than --max_prompt_length "
              f"{cfg.max_prompt_length}", file=sys.stderr)
    if not prompts:
        raise UserError(f"--dataset {cfg.dataset}: no usable prompts")
    if len(prompts) < cfg.prompts_per_step:
        raise UserError(f"--dataset {cfg.dataset}: {len(prompts)} usable prompts, fewer than --prompts_per_step "
                        f"{cfg.prompts_per_step}; lower --prompts_per_step or add data")
    return prompts
