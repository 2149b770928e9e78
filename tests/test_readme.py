"""The README's offline commands run as written, and every train.py flag is documented there."""
import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md")).read()


def test_offline_commands_run(tmp_path):
    block = README.split("<!-- offline-commands -->")[1].split("<!-- /offline-commands -->")[0]
    commands = [line for line in block.splitlines() if line.startswith("python ")]
    assert len(commands) >= 4
    for f in os.listdir(ROOT):                       # run in a scratch copy: runs/ lands there
        if f.endswith(".py"):
            shutil.copy(os.path.join(ROOT, f), tmp_path)
    for cmd in commands:
        p = subprocess.run([sys.executable, *shlex.split(cmd)[1:]], cwd=tmp_path, capture_output=True, text=True)
        assert p.returncode == 0, f"{cmd}\n{p.stderr[-3000:]}"
    steps = [int(re.search(r'"step": (\d+)', line).group(1)) for line in open(tmp_path / "runs/tiny/metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert (tmp_path / "runs/tiny-eval/results.json").exists() and (tmp_path / "runs/tiny.png").exists()


def test_every_flag_is_in_the_readme():
    import train
    for f in dataclasses.fields(train.Config):
        assert f"`--{f.name}`" in README, f"--{f.name} is not documented in README.md"


def test_readme_defaults_match_the_code():
    import train
    c = train.Config()
    rows = {m.group(1): m.group(2) for m in re.finditer(r"\| `--(\w+)` \| `?([^|`]+?)`? \|", README)}
    for name, shown in rows.items():
        if hasattr(c, name) and getattr(c, name) is not None and not isinstance(getattr(c, name), bool):
            assert str(getattr(c, name)) == shown or float(getattr(c, name)) == float(shown), (name, shown)
