"""notebooks/cegppo.ipynb runs top to bottom on a CPU in smoke mode (tiny model built in code, offline).

The kernel runs in a temporary working directory, so runs/ and the figures land there; it inherits
the session's CEGPPO_CACHE and HF_HUB_OFFLINE from conftest.py through the environment.
"""
import html
import json
import os
import re

import nbformat
import pytest
from nbclient import NotebookClient
from test_token_page import CHROMIUM, chromium

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "cegppo.ipynb")


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    work = tmp_path_factory.mktemp("notebook")
    env = {"CEGPPO_NOTEBOOK_SMOKE": "1", "CEGPPO_ROOT": ROOT, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)                              # the kernel inherits this process's environment
    try:
        nb = nbformat.read(NOTEBOOK, as_version=4)
        NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(work)}}).execute()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return nb, work


def text_of(cell):
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


def test_every_cell_runs_and_shows_its_figures(executed):
    nb, work = executed
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    assert "smoke mode" in text_of(code[1])
    images = [c for c in code if any("image/png" in o.get("data", {}) for o in c.outputs)]
    assert len(images) == 4          # gradient weight, microscope, the first run's curves, the comparison
    for name in ("gradient_weight.png", "microscope.png", "compare.png"):
        assert os.path.getsize(work / name) > 1000


def test_loss_cell_recovers_the_gradient_weight(executed):
    nb, _ = executed
    out = text_of([c for c in nb.cells if c.cell_type == "code" and "weights[algo]" in c.source][0])
    rows = [line.split() for line in out.splitlines()[1:7]]
    for r in rows:
        f_grpo, f_ce, ref_grpo, ref_ce = float(r[3]), float(r[4]), float(r[6].rstrip(",")), float(r[7])
        assert f_grpo == pytest.approx(ref_grpo, abs=1e-3) and f_ce == pytest.approx(ref_ce, abs=1e-3)


def test_runs_land_in_the_working_directory(executed):
    _, work = executed
    for run in ("cegppo", "grpo", "cegppo-b1-1"):
        folder = work / "runs" / "notebook" / run
        assert (folder / "metrics.jsonl").is_file() and (folder / "adapter_config.json").is_file()
    assert not os.path.exists(os.path.join(ROOT, "runs", "notebook"))


def shown_token_page(nb):
    cell = next(c for c in nb.cells if c.cell_type == "code" and "tokens.html" in c.source)
    return "".join(o.get("data", {}).get("text/html", "") for o in cell.outputs)


def test_the_token_page_shows_inline(executed):
    nb, work = executed
    shown = shown_token_page(nb)
    assert shown.startswith("<iframe srcdoc=") and "What the update did to each token" in shown
    assert (work / "runs" / "notebook" / "cegppo" / "tokens.html").is_file()


# --dump-dom shows the parent page, not what its iframe drew: this script, once the frame has loaded,
# writes what the frame shows into the parent
INSIDE = """<script>
window.addEventListener("load", () => {
  const frame = document.querySelector("iframe").contentDocument, out = document.createElement("pre");
  out.id = "inside";
  out.textContent = JSON.stringify({ tokens: frame.querySelectorAll("#groups .tok[data-t]").length,
                                     counts: frame.getElementById("counts").textContent });
  document.body.appendChild(out);
});
</script>"""


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here (apt-get install chromium; .ci/run installs it)")
def test_the_token_page_draws_its_tokens_inside_the_iframe(executed, tmp_path):
    # the cell's output as the notebook shows it: the page in an about:srcdoc frame, which may not
    # change its address (history.replaceState throws there, as under Jupyter's http parent)
    nb, work = executed
    parent = tmp_path / "notebook.html"
    parent.write_text(f"<!DOCTYPE html><html><body>{shown_token_page(nb)}{INSIDE}</body></html>", encoding="utf-8")
    dom = chromium("--virtual-time-budget=5000", "--dump-dom", f"file://{parent}", tmp_path=tmp_path).stdout
    found = re.search(r'<pre id="inside">(.*?)</pre>', dom, re.S)
    assert found, dom[-2000:]
    inside = json.loads(html.unescape(found.group(1)))
    rows = [json.loads(line) for line in open(work / "runs" / "notebook" / "cegppo" / "tokens.jsonl")]
    last = rows[-1]                                                   # the page opens at the newest step
    n = sum(len(c["tokens"]) for g in last["groups"] for c in g["completions"])
    assert n > 0 and inside["tokens"] == n
    assert inside["counts"].startswith(f"step {last['step']}: {n} tokens")
