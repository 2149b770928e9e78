"""tokens.html: one page per run that shows, token by token, what the update did to sampled completions.

    python plot.py --tokens runs/lab          # (re)writes runs/lab/tokens.html from runs/lab/tokens.jsonl

train.py writes tokens.jsonl at every logging step (--token_groups kept groups, whole groups, every
token: log pi_old, log pi at the update that trained it, r, A, H, its quadrant, its clip region and
the gradient weight F the loss gave it, all from the loss's own masks: cegppo.token_details) and
adds the step to this page beside curves.png. The page is one self-contained file (no network, no
external script or font): it opens from a laptop's disk and inside the notebook.

The file is a fixed head (styles, the script, the empty page) followed by one data block per logged
step, <script type="application/json" class="step">, so that adding a step appends that step's bytes
and nothing else (HTML needs no </body></html>); the script reads the blocks once the file is parsed
and skips one cut short by a crash mid-append.

What a student sees for the chosen step: per group its prompt and its G completions with reward
and advantage; every token coloured by quadrant (the README's PA&HP, PA&LP, NA&HP, NA&LP); the clip
regions marked by shape, not colour (low: a thick line under the token, high: a thick line over
it, dual clip: a double line under it); a clipped token whose gradient the loss dropped struck
through (PPO, F = 0), one whose gradient CE-GPPO gave back marked with a superscript + (F = beta
(1 -+ eps) > 0); on hover or keyboard focus pi_old, pi, r, A, H and F. One line per step counts the
shown tokens by quadrant and region.
"""

import json
import math
import os

import cegppo

QUADRANT_NAMES = tuple(q.upper().replace("_", "&") for q in cegppo.QUADRANTS)   # PA&HP, ...: as the README names them
QUADRANT_COLOURS = ("#cfe2f3", "#6fa8dc", "#fde2c4", "#f6a04d")   # blue: A > 0, orange: A < 0; dark: LP
REGION_NAMES = tuple({"low": "low clip region", "high": "high clip region", "dual": "dual clip"}.get(r, r)
                     for r in cegppo.REGIONS)                               # cegppo.REGIONS, as the page names them
BLOCK_END = "</script>\n"          # the head and every step's block end so: a page that does not was cut short


def step_record(tok, groups, old, updates, cfg):
    """tokens.jsonl's row of a logging step, or None: every token of the groups the update recorded (train.py's
    update_policy; whole groups), with what the loss did to it (cegppo.token_details) and its quadrant."""
    recorded, G, rollout = updates.tokens, cfg.num_generations, groups.rollout
    if not recorded:
        return None
    adv = groups.advantages[:, None].expand_as(old.logp)                                # [B, T]
    quadrant = cegppo.quadrant_of(old.logp, old.entropy, adv)                           # [B, T]
    rows = []
    for g in sorted({b // G for b in recorded}):        # whole groups: mini-batches are
        completions = []
        for b in range(g * G, (g + 1) * G):
            n, r, L = int(rollout.completion_mask[b].sum()), recorded[b], rollout.prompt_len
            completions.append({"reward": groups.rewards[b].item(), "advantage": round(groups.advantages[b].item(), 4),
                                "tokens": tok.batch_decode([[i] for i in rollout.input_ids[b, L:L + n].tolist()]),
                                "old_logp": _rounded(old.logp[b, :n], 6), "logp": _rounded(r["logp"][:n], 6),
                                "ratio": _rounded(r["ratio"][:n]), "entropy": _rounded(old.entropy[b, :n]),
                                "quadrant": quadrant[b, :n].tolist(), "region": r["region"][:n].int().tolist(),
                                "F": _rounded(r["F"][:n])})
        prompt, answer = groups.prompts[g]
        rows.append({"prompt": prompt, "answer": answer, "completions": completions})
    return {"algo": cfg.algo, "beta1": cfg.beta1, "beta2": cfg.beta2, "epsilon_low": cfg.epsilon_low,
            "epsilon_high": cfg.epsilon_high, "num_iterations": cfg.num_iterations, "groups": rows}


def _rounded(t, digits=4):
    """`digits` significant digits (6 for the log-probs, whose difference is the ratio's log): what a
    page shows, at a third of the size of full floats."""
    return [float(f"{x:.{digits}g}") for x in t.tolist()]


def write_page(run, steps, output=None):
    """run/tokens.html (or `output`) from `steps`, the rows of run/tokens.jsonl (engine/rows.py's token_steps):
    the head and a block per row, written through a temp file and a rename."""
    output = output or os.path.join(run, "tokens.html")
    tmp = output + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(page_head(run))
        for row in steps:
            f.write(step_block(row))
    os.replace(tmp, output)
    return output


def add_step(run, row, all_rows):
    """Add the logged step `row` (tokens.jsonl's newest row) to run/tokens.html: its block appended,
    O(the step), where the page ends with a whole block; else (no page yet, a page that --resume
    removed, or one cut short by a crash mid-append) the page written whole from `all_rows()`, every
    row of tokens.jsonl, this one included. Returns the page's path."""
    page = os.path.join(run, "tokens.html")
    if not _ends_whole(page):
        return write_page(run, all_rows())
    with open(page, "a", encoding="utf-8") as f:
        f.write(step_block(row))
    return page


def _ends_whole(path):
    """Does the file at `path` end with a whole block (the data hold no "</", so no cut can end so)?"""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - len(BLOCK_END)))
            return f.read() == BLOCK_END.encode()
    except FileNotFoundError:
        return False


def page_head(run):
    """Everything but the steps; its last element holds what no row does (the run's name, the names)."""
    meta = {"run": os.path.basename(os.path.normpath(run)), "quadrants": QUADRANT_NAMES, "colours": QUADRANT_COLOURS,
            "regions": REGION_NAMES}
    return PAGE + f'<script type="application/json" id="meta">{_json(meta)}{BLOCK_END}'


def step_block(row):
    """One logged step's block: the bytes add_step appends."""
    return f'<script type="application/json" class="step">{_json(row)}{BLOCK_END}'


def _json(data):
    """`data` as JSON that cannot end its <script> early: every "<" written \\u003c, so no "</script>"
    and no "<!--" inside. JSON has no NaN or infinity: such a number goes as the string JavaScript
    reads back as that number ("NaN", "Infinity", "-Infinity")."""
    try:
        text = json.dumps(data, allow_nan=False)
    except ValueError:
        text = json.dumps(_finite(data))
    return text.replace("<", "\\u003c")


def _finite(x):
    if isinstance(x, float) and not math.isfinite(x):
        return "NaN" if x != x else "Infinity" if x > 0 else "-Infinity"
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>tokens: what the update did</title>
<style>
body { font-family: system-ui, sans-serif; margin: 16px 24px 160px; color: #222; max-width: 1100px; }
h1 { font-size: 20px; margin: 0 0 6px; } .sub { color: #555; font-size: 14px; margin-bottom: 10px; }
.bar { position: sticky; top: 0; background: #fff; padding: 8px 0; border-bottom: 1px solid #ddd; z-index: 2; }
.legend span.key { display: inline-block; padding: 1px 6px; margin: 2px 4px 2px 0; font-family: monospace; }
#counts { font-size: 14px; margin-top: 6px; }
.group { margin: 18px 0; padding: 10px 12px; border: 1px solid #ddd; border-radius: 6px; }
.prompt { white-space: pre-wrap; font-family: monospace; font-size: 13px; color: #555; background: #f6f6f6;
          padding: 6px; max-height: 9em; overflow: auto; }
.completion { margin: 8px 0; line-height: 2.1; }
.meta { font-size: 13px; color: #444; margin-right: 8px; font-family: monospace; }
.tok { font-family: monospace; font-size: 15px; white-space: pre-wrap; padding: 2px 1px; cursor: default;
       border-top: 3px solid transparent; border-bottom: 3px solid transparent; }
.tok:focus, .tok:hover { outline: 2px solid #000; }
.tok.none-q { background: #eee; }
""" + "\n".join(f".tok.q{i} {{ background: {c}; }}" for i, c in enumerate(QUADRANT_COLOURS)) + """
.tok.low { border-bottom: 3px solid #000; } .tok.high { border-top: 3px solid #000; }
.tok.dual { border-bottom: 4px double #000; }
.tok.dropped { text-decoration: line-through; text-decoration-thickness: 2px; }
.tok.restored { font-weight: bold; } .tok.restored::after { content: "+"; font-size: 11px; vertical-align: super; }
#detail { position: fixed; right: 16px; bottom: 16px; width: 330px; background: #fffff4; border: 1px solid #999;
          border-radius: 6px; padding: 8px 10px; font-size: 13px; font-family: monospace; white-space: pre; z-index: 3; }
</style>
<script>
"use strict";
// The logged steps' blocks follow this head in the file (train.py appends them as it runs): read them
// once the whole file is parsed.
document.addEventListener("DOMContentLoaded", () => {
const META = JSON.parse(document.getElementById("meta").textContent);
const Q = META.quadrants, C = META.colours, R = META.regions;
const STEPS = [];                 // {step, block}: each block that parses; a step's data is parsed again when shown
let first = null, shown = null;   // the first step's data (the header's knobs), the shown step's
for (const block of document.querySelectorAll("script.step")) {
  let s;
  try { s = JSON.parse(block.textContent); } catch (e) { continue; }   // cut short by a crash mid-append
  STEPS.push({ step: s.step, block }); first = first || s;
}
const sel = document.getElementById("step");
// Number(): a number JSON cannot hold (NaN, an infinity) comes as its name, a string
function fmt(x) { x = Number(x); return (Math.abs(x) >= 0.01 || x === 0) ? x.toFixed(3) : x.toExponential(2); }
function esc(t) { return t.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;"); }
function visible(t) { return t.replace(/\\n/g, "\\u21b5\\n").replace(/\\t/g, "\\u21e5"); }
function isCispo(s) { return s.algo === "cispo"; }   // no clip regions: a weight cap
function classes(c, t, cispo) {
  const q = c.quadrant[t], r = c.region[t], out = ["tok", q >= 0 ? "q" + q : "none-q"];
  if (r === 1) out.push("low"); if (r === 2) out.push("high"); if (r === 3) out.push("dual");
  if (r > 0 && !cispo) out.push(c.F[t] > 0 && r < 3 ? "restored" : "dropped");
  return out.join(" ");
}
function legend(cispo) {
  let h = "quadrant (colour): ";
  Q.forEach((n, i) => { h += `<span class="key" style="background:${C[i]}">${n}</span>`; });
  if (cispo) {
    h += ` &nbsp; CISPO has no clip region: every token keeps F = min(r, cap); ` +
         `<span class="key tok high">line over: the cap binds</span>`;
  } else {
    h += ` &nbsp; clip region (shape): <span class="key tok low">low: line under</span>` +
         `<span class="key tok high">high: line over</span><span class="key tok dual">dual clip</span>` +
         ` &nbsp; <span class="key tok low dropped">gradient dropped (F = 0)</span>` +
         `<span class="key tok low restored">gradient restored (F &gt; 0)</span>`;
  }
  document.getElementById("legend").innerHTML = h;
}
function counts(step, cispo) {
  const n = { tokens: 0, q: [0, 0, 0, 0], r: [0, 0, 0, 0], restored: 0, dropped: 0, completions: 0 };
  for (const g of step.groups) for (const c of g.completions) {
    n.completions += 1;
    for (let t = 0; t < c.tokens.length; t++) {
      n.tokens += 1; if (c.quadrant[t] >= 0) n.q[c.quadrant[t]] += 1; n.r[c.region[t]] += 1;
      if (c.region[t] > 0 && !cispo) { if (c.F[t] > 0 && c.region[t] < 3) n.restored += 1; else n.dropped += 1; }
    }
  }
  return n;
}
function countLine(step, n, cispo) {
  const pct = k => (100 * k / Math.max(1, n.tokens)).toFixed(1) + "%", passes = step.num_iterations || 1;
  const groups = step.groups.length === 1 ? "1 group" : `${step.groups.length} groups`;
  let h = `step ${step.step}: ${n.tokens} tokens in ${groups} (${n.completions} completions) | ` +
    Q.map((q, k) => `${q} ${n.q[k]} (${pct(n.q[k])})`).join(" &middot; ");
  // CISPO marks every token whose weight the cap binds, either sign of A, and never drops a gradient
  // (its metric clip_ratio/high_mean counts only A > 0)
  if (cispo) h += ` | the cap binds: ${n.r[2]} (${pct(n.r[2])})`;
  else h += ` | low clip ${n.r[1]} (${pct(n.r[1])}) &middot; high clip ${n.r[2]} (${pct(n.r[2])}) &middot; ` +
            `dual ${n.r[3]} | gradient restored ${n.restored}, dropped ${n.dropped}`;
  // the page holds the last pass's update; metrics.jsonl's clip fractions average over every pass
  if (passes > 1) h += ` | counted at <b>the last of ${passes} passes</b> over this rollout ` +
                       `(metrics.jsonl's clip fractions average all the passes)`;
  return h;
}
function render(i) {
  const step = shown = JSON.parse(STEPS[i].block.textContent), cispo = isCispo(step);
  sel.value = String(i);
  // a page inside an iframe srcdoc (the notebook) may not change its address: the step shows all the same
  try { history.replaceState(null, "", "#step=" + step.step); } catch (e) { /* SecurityError */ }
  legend(cispo);
  const n = counts(step, cispo), el = document.getElementById("counts");
  el.innerHTML = countLine(step, n, cispo);
  el.dataset.tokens = n.tokens; el.dataset.low = n.r[1]; el.dataset.high = n.r[2]; el.dataset.dual = n.r[3];
  Q.forEach((q, k) => { el.dataset["q" + k] = n.q[k]; });
  let h = "";
  step.groups.forEach((g, gi) => {
    h += `<div class="group"><div><b>group ${gi + 1}</b> &middot; answer ${esc(String(g.answer))}</div>` +
         `<div class="prompt">${esc(g.prompt)}</div>`;
    g.completions.forEach((c, ci) => {
      const a = Number(c.advantage);
      h += `<div class="completion"><span class="meta">reward ${c.reward} &middot; A ${a >= 0 ? "+" : ""}` +
           `${a.toFixed(2)}</span>`;
      for (let t = 0; t < c.tokens.length; t++)
        h += `<span class="${classes(c, t, cispo)}" tabindex="0" data-g="${gi}" data-c="${ci}" data-t="${t}">` +
             `${esc(visible(c.tokens[t]))}</span>`;
      h += "</div>";
    });
    h += "</div>";
  });
  document.getElementById("groups").innerHTML = h;
  document.getElementById("detail").textContent = "hover or focus a token";
}
function detail(e) {
  const s = e.target.closest(".tok[data-t]"); if (!s || !shown) return;
  const c = shown.groups[s.dataset.g].completions[s.dataset.c], t = Number(s.dataset.t), q = c.quadrant[t];
  document.getElementById("detail").textContent =
    `token   ${JSON.stringify(c.tokens[t])}\\n` +
    `pi_old  ${fmt(Math.exp(c.old_logp[t]))}   (log ${fmt(c.old_logp[t])})\\n` +
    `pi      ${fmt(Math.exp(c.logp[t]))}   (log ${fmt(c.logp[t])})\\n` +
    `r       ${fmt(c.ratio[t])}\\nA       ${fmt(c.advantage)}\\nH       ${fmt(c.entropy[t])}\\n` +
    `F       ${fmt(c.F[t])}   (gradient weight)\\n` +
    `${q >= 0 ? Q[q] : "no quadrant (A = 0)"}, ` +
    `${isCispo(shown) ? (c.region[t] ? "the cap binds" : "under the cap") : R[c.region[t]]}`;
}
function knobs(s) {
  if (isCispo(s)) return `weight cap 1 + ${s.epsilon_high}`;
  return `beta1 ${s.beta1}, beta2 ${s.beta2}, eps ${s.epsilon_low} / ${s.epsilon_high}`;
}
document.getElementById("about").textContent = first ?
  `${META.run}: --algo ${first.algo} (${knobs(first)}); ${STEPS.length} logged step${STEPS.length > 1 ? "s" : ""}` :
  `${META.run}: no logged step yet`;
STEPS.forEach((s, i) => { const o = document.createElement("option"); o.value = String(i);
                          o.textContent = String(s.step); sel.appendChild(o); });
legend(first !== null && isCispo(first));
document.getElementById("groups").addEventListener("mouseover", detail);
document.getElementById("groups").addEventListener("focusin", detail);
sel.addEventListener("change", () => render(Number(sel.value)));
document.getElementById("prev").addEventListener("click", () => render(Math.max(0, Number(sel.value) - 1)));
document.getElementById("next").addEventListener("click", () => render(Math.min(STEPS.length - 1, Number(sel.value) + 1)));
const wanted = /step=(\\d+)/.exec(location.hash);
const start = wanted ? STEPS.findIndex(s => s.step === Number(wanted[1])) : -1;
if (STEPS.length) render(start >= 0 ? start : STEPS.length - 1);
});
</script>
</head>
<body>
<div class="bar">
  <h1>What the update did to each token</h1>
  <div class="sub" id="about"></div>
  <label>step <select id="step"></select></label>
  <button id="prev" type="button">&larr; earlier</button> <button id="next" type="button">later &rarr;</button>
  <div class="legend" id="legend"></div>
  <div id="counts"></div>
</div>
<div id="groups"></div>
<div id="detail">hover or focus a token</div>
"""
