"""tokens.html: one page per run that shows, token by token, what the update did to sampled completions.

    python plot.py --tokens runs/lab          # (re)writes runs/lab/tokens.html from runs/lab/tokens.jsonl

train.py writes tokens.jsonl at every logging step (--token_groups kept groups, whole groups, every
token: log pi_old, log pi at the update that trained it, r, A, H, its quadrant, its clip region and
the gradient weight F the loss gave it, all from the loss's own masks: cegppo.token_details) and
redraws this page beside curves.png. The page is one self-contained file (no network, no external
script or font): it opens from a laptop's disk and inside the notebook.

What a student sees for the chosen step: per group its prompt and its G completions with reward
and advantage; every token coloured by quadrant (the README's PA&HP, PA&LP, NA&HP, NA&LP); the clip
regions marked by shape, not colour (low: a thick line under the token, high: a thick line over
it, dual clip: a double line under it); a clipped token whose gradient the loss dropped struck
through (PPO, F = 0), one whose gradient CE-GPPO gave back marked with a superscript + (F = beta
(1 -+ eps) > 0); on hover or keyboard focus pi_old, pi, r, A, H and F. One line per step counts the
shown tokens by quadrant and region.
"""

import json
import os

QUADRANT_NAMES = ("PA&HP", "PA&LP", "NA&HP", "NA&LP")   # cegppo.QUADRANTS, as the README names them
QUADRANT_COLOURS = ("#cfe2f3", "#6fa8dc", "#fde2c4", "#f6a04d")   # blue: A > 0, orange: A < 0; dark: LP
REGION_NAMES = ("none", "low clip region", "high clip region", "dual clip")   # cegppo.REGIONS


def write_page(run, steps, output=None):
    """run/tokens.html (or `output`) from `steps`, the rows of run/tokens.jsonl (plot.token_steps);
    written through a temp file and a rename."""
    output = output or os.path.join(run, "tokens.html")
    data = json.dumps({"run": os.path.basename(os.path.normpath(run)), "steps": steps,
                       "quadrants": QUADRANT_NAMES, "colours": QUADRANT_COLOURS, "regions": REGION_NAMES})
    page = PAGE.replace("/*DATA*/null", data.replace("</", "<\\/"))       # no "</script>" inside the data
    tmp = output + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(page)
    os.replace(tmp, output)
    return output


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
.tok.low { border-bottom: 3px solid #000; } .tok.high { border-top: 3px solid #000; }
.tok.dual { border-bottom: 4px double #000; }
.tok.dropped { text-decoration: line-through; text-decoration-thickness: 2px; }
.tok.restored { font-weight: bold; } .tok.restored::after { content: "+"; font-size: 11px; vertical-align: super; }
#detail { position: fixed; right: 16px; bottom: 16px; width: 330px; background: #fffff4; border: 1px solid #999;
          border-radius: 6px; padding: 8px 10px; font-size: 13px; font-family: monospace; white-space: pre; z-index: 3; }
</style></head>
<body>
<script>const DATA = /*DATA*/null;</script>
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
<script>
"use strict";
const Q = DATA.quadrants, C = DATA.colours, R = DATA.regions;
const sel = document.getElementById("step");
function fmt(x) { return (Math.abs(x) >= 0.01 || x === 0) ? x.toFixed(3) : x.toExponential(2); }
function esc(t) { return t.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;"); }
function shown(t) { return t.replace(/\\n/g, "\\u21b5\\n").replace(/\\t/g, "\\u21e5"); }
const CISPO = DATA.steps.length > 0 && DATA.steps[0].algo === "cispo";   // no clip regions: a weight cap
function classes(c, t) {
  const q = c.quadrant[t], r = c.region[t], out = ["tok", q >= 0 ? "q" + q : "none-q"];
  if (r === 1) out.push("low"); if (r === 2) out.push("high"); if (r === 3) out.push("dual");
  if (r > 0 && !CISPO) out.push(c.F[t] > 0 && r < 3 ? "restored" : "dropped");
  return out.join(" ");
}
function legend() {
  let h = "quadrant (colour): ";
  Q.forEach((n, i) => { h += `<span class="key" style="background:${C[i]}">${n}</span>`; });
  if (CISPO) {
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
function counts(step) {
  const n = { tokens: 0, q: [0, 0, 0, 0], r: [0, 0, 0, 0], restored: 0, dropped: 0, completions: 0 };
  for (const g of step.groups) for (const c of g.completions) {
    n.completions += 1;
    for (let t = 0; t < c.tokens.length; t++) {
      n.tokens += 1; if (c.quadrant[t] >= 0) n.q[c.quadrant[t]] += 1; n.r[c.region[t]] += 1;
      if (c.region[t] > 0) { if (c.F[t] > 0 && c.region[t] < 3) n.restored += 1; else n.dropped += 1; }
    }
  }
  return n;
}
function render(i) {
  const step = DATA.steps[i];
  sel.value = String(i);
  history.replaceState(null, "", "#step=" + step.step);
  const n = counts(step), pct = k => (100 * k / Math.max(1, n.tokens)).toFixed(1) + "%";
  const el = document.getElementById("counts");
  el.innerHTML = `step ${step.step}: ${n.tokens} tokens in ${step.groups.length} groups (${n.completions} completions) | ` +
    Q.map((q, k) => `${q} ${n.q[k]} (${pct(n.q[k])})`).join(" &middot; ") +
    ` | low clip ${n.r[1]} (${pct(n.r[1])}) &middot; high clip ${n.r[2]} (${pct(n.r[2])}) &middot; dual ${n.r[3]}` +
    ` | gradient restored ${n.restored}, dropped ${n.dropped}`;
  el.dataset.tokens = n.tokens; el.dataset.low = n.r[1]; el.dataset.high = n.r[2]; el.dataset.dual = n.r[3];
  Q.forEach((q, k) => { el.dataset["q" + k] = n.q[k]; });
  let h = "";
  step.groups.forEach((g, gi) => {
    h += `<div class="group"><div><b>group ${gi + 1}</b> &middot; answer ${esc(String(g.answer))}</div>` +
         `<div class="prompt">${esc(g.prompt)}</div>`;
    g.completions.forEach((c, ci) => {
      h += `<div class="completion"><span class="meta">reward ${c.reward} &middot; A ${c.advantage >= 0 ? "+" : ""}` +
           `${c.advantage.toFixed(2)}</span>`;
      for (let t = 0; t < c.tokens.length; t++)
        h += `<span class="${classes(c, t)}" tabindex="0" data-g="${gi}" data-c="${ci}" data-t="${t}">` +
             `${esc(shown(c.tokens[t]))}</span>`;
      h += "</div>";
    });
    h += "</div>";
  });
  document.getElementById("groups").innerHTML = h;
}
function detail(e) {
  const s = e.target.closest(".tok[data-t]"); if (!s) return;
  const c = DATA.steps[Number(sel.value)].groups[s.dataset.g].completions[s.dataset.c], t = Number(s.dataset.t);
  const q = c.quadrant[t];
  document.getElementById("detail").textContent =
    `token   ${JSON.stringify(c.tokens[t])}\\n` +
    `pi_old  ${fmt(Math.exp(c.old_logp[t]))}   (log ${fmt(c.old_logp[t])})\\n` +
    `pi      ${fmt(Math.exp(c.logp[t]))}   (log ${fmt(c.logp[t])})\\n` +
    `r       ${fmt(c.ratio[t])}\\nA       ${fmt(c.advantage)}\\nH       ${fmt(c.entropy[t])}\\n` +
    `F       ${fmt(c.F[t])}   (gradient weight)\\n` +
    `${q >= 0 ? Q[q] : "no quadrant (A = 0)"}, ${CISPO ? (c.region[t] ? "the cap binds" : "under the cap") : R[c.region[t]]}`;
}
function knobs(s) {
  if (s.algo === "cispo") return `weight cap 1 + ${s.epsilon_high}`;
  return `beta1 ${s.beta1}, beta2 ${s.beta2}, eps ${s.epsilon_low} / ${s.epsilon_high}`;
}
document.getElementById("about").textContent = DATA.steps.length ?
  `${DATA.run}: --algo ${DATA.steps[0].algo} (${knobs(DATA.steps[0])}); ${DATA.steps.length} logged steps` :
  `${DATA.run}: no logged step yet`;
DATA.steps.forEach((s, i) => { const o = document.createElement("option"); o.value = String(i);
                               o.textContent = String(s.step); sel.appendChild(o); });
legend();
document.getElementById("groups").addEventListener("mouseover", detail);
document.getElementById("groups").addEventListener("focusin", detail);
sel.addEventListener("change", () => render(Number(sel.value)));
document.getElementById("prev").addEventListener("click", () => render(Math.max(0, Number(sel.value) - 1)));
document.getElementById("next").addEventListener("click",
  () => render(Math.min(DATA.steps.length - 1, Number(sel.value) + 1)));
const wanted = /step=(\\d+)/.exec(location.hash);
const start = wanted ? DATA.steps.findIndex(s => s.step === Number(wanted[1])) : -1;
if (DATA.steps.length) render(start >= 0 ? start : DATA.steps.length - 1);
</script>
<style>
""" + "\n".join(f".tok.q{i} {{ background: {c}; }}" for i, c in enumerate(QUADRANT_COLOURS)) + """
</style>
</body></html>
"""
