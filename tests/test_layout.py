"""The project's shape: the classroom (the top level: the few scripts the project promises, cegppo.py and train.py
within their budgets) and the engine room (engine/: the machinery), no import circles, the algorithm importing
nothing of the project, and no file but the tests importing train.py."""
import ast
import os
import subprocess
import sys

import torch
from engine import models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the top level's scripts by name, the engine's modules as engine.<name>
MODULES = sorted([f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")] +
                 [f"engine.{f[:-3]}" for f in os.listdir(os.path.join(ROOT, "engine"))
                  if f.endswith(".py") and f != "__init__.py"])


def path_of(module):
    return os.path.join(ROOT, *module.split(".")) + ".py"


def project_imports(module):
    """The project modules that `module` imports, anywhere in the file."""
    tree = ast.parse(open(path_of(module)).read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
            names.add(node.module.split(".")[0])
    return names & set(MODULES)


def test_no_import_circles():
    graph = {m: project_imports(m) for m in MODULES}
    assert graph["cegppo"] == set()
    assert "train" not in graph["eval"]

    def visit(m, path):
        assert m not in path, "import circle: " + " -> ".join([*path, m])
        for n in graph[m]:
            visit(n, [*path, m])
    for m in MODULES:
        visit(m, [])


# The scripts a user runs, the algorithm, the TRL bridge: what the top level holds (engine/ holds the rest).
TOP_LEVEL = {"cegppo", "train", "eval", "plot", "microscope", "memory", "gpu_check", "trl_cegppo"}
# A learner reads cegppo.py, then train.py: the algorithm and the loop, within their budgets (lines), and
# the loop's body within about a screen.
BUDGETS = {"cegppo.py": 560, "train.py": 450, "README.md": 240}
LOOP_BODY = 35


def test_the_top_level_is_the_few_scripts_the_project_promises():
    assert {m for m in MODULES if "." not in m} == TOP_LEVEL and len(TOP_LEVEL) <= 8
    for name, budget in BUDGETS.items():
        lines = len(open(os.path.join(ROOT, name)).read().splitlines())
        assert lines <= budget, f"{name}: {lines} lines, over its budget of {budget}: machinery belongs in engine/"
    # train()'s loop, from its `while` to the line before its `return`
    lines = open(os.path.join(ROOT, "train.py")).read().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("    while "))
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("    return "))
    assert end - start - 1 <= LOOP_BODY, f"the loop body is {end - start - 1} lines"
    # the loop's steps hold no machinery: no try/except, CUDA, progress bars or prints of their own
    body = "\n".join(lines)
    for word in ("try:", "except ", "torch.cuda", "tqdm", "print(", "synchronize"):
        assert word not in body, f"train.py holds {word!r}: machinery belongs in engine/"


def test_only_the_tests_import_train_and_the_engine_imports_no_script():
    graph = {m: project_imports(m) for m in MODULES}
    assert [m for m, imported in graph.items() if "train" in imported] == []
    for m in MODULES:
        if m.startswith("engine."):
            assert graph[m] <= {"cegppo"} | {n for n in MODULES if n.startswith("engine.")}, (m, graph[m])
    for name in os.listdir(os.path.join(ROOT, "examples")):       # the TRL example too
        code = open(os.path.join(ROOT, "examples", name)).read()
        assert "import train" not in code and "from train " not in code, name


def test_cegppo_alone_in_a_fresh_interpreter():
    # importing the algorithm loads no other module of the project (nothing hidden in a function call)
    code = (f"import sys; sys.path.insert(0, {ROOT!r}); import cegppo; "
            f"print(sorted(m for m in sys.modules if m in {MODULES!r} or m == 'engine'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['cegppo']"


def test_threads_default_and_override(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert models.set_threads(0) == 1 and torch.get_num_threads() == 1
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert models.set_threads(0) == len(os.sched_getaffinity(0))
        assert models.set_threads(2) == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
