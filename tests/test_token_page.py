"""tokens.jsonl and tokens.html: what the update did to each token of a real tiny run, recorded from the
loss's own numbers, and the page checked in a real browser (headless Chromium) for what a person sees."""
import decimal
import html
import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest

from engine import rows, token_page

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    # a large step and 4 updates per rollout, so that tokens reach both clip regions at step 1, yet not
    # so large that step 2 finds no group with a signal: two logged steps for the step buttons;
    # token_groups above the 4 groups a step keeps: the page shows every trained token; no evaluation
    out = str(tmp_path_factory.mktemp("tokens") / "run")
    p = subprocess.run([sys.executable, "train.py", "--model", "tiny", "--dataset", "tiny", "--max_steps", "2",
                        "--learning_rate", "1e-2", "--steps_per_generation", "4", "--token_groups", "8",
                        "--eval_limit", "0", "--output_dir", out], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    return out


def steps(run):
    return rows.token_steps(run)


def metrics(run):
    return {r["step"]: r for r in map(json.loads, open(os.path.join(run, "metrics.jsonl")))}


def tokens_of(step):
    return [(g, c, t) for g, group in enumerate(step["groups"]) for c, comp in enumerate(group["completions"])
            for t in range(len(comp["tokens"]))]


def test_recorded_tokens_are_the_losss_numbers(run):
    rows, by_step = steps(run), metrics(run)
    assert len(rows) >= 2 and all(r["step"] in by_step for r in rows)
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


NEEDS_CHROMIUM = pytest.mark.skipif(CHROMIUM is None,
                                    reason="no Chromium here (apt-get install chromium; .ci/run installs it)")

# Put in a copy of a page, it runs after the page's own script (both on DOMContentLoaded) and
# writes what a person would see into the DOM for --dump-dom: the drawn borders of a low and a high
# clip token, the detail box once a token has keyboard focus, and every step's line of counts as the
# step buttons reach it.
PROBE = """<script>
document.addEventListener("DOMContentLoaded", () => {
  const $ = id => document.getElementById(id), sel = $("step"), out = {};
  function drawn(el) {
    if (!el) return null;
    const s = getComputedStyle(el);
    return { at: [+el.dataset.g, +el.dataset.c, +el.dataset.t], classes: el.className,
             bottom: [s.borderBottomWidth, s.borderBottomStyle, s.borderBottomColor],
             top: [s.borderTopWidth, s.borderTopStyle, s.borderTopColor] };
  }
  function line() { return { step: sel.options[sel.selectedIndex].textContent, text: $("counts").textContent,
                             data: { ...$("counts").dataset } }; }
  out.about = $("about").textContent; out.options = [...sel.options].map(o => o.textContent);
  out.legend = $("legend").textContent; out.prompt = document.querySelector("#groups .prompt").textContent;
  out.first = line();
  out.low = drawn(document.querySelector("#groups .tok.low")); out.high = drawn(document.querySelector("#groups .tok.high"));
  // keyboard focus fires its events only in a window that has focus (headless: at once or soon after)
  function focused() {
    const tok = document.querySelector("#groups .tok.low") || document.querySelector("#groups .tok.high");
    if (tok) { tok.focus(); out.focused = { at: drawn(tok).at, detail: $("detail").textContent,
                                            active: document.activeElement === tok }; }
    out.earlier = []; out.later = [];
    for (let k = sel.selectedIndex; k > 0; k--) { $("prev").click(); out.earlier.push(line()); }
    for (let k = sel.selectedIndex; k < sel.options.length - 1; k++) { $("next").click(); out.later.push(line()); }
    const pre = document.createElement("pre"); pre.id = "probe"; pre.textContent = JSON.stringify(out);
    document.body.appendChild(pre);
  }
  if (document.hasFocus()) focused(); else window.addEventListener("focus", focused, { once: true });
});
</script>
"""


def probe(page, tmp_path, hash=""):
    """What PROBE saw in `page` (a copy with PROBE after the page's script: a page that ends with a block
    cut short ends inside it), opened at `hash`."""
    copy = tmp_path / "probed.html"
    copy.write_text(open(page, encoding="utf-8").read().replace("</head>", PROBE + "</head>", 1), encoding="utf-8")
    dom = chromium("--virtual-time-budget=5000", "--dump-dom", f"file://{copy}{hash}", tmp_path=tmp_path).stdout
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert found, dom[-2000:]
    return json.loads(html.unescape(found.group(1)))


def fmt(x):
    """The page's fmt(): 3 decimals (toFixed rounds a tie away from 0), or 3 significant digits."""
    if abs(x) >= 0.01 or x == 0:
        return str(decimal.Decimal(x).quantize(decimal.Decimal("0.001"), decimal.ROUND_HALF_UP))
    mantissa, exponent = f"{x:.2e}".split("e")
    return f"{mantissa}e{int(exponent)}"


BLACK, TRANSPARENT = "rgb(0, 0, 0)", "rgba(0, 0, 0, 0)"


@NEEDS_CHROMIUM
def test_the_page_shows_what_the_loss_did_in_a_real_browser(run, tmp_path):
    import matplotlib.image
    page = os.path.join(run, "tokens.html")
    rows = steps(run)
    for step in rows:
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
        groups = "1 group" if len(step["groups"]) == 1 else f"{len(step['groups'])} groups"
        assert counts.group(2).startswith(f"step {step['step']}: {len(tokens_of(step))} tokens in {groups} (")
        assert "passes" not in counts.group(2)       # one pass over each rollout: the counts are the metrics'
    # the header, computed by the page from its blocks
    assert re.search(r'<div class="sub" id="about">run: --algo cegppo \(beta1 0.5, beta2 1, eps 0.2 / 0.2\); '
                     rf'{len(rows)} logged steps</div>', dom)
    # what is drawn and what focus shows, at a step with both clip regions, then every other step
    # through the step buttons
    both = [i for i, r in enumerate(rows) if {1, 2} <= {region for g in r["groups"] for c in g["completions"]
                                                       for region in c["region"]}]
    assert both, "no logged step has tokens in both clip regions"
    at = rows[both[0]]
    probed = probe(page, tmp_path, f"#step={at['step']}")
    assert probed["options"] == [str(r["step"]) for r in rows] and probed["first"]["step"] == str(at["step"])
    g, c, t = probed["low"]["at"]
    assert at["groups"][g]["completions"][c]["region"][t] == 1
    width, style, colour = probed["low"]["bottom"]          # a line under a low clip token, none over it
    assert float(width[:-2]) >= 2 and style == "solid" and colour == BLACK and probed["low"]["top"][2] == TRANSPARENT
    g, c, t = probed["high"]["at"]
    assert at["groups"][g]["completions"][c]["region"][t] == 2
    width, style, colour = probed["high"]["top"]            # a line over a high clip token, none under it
    assert float(width[:-2]) >= 2 and style == "solid" and colour == BLACK and probed["high"]["bottom"][2] == TRANSPARENT
    # keyboard focus on the low clip token: the detail box shows its r and F as the page writes them
    assert probed["focused"]["active"] and probed["focused"]["at"] == probed["low"]["at"]
    g, c, t = probed["low"]["at"]
    comp = at["groups"][g]["completions"][c]
    detail = probed["focused"]["detail"]
    assert f"r       {fmt(comp['ratio'][t])}\n" in detail and f"F       {fmt(comp['F'][t])}   (gradient weight)" in detail
    assert detail.startswith(f"token   {json.dumps(comp['tokens'][t], ensure_ascii=False)}")
    assert detail.endswith("low clip region")
    # "earlier" down to the first step, then "later" up to the last: every step, each with its own counts
    visited = probed["earlier"] + probed["later"]
    assert [s["step"] for s in visited] == [str(r["step"]) for r in rows[:both[0]][::-1] + rows[1:]]
    for shown, step in zip(visited, rows[:both[0]][::-1] + rows[1:]):
        assert {k: int(v) for k, v in shown["data"].items()} == token_page_counts(step)
        assert shown["text"].startswith(f"step {step['step']}: {len(tokens_of(step))} tokens")
    # on the screenshot, every quadrant present in the step has its colour
    step = rows[0]
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


def synthetic_row(step, algo="cegppo", **extra):
    """A made-up row of tokens.jsonl: one group of two completions, A > 0 and A < 0; for cegppo a token
    in the high and one in the low clip region, for cispo a capped token of each sign of A."""
    cispo = algo == "cispo"
    knobs = dict(beta1=None, beta2=None, epsilon_low=None, epsilon_high=4.0) if cispo else \
        dict(beta1=0.5, beta2=1.0, epsilon_low=0.2, epsilon_high=0.2)

    def completion(advantage, tokens, ratio, region, F, quadrant):
        n = len(tokens)
        return {"reward": float(advantage > 0), "advantage": advantage, "tokens": tokens,
                "old_logp": [-0.5] * n, "logp": [-0.5 + math.log(r) for r in ratio], "ratio": ratio,
                "entropy": [0.3] * n, "quadrant": quadrant, "region": region, "F": F}
    high, low = (5.5, 5.0) if cispo else (1.3, 1.2)
    groups = [{"prompt": f"What is 2 + {step}? <b>not bold</b> </script>", "answer": str(2 + step), "completions": [
        completion(1.0, ["The", " sum", " is", f" {2 + step}", "<|im_end|>"], [1.0, 1.1, high, 0.9, 1.0],
                   [0, 0, 2, 0, 0], [1.0, 1.1, low, 0.9, 1.0], [0, 0, 1, 0, 0]),
        completion(-1.0, ["It", "\n", " is", " 7"], [0.9, 0.7 if not cispo else 6.0, 1.0, 1.05],
                   [0, 1 if not cispo else 2, 0, 0], [0.9, 0.4 if not cispo else 5.0, 1.0, 1.05], [2, 3, 2, 2])]}]
    return {"step": step, "algo": algo, **knobs, "groups": groups, **extra}


def test_appending_steps_one_by_one_gives_the_page_of_all_rows(tmp_path):
    rows = [synthetic_row(s) for s in (1, 2, 3, 4)]
    reference, run = str(tmp_path / "a" / "run"), str(tmp_path / "b" / "run")     # the same name: the same header
    os.makedirs(reference)
    os.makedirs(run)
    whole = token_page.write_page(reference, rows)
    page = os.path.join(run, "tokens.html")
    for i, row in enumerate(rows):
        asked = []

        def all_rows(n=i + 1, asked=asked):
            asked.append(n)
            return rows[:n]
        before = os.path.getsize(page) if os.path.exists(page) else None
        assert token_page.add_step(run, row, all_rows) == page
        if before is None:                                      # no page yet: written whole, from every row
            assert asked == [1]
        else:                                                   # a page: this step's bytes and nothing else
            assert asked == [] and os.path.getsize(page) - before == len(token_page.step_block(row).encode())
    assert open(page, "rb").read() == open(whole, "rb").read()
    # nothing the data holds can end its block early
    assert "</script>" not in token_page.step_block(rows[0])[:-len(token_page.BLOCK_END)]
    # a crash mid-append leaves a block cut short: the next step writes the page whole again
    with open(page, "r+b") as f:
        f.truncate(os.path.getsize(page) - 100)
    rows.append(synthetic_row(5))
    token_page.add_step(run, rows[-1], lambda: rows)
    assert open(page, "rb").read() == open(token_page.write_page(reference, rows), "rb").read()
    # --resume removes the page when it trims tokens.jsonl: rebuilt from the rows that remain
    os.remove(page)
    token_page.add_step(run, rows[2], lambda: rows[:3])
    assert open(page, "rb").read() == open(token_page.write_page(reference, rows[:3]), "rb").read()


@NEEDS_CHROMIUM
def test_a_step_cut_short_is_left_out_and_more_passes_are_said(tmp_path):
    # an old row (no num_iterations: one pass), a lab-preset row (2 passes), then a crash mid-append
    run = str(tmp_path / "lab")
    os.makedirs(run)
    rows = [synthetic_row(1), synthetic_row(2, num_iterations=2)]
    rows[0]["groups"][0]["completions"][0]["ratio"][0] = float("nan")     # JSON has no NaN: the step shows all the same
    rows[0]["groups"][0]["completions"][0]["entropy"][0] = float("inf")
    page = token_page.write_page(run, rows)
    with open(page, "a", encoding="utf-8") as f:
        f.write(token_page.step_block(synthetic_row(3, num_iterations=2))[:300])
    seen = probe(page, tmp_path)
    assert seen["options"] == ["1", "2"] and seen["about"].endswith("; 2 logged steps")
    step2, step1 = seen["first"], seen["earlier"][0]                      # the last whole step shows first
    assert step2["step"] == "2" and "the last of 2 passes over this rollout" in step2["text"]
    assert step1["step"] == "1" and "passes" not in step1["text"]
    assert "low clip 1 (11.1%)" in step1["text"] and "gradient restored 2, dropped 0" in step1["text"]
    # the prompt's "<b>" and "</script>" are text, not markup
    assert seen["prompt"] == rows[1]["groups"][0]["prompt"]


@NEEDS_CHROMIUM
def test_cispos_line_counts_where_the_cap_binds(tmp_path):
    run = str(tmp_path / "cispo")
    os.makedirs(run)
    page = token_page.write_page(run, [synthetic_row(1, algo="cispo")])
    seen = probe(page, tmp_path)
    text = seen["first"]["text"]
    # both capped tokens (A > 0 and A < 0), and no clip region or gradient restored or dropped
    assert "the cap binds: 2 (22.2%)" in text and "low clip" not in text and "restored" not in text
    assert "dropped" not in text and "CISPO has no clip region" in seen["legend"]
    assert "weight cap 1 + 4" in seen["about"]
    assert seen["low"] is None and "restored" not in seen["high"]["classes"] and "dropped" not in seen["high"]["classes"]
    assert seen["focused"]["detail"].endswith("the cap binds") and "F       5.000" in seen["focused"]["detail"]


def test_recording_the_tokens_costs_no_pass(tmp_path, monkeypatch):
    # what the page shows comes from the update's own forward: a run that records every group's
    # tokens runs exactly the log-prob passes (with and without gradient) of a run that records none
    import signal
    import torch
    import train
    from engine import logprobs
    real, calls = logprobs.Scorer.micro_batch_logprobs, {}

    def counting(self, model, batch, with_entropy):
        calls[run] = calls.get(run, 0) + 1
        return real(self, model, batch, with_entropy)
    monkeypatch.setattr(logprobs.Scorer, "micro_batch_logprobs", counting)
    handler = signal.getsignal(signal.SIGINT)
    try:
        for groups in ("0", "8"):
            run = str(tmp_path / groups)
            torch.manual_seed(0)
            assert train.main(["--model", "tiny", "--max_steps", "2", "--eval_limit", "0", "--old_logprobs", "policy",
                               "--token_groups", groups, "--output_dir", str(tmp_path / groups)]) == 0
    finally:
        signal.signal(signal.SIGINT, handler)
    assert not os.path.exists(tmp_path / "0" / "tokens.jsonl") and len(rows.token_steps(str(tmp_path / "8"))) >= 1
    assert calls[str(tmp_path / "0")] == calls[str(tmp_path / "8")] > 0


def test_a_resumed_run_keeps_its_page_in_step_with_tokens_jsonl(tmp_path):
    # a run cut after step 3 whose last checkpoint is step 2's: --resume drops step 3's rows and redoes
    # it; the page, rebuilt from what is left, then shows every step once, as tokens.jsonl holds them
    out = str(tmp_path / "r")
    base = [sys.executable, "train.py", "--model", "tiny", "--dataset", "tiny", "--eval_limit", "0",
            "--save_steps", "10", "--output_dir", out]
    assert subprocess.run([*base, "--max_steps", "2"], cwd=ROOT, capture_output=True).returncode == 0
    shutil.copytree(os.path.join(out, "checkpoint"), str(tmp_path / "at-2"))
    assert subprocess.run([*base, "--max_steps", "3", "--resume"], cwd=ROOT, capture_output=True).returncode == 0
    shutil.rmtree(os.path.join(out, "checkpoint"))
    shutil.copytree(str(tmp_path / "at-2"), os.path.join(out, "checkpoint"))    # the cut: step 3 not saved

    def page_steps():
        page = open(os.path.join(out, "tokens.html"), encoding="utf-8").read()
        return [json.loads(b)["step"] for b in
                re.findall(r'<script type="application/json" class="step">(.*?)</script>', page)]
    assert page_steps() == [r["step"] for r in rows.token_steps(out)] and 3 in page_steps()
    p = subprocess.run([*base, "--max_steps", "4", "--resume"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    steps = page_steps()
    assert steps == [r["step"] for r in rows.token_steps(out)] and len(set(steps)) == len(steps) and 4 in steps
