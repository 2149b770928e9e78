"""The README's commands: the offline ones run as written, the others parse; its tables match the code."""
import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

import cegppo
import eval as eval_script
import microscope
import train
from engine import cli, errors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md")).read()


def block(name):
    return README.split(f"<!-- {name} -->")[1].split(f"<!-- /{name} -->")[0]


DOCS = "\n".join(open(os.path.join(ROOT, "docs", f)).read() for f in sorted(os.listdir(os.path.join(ROOT, "docs")))
                 if f.endswith(".md"))


def commands(prog):
    """Every `python <prog> ...` line of the code blocks of the README and docs/*.md, as argument lists
    (comments dropped)."""
    code = "\n".join(re.findall(r"```bash\n(.*?)```", README + DOCS, re.S))
    return [shlex.split(line, comments=True)[2:] for line in code.splitlines() if line.startswith(f"python {prog} ")]


def test_offline_commands_run(tmp_path):
    cmds = [line for line in block("offline-commands").splitlines() if line.startswith("python ")]
    assert len(cmds) >= 5
    for f in os.listdir(ROOT):                       # run in a scratch copy: runs/ lands there
        if f.endswith(".py"):
            shutil.copy(os.path.join(ROOT, f), tmp_path)
    shutil.copytree(os.path.join(ROOT, "engine"), tmp_path / "engine", ignore=shutil.ignore_patterns("__pycache__"))
    for cmd in cmds:
        p = subprocess.run([sys.executable, *shlex.split(cmd)[1:]], cwd=tmp_path, capture_output=True, text=True)
        assert p.returncode == 0, f"{cmd}\n{p.stderr[-3000:]}"
    steps = [int(re.search(r'"step": (\d+)', line).group(1)) for line in open(tmp_path / "runs/tiny/metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert (tmp_path / "runs/tiny-eval/results.json").exists() and (tmp_path / "runs/tiny.png").exists()
    assert (tmp_path / "runs/microscope/microscope.json").exists()


def test_ci_runs_the_readmes_test_command():
    # .ci/run installs from the repo's files, then runs exactly what the README tells a user to run
    command = block("test-command").split("```bash\n")[1].split("```")[0].strip()
    ci = [line.replace("python3 ", "python ") for line in open(os.path.join(ROOT, ".ci", "run")).read().splitlines()
          if line.startswith("python3 -m ") and "pip" not in line]
    assert " && ".join(ci) == command == "python -m ruff check . && python -m pytest -q tests"
    assert os.path.isfile(os.path.join(ROOT, "ruff.toml"))


def test_every_train_and_eval_command_parses():
    # the commands that need a GPU or the Hub cannot run here, but each one's flags must be valid
    assert len(commands("train.py")) >= 10 and len(commands("eval.py")) >= 4
    for args in commands("train.py"):
        train.parse_config(args)
    parser = cli.dataclass_parser(eval_script.EvalConfig, "eval")
    for args in commands("eval.py"):
        eval_script.EvalConfig(**vars(parser.parse_args(args)))
    for args in commands("microscope.py"):
        microscope.parse_args(args)


def test_the_flags_page_is_the_config():
    # docs/flags.md is generated from train.Config: every flag, its default (every algorithm's value
    # for the loss knobs) and its one-line help; rewrite it with cli.write_flags_page(train.Config)
    page = open(os.path.join(ROOT, "docs", "flags.md")).read()
    assert page == cli.flags_page(train.Config), \
        "docs/flags.md is stale: python -c 'import train; from engine import cli; cli.write_flags_page(train.Config)'"
    for f in dataclasses.fields(train.Config):
        row = next(line for line in page.splitlines() if f"| `--{f.name}` |" in line)
        assert f"| {cli.default_text(f)} |" in row and f.metadata["help"].replace("|", "/") in row
    assert "| cegppo 0.5, grpo 0, dapo 0, gppo 1, cispo - |" in page         # --beta1, per algorithm


def test_algorithm_table_matches_algos():
    rows = [r for r in block("algos").splitlines() if r.startswith("| `") and "--" not in r]
    assert len(rows) == len(cegppo.ALGOS)
    for r in rows:
        cells = [c.strip() for c in r.strip("|").split("|")]
        algo = re.match(r"`(\w+)`", cells[0]).group(1)
        knobs = ["beta1", "beta2", "epsilon_low", "epsilon_high", "dual_clip"]
        assert [None if c == "-" else float(c) for c in cells[1:]] == [cegppo.ALGOS[algo][k] for k in knobs], algo


@pytest.mark.parametrize("algo", list(cegppo.ALGOS))
def test_algo_flag_fills_in_its_knobs(algo):
    cfg = train.parse_config(["--algo", algo])
    assert {k: getattr(cfg, k) for k in cegppo.ALGOS[algo]} == cegppo.ALGOS[algo]
    if cegppo.ALGOS[algo]["beta1"] is None:                          # CISPO has no betas: refused in one line
        with pytest.raises(errors.UserError, match="--beta1: --algo cispo has no such knob"):
            train.parse_config(["--algo", algo, "--beta1", "0.25"])
        # a preset's clip range is not CISPO's: the knobs it does not have stay unset under --preset lab
        cfg = train.parse_config(["--preset", "lab", "--algo", algo])
        assert (cfg.epsilon_low, cfg.dual_clip, cfg.epsilon_high) == (None, None, 0.1)
        return
    cfg = train.parse_config(["--algo", algo, "--beta1", "0.25"])     # an explicit flag wins
    assert cfg.beta1 == 0.25
