"""The command line: train.py's Config from flags (presets, --algo's knobs, the checks), the flags page,
and the one error type.

    parse_config            flags -> a Config: a preset's defaults, the flags, --algo's loss knobs, then
                            every range checked; --print_config prints the result as JSON and exits
    PRESETS                 --preset's defaults (the offline smoke run, the CPU lab)
    resolved_config         a train.py command's Config, for a tool that measures train.py (python train.py
                            --print_config in a process of its own: no tool imports train.py)
    dataclass_parser        one --flag per field of a config dataclass, its help the field's one line
    flags_markdown, flags_page   the flags as a Markdown table (docs/flags.md)
"""

import argparse
import dataclasses
import inspect
import json
import os
import re
import subprocess
import sys
from types import SimpleNamespace
from typing import Literal, get_args, get_origin

import torch

import cegppo
from engine import models
from engine.errors import UserError


def _bool(text):
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def dataclass_parser(cls, description, default_text=None, choices=None):
    """argparse for a config dataclass: one flag per field, its help the field's one-line metadata
    plus its real default (default_text(field) where given). Flags not given stay out of the
    namespace, so a caller can layer them over presets. A bool field also gets --no_<name>.
    Every flag is spelled with underscores (--output_dir); the dashed spelling (--output-dir) is
    accepted too."""
    ap = argparse.ArgumentParser(description=description, argument_default=argparse.SUPPRESS)
    for f in dataclasses.fields(cls):
        shown = default_text(f) if default_text else ("unset" if f.default is None else str(f.default))
        help = f"{f.metadata['help']} (default: {shown})"
        names = list(dict.fromkeys([f"--{f.name}", f"--{f.name.replace('_', '-')}"]))
        if f.type is bool:
            ap.add_argument(*names, dest=f.name, type=_bool, nargs="?", const=True, metavar="BOOL", help=help)
            ap.add_argument(f"--no_{f.name}", dest=f.name, action="store_false", help=f"same as --{f.name} false")
        elif get_origin(f.type) is Literal or f.name in (choices or {}):
            ap.add_argument(*names, dest=f.name, choices=(choices or {}).get(f.name) or get_args(f.type), help=help)
        else:
            typ = next((t for t in get_args(f.type) if t is not type(None)), f.type)   # Optional[X] -> X
            ap.add_argument(*names, dest=f.name, type=typ, metavar=typ.__name__.upper(), help=help)
    return ap


def flags_markdown(cls, default_text=None):
    """The flags of a config dataclass as a Markdown table, grouped by the `# group` comments of its
    source (docs/flags.md is this, for train.py's Config; a test keeps the two equal)."""
    fields, group, rows = {f.name: f for f in dataclasses.fields(cls)}, "", []
    for line in inspect.getsource(cls).splitlines():
        head = re.match(r"\s+# (.+)$", line)
        name = re.match(r"\s+(\w+):", line)
        if head:
            group = head.group(1).split(":")[0]
        elif name and name.group(1) in fields:
            f = fields[name.group(1)]
            shown = default_text(f) if default_text else ("unset" if f.default is None else str(f.default))
            rows.append(f"| {group} | `--{f.name}` | {shown} | {f.metadata['help'].replace('|', '/')} |")
            group = ""
    return "\n".join(["| group | flag | default | meaning |", "|---|---|---|---|", *rows]) + "\n"


# --preset NAME changes the defaults; flags on the command line still win.
PRESETS = {
    # the offline smoke run; `--model tiny` picks it when no other preset is named
    "tiny": dict(model="tiny", dataset="tiny", lora_r=8, lora_alpha=16, prompts_per_step=4, num_generations=4,
                 max_completion_length=28, steps_per_generation=2, micro_batch_size=8, learning_rate=5e-3,
                 warmup_steps=1, weight_decay=0.0, max_steps=4, eval_steps=2, eval_limit=8, save_steps=2,
                 output_dir="runs/tiny"),
    "lab": dict(model="lab", dataset="lab", lora_r=32, lora_alpha=64, gradient_checkpointing=False,
                prompts_per_step=8, num_generations=8, max_completion_length=28, max_prompt_length=256,
                steps_per_generation=8, num_iterations=2, micro_batch_size=32, learning_rate=5e-5, warmup_steps=10,
                epsilon_low=0.1, epsilon_high=0.1, weight_decay=0.0, max_steps=200, eval_steps=25, eval_limit=140,
                save_steps=50, logging_steps=10, output_dir="runs/lab"),
    # the lab with headroom (engine/lab.py's carry task): the lab's model and settings, longer answers, and at
    # each evaluation pass@1, 4 and 16 from 16 samples of each held-out question
    "carry": dict(model="carry", dataset="carry", lora_r=32, lora_alpha=64, gradient_checkpointing=False,
                  prompts_per_step=8, num_generations=8, max_completion_length=40, max_prompt_length=256,
                  steps_per_generation=8, num_iterations=2, micro_batch_size=32, learning_rate=2e-5, warmup_steps=10,
                  epsilon_low=0.1, epsilon_high=0.1, weight_decay=0.0, max_steps=100, eval_steps=25, eval_limit=140,
                  eval_samples=16, eval_pass_k="1,4,16", save_steps=50, logging_steps=10, output_dir="runs/carry"),
}

# Flags that may change between a run and its --resume (a run folder may move); any other difference is refused.
RESUME_MAY_CHANGE = {"resume", "seeds", "jobs", "output_dir", "max_steps", "save_steps", "eval_steps", "logging_steps", "wandb",
                     "eval_samples", "eval_temperature", "eval_pass_k",
                     "generation_batch_size", "threads", "rollout_model", "dtype",
                     "collapse_patience", "progress", "token_groups"}
AT_LEAST_1 = ("prompts_per_step", "num_generations", "max_completion_length", "steps_per_generation", "num_iterations",
              "micro_batch_size", "max_steps", "logging_steps", "eval_steps", "save_steps", "generation_batch_size",
              "max_prompt_length", "lora_r", "lora_alpha", "max_generation_rounds", "jobs")


def default_text(f):
    """What --help shows as a flag's default: the algorithms' values for the loss knobs (- where unused)."""
    if f.name in cegppo.ALGOS["cegppo"]:
        return ", ".join(f"{a} {'-' if v[f.name] is None else format(v[f.name], 'g')}" for a, v in cegppo.ALGOS.items())
    return "unset" if f.default is None else str(f.default)


def parse_config(config_cls, argv=None):
    """A `config_cls` (train.py's Config) from flags: a preset's defaults, then the flags, then --algo's loss
    knobs (cegppo.ALGOS), then checks. --print_config prints it as JSON and exits (resolved_config)."""
    parser = dataclass_parser(config_cls, "Train a Qwen2.5 model (4-bit NF4 + LoRA) on verifiable math with CE-GPPO, on one GPU.",
                              default_text, {"preset": list(PRESETS), "algo": list(cegppo.ALGOS),
                                             "sampler_correction": list(cegppo.SAMPLER_CORRECTIONS)})
    parser.add_argument("--print_config", action="store_true", help="print the configuration these flags give, as "
                        "JSON, and exit (nothing is loaded or written)")
    given = vars(parser.parse_args(sys.argv[1:] if argv is None else argv))
    show = given.pop("print_config", False)
    preset = given.get("preset") or ("tiny" if given.get("model") == "tiny" else None)
    cfg = config_cls(**{**PRESETS.get(preset, {}), **given, "preset": preset})
    for k, v in cegppo.ALGOS[cfg.algo].items():
        if v is None and k in given:                     # a knob this algorithm's loss does not have
            raise UserError(f"--{k}: --algo {cfg.algo} has no such knob (its loss uses only "
                            f"{', '.join('--' + n for n, x in cegppo.ALGOS[cfg.algo].items() if x is not None)})")
        if v is None or getattr(cfg, k) is None:         # unused knobs stay unset, even where a preset sets them
            setattr(cfg, k, v)
    check_config(cfg)
    if cfg.seeds:
        seed_list(cfg.seeds)
    if show:
        print(json.dumps(dataclasses.asdict(cfg)))
        sys.exit(0)
    return cfg


def check_config(cfg):
    """Every range a flag must be in; one line naming the flag when it is not."""
    def need(ok, name, what):
        if not ok:
            raise UserError(f"--{name} {getattr(cfg, name)}: {what}")
    for name in AT_LEAST_1:
        need(getattr(cfg, name) >= 1, name, "must be at least 1")
    need(cfg.num_generations >= 2, "num_generations", "a group needs at least 2 completions")
    for name in ("beta1", "beta2", "sft_coef", "weight_decay", "warmup_steps", "eval_limit", "threads",
                 "collapse_patience"):
        need(getattr(cfg, name) is None or getattr(cfg, name) >= 0, name, "must be >= 0")   # None: unused
    for name in ("epsilon_low", "epsilon_high"):
        need(getattr(cfg, name) is None or 0 <= getattr(cfg, name) < 1 or cfg.algo == "cispo", name,
             "must be in [0, 1)")
    need(cfg.algo != "cispo" or cfg.epsilon_high > 0, "epsilon_high", "CISPO's weight cap 1 + eps must be above 1")
    need(cfg.dual_clip is None or cfg.dual_clip == 0 or cfg.dual_clip > 1, "dual_clip",
         "must be 0 (off) or greater than 1")
    need(0 < cfg.top_p <= 1, "top_p", "must be in (0, 1]")
    need(cfg.temperature > 0, "temperature", "RL sampling needs a temperature > 0")
    need(cfg.learning_rate > 0, "learning_rate", "must be > 0")
    need(cfg.max_grad_norm > 0, "max_grad_norm", "must be > 0")
    need(cfg.sampler_correction_cap >= 1, "sampler_correction_cap", "must be at least 1 (1 = no mismatch allowed)")
    if cfg.entropy_target is not None:
        need(cfg.entropy_target > 0, "entropy_target", "must be > 0 (nats per token)")
        need(cfg.algo != "cispo", "entropy_target", "--algo cispo has no betas to move")
    need(cfg.eval_samples >= 0, "eval_samples", "must be >= 0")
    need(cfg.eval_temperature > 0, "eval_temperature", "pass@k samples need a temperature > 0")
    if cfg.eval_samples:
        pass_k_list(cfg.eval_pass_k, cfg.eval_samples, "--eval_pass_k")
    elif cfg.eval_pass_k:
        raise UserError(f"--eval_pass_k {cfg.eval_pass_k}: needs --eval_samples (the completions per question it counts)")
    if cfg.dtype == "bf16" and torch.cuda.is_available() and not models.native_bf16():   # the rule of compute_dtype
        raise UserError("--dtype bf16: this GPU has no native bf16 (compute capability below 8.0); "
                        "use --dtype fp16 (loss-scaled) or auto")


def pass_k_list(text, k, flag):
    """The j of `flag` (comma-separated integers, each in 1..k), or by default 1, 2, 4, ... up to k, and k."""
    if not text:
        return sorted({2 ** i for i in range(k.bit_length()) if 2 ** i <= k} | {k})
    try:
        js = sorted({int(j) for j in text.split(",") if j.strip()})
    except ValueError:
        raise UserError(f"{flag} {text}: expected comma-separated integers, e.g. 1,4,16") from None
    if not js or js[0] < 1 or js[-1] > k:
        raise UserError(f"{flag} {text}: each must be between 1 and the samples per question ({k})")
    return js


def seed_list(text):
    """--seeds' integers."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds {text}: expected comma-separated integers, e.g. 1,2,3") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds {text}: expected distinct comma-separated integers, e.g. 1,2,3")
    return seeds


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))      # the project
FLAGS_PAGE = os.path.join(ROOT, "docs", "flags.md")


def flags_page(config_cls):
    """docs/flags.md: every flag with its default, generated from Config (a test keeps the file equal)."""
    head = open(FLAGS_PAGE).read().split("| group | flag |")[0] if os.path.exists(FLAGS_PAGE) else "# flags\n\n"
    return head + flags_markdown(config_cls, default_text)


def write_flags_page(config_cls):
    with open(FLAGS_PAGE, "w") as f:
        f.write(flags_page(config_cls))


def resolved_config(argv):
    """The Config a `python train.py ARGV` command runs with, as an object with its fields: train.py asked in a
    process of its own (--print_config), so that a tool that measures train.py (memory.py, bench, gpu_check)
    does not import it. A bad flag is train.py's own one-line error."""
    p = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *argv, "--print_config"],
                       capture_output=True, text=True)
    if p.returncode != 0:
        lines = p.stderr.strip().splitlines()
        raise UserError(lines[-1].removeprefix("error: ") if lines else f"train.py exited {p.returncode}")
    return SimpleNamespace(**json.loads(p.stdout.strip().splitlines()[-1]))
