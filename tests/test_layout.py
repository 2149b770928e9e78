"""The project's shape: no import circles, and cegppo.py (the algorithm) imports nothing of the project."""
import ast
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = sorted(f[:-3] for f in os.listdir(ROOT) if f.endswith(".py"))


def project_imports(module):
    """The project modules that `module`.py imports, anywhere in the file."""
    tree = ast.parse(open(os.path.join(ROOT, module + ".py")).read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
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


def test_cegppo_alone_in_a_fresh_interpreter():
    # importing the algorithm loads no other module of the project (nothing hidden in a function call)
    code = f"import sys; sys.path.insert(0, {ROOT!r}); import cegppo; print(sorted(m for m in sys.modules if m in {MODULES!r}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['cegppo']"


def test_threads_default_and_override(monkeypatch):
    import loading
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert loading.set_threads(0) == 1 and torch.get_num_threads() == 1
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert loading.set_threads(0) == len(os.sched_getaffinity(0))
        assert loading.set_threads(2) == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
