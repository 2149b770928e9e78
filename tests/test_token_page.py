"""tokens.jsonl and tokens.html: what the update did to each token of a real tiny run, recorded from the
loss's own numbers, and the page checked in a real browser (headless Chromium) for what a person sees."""
import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest

import plot
import token_page

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    # a large step and 4 updates per rollout, so that tokens reach both clip regions in 3 steps;
    # token_groups above the 4 groups a step keeps: the page shows every trained token
    out = str(tmp_path_factory.mktemp("tokens") / "run")
    p = subprocess.run([sys.executable, "train.py", "--model", "tiny", "--dataset", "tiny", "--max_steps", "3",
                        "--learning_rate", "2e-2", "--steps_per_generation", "4", "--token_groups", "8",
                        "--output_dir", out], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    return out


def steps(run):
    return plot.token_steps(run)


def metrics(run):
    return {r["step"]: r for r in map(json.loads, open(os.path.join(run, "metrics.jsonl")))}


def tokens_of(step):
    return [(g, c, t) for g, group in enumerate(step["groups"]) for c, comp in enumerate(group["completions"])
            for t in range(len(comp["tokens"]))]


def test_recorded_tokens_are_the_losss_numbers(run):
    rows, by_step = steps(run), metrics(run)
    assert rows and all(r["step"] in by_step for r in rows)
    low = high = 0
    for r in rows:
        m = by_step[r["step"]]
        assert len(r["groups"]) == m["generation/groups_kept"]             # whole groups, all of them here
        for group in r["groups"]:
            assert len(group["completions"]) == 4
            advantages = [c["advantage"] for c in group["completions"]]
            assert abs(sum(advantages)) < 1e-3                              # a group's advantages sum to 0
            for c in group["completions"]:
                n = len(c["tokens"])
                assert all(len(c[k]) == n for k in ("old_logp", "logp", "ratio", "entropy", "quadrant", "region", "F"))
                assert c["tokens"][-1] == "<|im_end|>" or n == 28          # the real EOS is a trained token
                for t in range(n):
                    r_t = math.exp(c["logp"][t] - c["old_logp"][t])
                    assert c["ratio"][t] == pytest.approx(r_t, rel=1e-3)   # r: 4 significant digits, logs 6
                    region, F = c["region"][t], c["F"][t]
                    # F of the gradient-weight figure: r inside, beta (1 -+ eps) in a region (beta1 0.5,
                    # beta2 1, eps 0.2: 0.4 and 1.2), 0 where the dual clip binds
                    want = {0: c["ratio"][t], 1: 0.4, 2: 1.2, 3: 0.0}[region]
                    assert F == pytest.approx(want, rel=2e-3)
                    if region == 1:
                        assert c["advantage"] < 0 and c["ratio"][t] < 0.8
                    if region == 2:
                        assert c["advantage"] > 0 and c["ratio"][t] > 1.2
                    low, high = low + (region == 1), high + (region == 2)
        # the page's counts, over every trained token, are the metrics row's fractions
        n = token_page_counts(r)
        assert n["low"] / n["tokens"] == pytest.approx(m["clip_ratio/low_mean"], abs=1e-6)   # float32 sums
        assert n["high"] / n["tokens"] == pytest.approx(m["clip_ratio/high_mean"], abs=1e-6)
        for k, q in enumerate(("pa_hp", "pa_lp", "na_hp", "na_lp")):
            assert n[f"q{k}"] / n["tokens"] == pytest.approx(m[f"quadrants/{q}_frac"], abs=1e-6)
    assert low > 0 and high > 0                                             # the run exercises both regions


def token_page_counts(step):
    n = {"tokens": 0, "low": 0, "high": 0, "dual": 0, "q0": 0, "q1": 0, "q2": 0, "q3": 0}
    for g, c, t in tokens_of(step):
        comp = step["groups"][g]["completions"][c]
        n["tokens"] += 1
        if comp["region"][t] > 0:
            n[("none", "low", "high", "dual")[comp["region"][t]]] += 1
        if comp["quadrant"][t] >= 0:
            n[f"q{comp['quadrant'][t]}"] += 1
    return n


def test_samples_jsonl_is_as_before(run):
    for line in open(os.path.join(run, "samples.jsonl")):
        assert set(json.loads(line)) == {"step", "prompt", "completion", "answer", "reward"}


def test_plot_writes_the_page_and_refuses_a_folder_without_tokens(run, tmp_path):
    page = os.path.join(run, "tokens.html")
    os.remove(page)
    p = subprocess.run([sys.executable, "plot.py", "--tokens", run], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0 and os.path.getsize(page) > 10_000
    html = open(page).read()
    assert "http://" not in html and "https://" not in html and "<script src" not in html and "@import" not in html
    p = subprocess.run([sys.executable, "plot.py", "--tokens", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 2 and "no tokens.jsonl" in p.stderr


def chromium(*args, tmp_path):
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


SPAN = re.compile(r'<span class="([^"]+)" tabindex="0" data-g="(\d+)" data-c="(\d+)" data-t="(\d+)">')


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here (apt-get install chromium; .ci/run installs it)")
def test_the_page_shows_what_the_loss_did_in_a_real_browser(run, tmp_path):
    import matplotlib.image
    page = os.path.join(run, "tokens.html")
    for step in steps(run):
        dom = chromium("--dump-dom", f"file://{page}#step={step['step']}", tmp_path=tmp_path).stdout
        spans = {(int(g), int(c), int(t)): cls.split() for cls, g, c, t in SPAN.findall(dom)}
        # one coloured token per completion token of the logged groups, each with its quadrant's class
        assert sorted(spans) == tokens_of(step)
        for (g, c, t), cls in spans.items():
            comp = step["groups"][g]["completions"][c]
            q, region = comp["quadrant"][t], comp["region"][t]
            assert f"q{q}" in cls
            # the clip regions by shape: low and high told apart without colour
            assert ("low" in cls) == (region == 1) and ("high" in cls) == (region == 2)
            if region in (1, 2):                     # CE-GPPO gave these tokens their gradient back
                assert "restored" in cls and "dropped" not in cls
        # the line of counts says what the data says
        counts = re.search(r'<div id="counts"([^>]*)>(.*?)</div>', dom)
        attrs = dict(re.findall(r'data-(\w+)="(\d+)"', counts.group(1)))
        assert {k: int(v) for k, v in attrs.items()} == token_page_counts(step)
        assert counts.group(2).startswith(f"step {step['step']}: {len(tokens_of(step))} tokens in {len(step['groups'])} groups")
    # on the screenshot, every quadrant present in the step has its colour
    step = steps(run)[0]
    png = tmp_path / "page.png"
    chromium("--window-size=1200,3000", "--hide-scrollbars", f"--screenshot={png}",
             f"file://{page}#step={step['step']}", tmp_path=tmp_path)
    pixels = (matplotlib.image.imread(str(png))[..., :3] * 255).round().astype(int)
    below_legend = pixels[300:]                  # the bar on top shows every colour in its legend
    seen = {tuple(p) for p in below_legend.reshape(-1, 3)}
    present = {step["groups"][g]["completions"][c]["quadrant"][t] for g, c, t in tokens_of(step)}
    assert len(present) >= 3
    for q in range(4):
        colour = tuple(int(token_page.QUADRANT_COLOURS[q][i:i + 2], 16) for i in (1, 3, 5))
        assert (colour in seen) == (q in present), (token_page.QUADRANT_NAMES[q], q in present)
