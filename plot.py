"""Draw training curves of one or several runs into one PNG, and the README's figure of the loss's gradient weight.

    python plot.py runs/lab-grpo runs/lab-cegppo --output compare.png
    python plot.py runs/lab-b1-0/seed-* runs/lab-b1-1/seed-* --output seeds.png     # one band per setting
    python plot.py runs/lab-*/seed-* --metrics entropy,eval/accuracy --table         # two panels, the seed table
    python plot.py runs/carry/*/seed-* --metrics entropy,eval/accuracy,eval/pass@1,eval/pass@16   # with pass@k
    python plot.py --gradient_weight docs/gradient_weight.png
    python plot.py runs/lab/*/*/seed-* --map docs/lab_map.png --baseline algo=grpo   # the step-size map
    python plot.py --tokens runs/lab           # runs/lab/tokens.html: what the update did to each token

Each run is a train.py output folder (metrics.jsonl + config.json). Runs whose configurations
differ only in --seed (and the output folder) are one setting: drawn as the mean over seeds with a
band from the lowest to the highest seed, labelled by the flags that differ between settings.
Panels: reward, held-out accuracy, entropy, the two clip regions, response length and the
entropy drive of the four token quadrants (cegppo.token_quadrants). train.py calls plot_runs to
redraw its own curves.png as it trains.
"""

import argparse
import json
import math
import os
import re
import sys

from engine.rows import complete_rows, token_steps

PANELS = [
    ("reward", "train reward (mean)"),
    ("eval/accuracy", "held-out accuracy (greedy)"),
    ("entropy", "entropy (nats / token)"),
    ("clip_ratio/low_mean", "low clip region: r < 1-eps, A < 0 (beta1)"),
    ("clip_ratio/high_mean", "high clip region: r > 1+eps, A > 0 (beta2)"),
    ("completions/mean_length", "response length (tokens)"),
    ("quadrants/pa_hp_drive", "PA&HP entropy drive (lowers H)"),
    ("quadrants/pa_lp_drive", "PA&LP entropy drive (raises H)"),
    ("quadrants/na_hp_drive", "NA&HP entropy drive (raises H)"),
    ("quadrants/na_lp_drive", "NA&LP entropy drive (lowers H)"),
]
# the betas in force, drawn beside the ten where a run holds its entropy at a target (train.py --entropy_target)
BETA_PANELS = [("cegppo/beta1", "beta1 in force (steered)"), ("cegppo/beta2", "beta2 in force (steered)")]
# flags that change how a run is computed or shown, not what it learns (shared_prefix: the same numbers,
# to rounding): runs that differ only in these are seeds of one setting
NOT_A_SETTING = {"seed", "seeds", "jobs", "progress", "token_groups", "shared_prefix", "output_dir", "resume", "max_steps", "save_steps", "eval_steps", "logging_steps", "wandb",
                 "generation_batch_size", "threads", "preset", "rollout_model", "eval_samples", "eval_temperature",
                 "eval_pass_k"}


def read_config(run_dir):
    try:
        with open(os.path.join(run_dir, "config.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def group_by_setting(run_dirs, ignore=NOT_A_SETTING):
    """[(label, [run_dir, ...])]: runs whose configs differ only by seed (and the other `ignore`d
    flags) share a group, in first-seen order."""
    configs = {r: read_config(r) for r in run_dirs}
    groups = {}
    for r, c in configs.items():
        key = json.dumps({k: v for k, v in c.items() if k not in ignore}, sort_keys=True) if c else r
        groups.setdefault(key, []).append(r)
    # label each group by the flags whose values differ between groups (the loss knobs if none do); a knob
    # a setting does not have (None: CISPO's betas) neither makes a flag differ nor is shown, but a target
    # that is off (None) differs from one that is set
    firsts = [configs[g[0]] for g in groups.values()]
    varying = [k for k in dict.fromkeys(k for c in firsts for k in c) if k not in ignore
               and len({json.dumps(c.get(k)) for c in firsts if c.get(k) is not None or k == "entropy_target"}) > 1]
    knobs = ["algo", "beta1", "beta2", "entropy_target"]                # (a target shown only where set)

    def named(c, keys):
        return " ".join(f"{k}={c[k]:g}" if isinstance(c.get(k), float) else f"{k}={c.get(k)}" for k in keys
                        if c.get(k) is not None)
    out = []
    for runs in groups.values():
        c = configs[runs[0]]   # (the one setting without a target, beside targets only, is named by its knobs)
        label = (named(c, varying) or named(c, knobs)) if c else os.path.basename(os.path.normpath(runs[0]))
        out.append((label + (f" ({len(runs)} seeds)" if len(runs) > 1 else ""), runs))
    return out


def smooth(ys, w):
    out, acc = [], []
    for y in ys:
        acc = (acc + [y])[-w:]
        out.append(sum(acc) / len(acc))
    return out


def seed_band(curves):
    """Mean, low and high over seeds at the steps every seed has: ([steps], [mean], [low], [high])."""
    common = sorted(set.intersection(*(set(c) for c in curves)))
    mean = [sum(c[s] for c in curves) / len(curves) for s in common]
    return common, mean, [min(c[s] for c in curves) for s in common], [max(c[s] for c in curves) for s in common]


def read_rows(run):
    """A run's metrics rows (a line cut off by a crash or power cut, not yet resumed, left out)."""
    return complete_rows(os.path.join(run, "metrics.jsonl"))


def pyplot():
    """matplotlib's pyplot, drawing to files only (no window: also on machines with no display).
    Imported here, not at the top: train.py runs without matplotlib (a bare GPU image, docs/gpu.md)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


_NO_MATPLOTLIB_SAID = []


def plot_runs(run_dirs, output, window=5, required=False, metrics=None):
    """One figure, one colour per setting; several seeds of a setting become a mean line with a min-max band.
    metrics: the panels to draw (keys of PANELS and BETA_PANELS, or eval/pass@K of runs with --eval_samples), by
    default the ten, and the two betas where a run has --entropy_target (its target a dotted line on the entropy
    panel). Without matplotlib: nothing drawn, and one line said once (train.py); required=True raises instead."""
    try:
        plt = pyplot()
    except ImportError:
        if required:
            raise
        if not _NO_MATPLOTLIB_SAID:
            _NO_MATPLOTLIB_SAID.append(True)
            print("matplotlib is not installed: no curves.png (pip install matplotlib; metrics.jsonl has "
                  "every number)", file=sys.stderr)
        return
    titles, targets = dict(PANELS + BETA_PANELS), [read_config(r).get("entropy_target") for r in run_dirs]
    panels = [(k, titles.get(k) or pass_title(k)) for k in metrics] if metrics else \
        PANELS + (BETA_PANELS if any(targets) else [])
    rows_, cols = (2, (len(panels) + 1) // 2) if metrics is None else (1, len(panels))
    fig, axes = plt.subplots(rows_, cols, figsize=(4.4 * cols + 0.6, 4.25 * rows_ + 1), squeeze=False)
    for i, (label, runs) in enumerate(group_by_setting(run_dirs)):
        rows = [read_rows(r) for r in runs]
        for ax, (key, _) in zip(axes.flat, panels):
            curves = [{r["step"]: r[key] for r in rs if key in r} for rs in rows]
            if not all(curves):
                continue
            xs, mean, lo, hi = seed_band(curves)
            w = 1 if key.startswith("eval/") else window
            if len(runs) > 1:
                ax.fill_between(xs, smooth(lo, w), smooth(hi, w), color=f"C{i}", alpha=0.2, lw=0)
            elif not key.startswith("eval/"):
                ax.plot(xs, mean, color=f"C{i}", alpha=0.25, lw=1)
            ax.plot(xs, smooth(mean, w), "o-" if key.startswith("eval/") else "-", color=f"C{i}", lw=2, label=label)
            target = read_config(runs[0]).get("entropy_target")
            if key == "entropy" and target:
                ax.axhline(target, color=f"C{i}", ls=":", lw=1.5)
    for ax, (key, title) in zip(axes.flat, panels):
        ax.set_title(title, fontsize=12)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if key.endswith("_drive"):
            ax.axhline(0, color="k", lw=0.8)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    ncol = min(2 if rows_ == 1 else 4, max(1, len(labels)))
    fig.legend(handles, labels, loc="upper center", ncol=ncol, fontsize=11)
    top = 0.93 if rows_ == 2 else 1 - 0.07 * (1 + (len(labels) - 1) // ncol)
    fig.tight_layout(rect=(0, 0, 1, top))
    save(fig, output)


def pass_title(key):
    """A panel's title for eval/pass@k (train.py --eval_samples), or the key itself."""
    return f"held-out pass@{key.split('@')[1]} (sampled)" if key.startswith("eval/pass@") else key


def save(fig, output, dpi=80):
    """Write through a temp file and a rename: a reader never sees half a PNG."""
    tmp = output + ".tmp.png"
    fig.savefig(tmp, dpi=dpi)
    pyplot().close(fig)
    os.replace(tmp, output)


def gradient_weight(ratios, advantage, epsilon=0.2, beta1=0.0, beta2=0.0, algo="cegppo"):
    """The factor F in  d loss / d log pi = -F * A  of one token (paper Eq. 10), for each ratio in
    `ratios`, taken by autograd from the trainer's own loss (cegppo.policy_loss): the figure draws
    the loss the trainer uses, not a second copy of its cases. PPO-clip (betas 0): F = r inside the
    clip range or where the clip does not bind, 0 where it binds; CE-GPPO: beta1 * (1 - eps) and
    beta2 * (1 + eps) in the two clip regions instead of 0; algo "cispo": min(r, 1 + eps) everywhere."""
    import torch
    import cegppo
    r = torch.tensor(ratios, dtype=torch.float64)[None, :]                  # [1, N] one token per ratio
    logp = torch.zeros_like(r, requires_grad=True)                          # [1, N] log pi, at the ratio r
    knobs = dict(epsilon_low=epsilon, epsilon_high=epsilon, beta1=beta1, beta2=beta2,
                 dual_clip=cegppo.ALGOS["cegppo"]["dual_clip"])
    loss, _ = cegppo.policy_loss(algo, logp, -torch.log(r), torch.tensor([advantage], dtype=torch.float64),
                                 torch.ones_like(r), num_tokens=1, **knobs)
    loss.backward()
    return (-logp.grad[0] / advantage).tolist()


def plot_gradient_weight(output, epsilon=0.2, beta1=0.5, beta2=1.0):
    """The README's figure: F against the ratio, for A > 0 and A < 0, PPO-clip beside CE-GPPO and CISPO
    (at its own cap, cegppo.ALGOS: over these ratios it keeps F = r for every token)."""
    import cegppo
    cispo_cap = 1 + cegppo.ALGOS["cispo"]["epsilon_high"]
    rs = [i / 200 for i in range(1, 401)]
    fig, axes = pyplot().subplots(1, 2, figsize=(11, 4))
    for ax, adv, title in ((axes[0], 1.0, "A > 0: high clip region r > 1+eps (PA&LP)"),
                           (axes[1], -1.0, "A < 0: low clip region r < 1-eps (NA&LP)")):
        ax.plot(rs, gradient_weight(rs, adv, epsilon), lw=3, color="C0", label="PPO-clip / GRPO")
        ax.plot(rs, gradient_weight(rs, adv, epsilon, beta1, beta2), "--", lw=2, color="C3",
                label=f"CE-GPPO (beta1 {beta1:g}, beta2 {beta2:g})")
        ax.plot(rs, gradient_weight(rs, adv, cispo_cap - 1, algo="cispo"), ":", lw=2, color="C2",
                label=f"CISPO (weight cap {cispo_cap:g})")
        for x in (1 - epsilon, 1 + epsilon):
            ax.axvline(x, color="gray", lw=0.8, ls=":")
        ax.set(title=title, xlabel="ratio r = pi / pi_old", ylabel="gradient weight F", ylim=(-0.1, 2.1))
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left")
    fig.tight_layout()
    save(fig, output, dpi=90)


# ----------------------------------------------------------------------------------------------
# The seed table: one row per setting, collapses counted, differences from a baseline paired by seed
# ----------------------------------------------------------------------------------------------
def collapse_step(rows, high=0.3, low=0.1, window=5):
    """The step at which a run collapsed, or None: its reward, averaged over `window` steps, fell
    below `low` after it had been above `high` (it lost what it had learned); a run that
    train.py stopped for collapse (--collapse_patience; its last row says "stopped": "collapsed")
    counts too, at its last step."""
    rewards, seen_high = [r["reward"] for r in rows], False
    for i in range(len(rewards)):
        avg = sum(rewards[max(0, i - window + 1):i + 1]) / min(i + 1, window)
        seen_high = seen_high or avg >= high
        if seen_high and avg < low:
            return rows[i]["step"]
    return rows[-1]["step"] if rows[-1].get("stopped") == "collapsed" else None


def median(xs):
    xs = sorted(xs)
    return (xs[(len(xs) - 1) // 2] + xs[len(xs) // 2]) / 2


def heldout_auc(evals):
    """The area under the held-out curve [(step, accuracy)] (trapezoids) over the steps it spans:
    the run's mean held-out accuracy, early learning counted; the single evaluation for one."""
    if len(evals) < 2:
        return evals[0][1] if evals else float("nan")
    area = sum((s1 - s0) * (a0 + a1) / 2 for (s0, a0), (s1, a1) in zip(evals, evals[1:]))
    return area / (evals[-1][0] - evals[0][0])


def run_summary(run, target=None):
    """The numbers the lab tables report for one run; with an entropy target (the given one, else the run's own
    --entropy_target), how far its entropy stayed from it: the mean of |log(H / target)| over the second half
    of the steps (0.1: about 10% off)."""
    rows, cfg = read_rows(run), read_config(run)
    n = len(rows)
    last = rows[n - max(1, n // 5):]                       # the last 20% of the steps
    evals = [(r["step"], r["eval/accuracy"]) for r in rows if "eval/accuracy" in r]
    mean = lambda xs: sum(xs) / max(1, len(xs))             # noqa: E731
    step = collapse_step(rows)
    passes = {}                                             # pass@k at the end and its area (--eval_samples)
    for key in sorted({k for r in rows for k in r if k.startswith("eval/pass@")}, key=lambda k: int(k.split("@")[1])):
        curve = [(r["step"], r[key]) for r in rows if key in r]
        passes.update({f"{key[5:]}_end": curve[-1][1], f"{key[5:]}_auc": heldout_auc(curve)})
    target = target or cfg.get("entropy_target")
    if target:
        passes["off_target"] = mean([abs(math.log(max(r["entropy"], 1e-12) / target)) for r in rows[n // 2:]])
    return {"seed": cfg.get("seed"), "steps": n,
            "entropy_last20": mean([r["entropy"] for r in last]),
            "heldout_end": evals[-1][1] if evals else float("nan"),
            "heldout_auc": heldout_auc(evals), **passes,
            "reward_first10": mean([r["reward"] for r in rows[:10]]),
            "reward_last10": mean([r["reward"] for r in rows[-10:]]),
            "clip_low": mean([r["clip_ratio/low_mean"] for r in rows]),
            "clip_high": mean([r["clip_ratio/high_mean"] for r in rows]),
            "kl_median": median([r["approx_kl"] for r in rows]),
            "kl_max": max(r["approx_kl"] for r in rows),
            "collapse_step": step,
            "recovered": step is not None and mean([r["reward"] for r in rows[-10:]]) >= 0.3}


def mean_se(xs):
    """(mean, standard error) of a list; se is nan for fewer than two values."""
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, float("nan")
    return m, (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 / len(xs) ** 0.5


TABLE_STATS = (("entropy_last20", "entropy, last 20%", 4), ("heldout_end", "held-out, end", 3),
               ("heldout_auc", "held-out, area under the curve", 3),
               ("reward_first10", "reward, first 10", 3), ("reward_last10", "reward, last 10", 3),
               ("clip_low", "clip low", 4), ("clip_high", "clip high", 4),
               ("kl_median", "median KL per step", 4), ("kl_max", "max KL per step", 3))
DIFF_STATS = TABLE_STATS[:5]          # what the paired differences from a baseline report


def pass_stats(groups):
    """The table's pass@k columns, for the k every run logged (train.py --eval_samples): at the end, and the
    area under its curve; and how far entropy stayed off its target, where every run has one (run_summary)."""
    keys = [set(k for k in r if k.startswith("pass@") or k == "off_target") for _, runs in groups for r in runs]
    common = set.intersection(*keys) if keys else set()
    off = (("off_target", "entropy off target, 2nd half", 3),) if "off_target" in common else ()
    return off + tuple((k, f"{k.replace('_end', ', end').replace('_auc', ', AUC')}", 3)
                       for k in sorted(common - {"off_target"}, key=lambda k: (int(k[5:].split("_")[0]), k.endswith("auc"))))


def seed_table(run_dirs, baseline=None, entropy_target=None):
    """Markdown: per setting, mean ± standard error over seeds (all runs, then without the collapsed
    ones), collapses counted; with a baseline label, each setting's difference from it, paired by seed.
    entropy_target: every run's distance from it too (run_summary)."""
    groups = [(label, [run_summary(r, entropy_target) for r in runs]) for label, runs in group_by_setting(run_dirs)]
    table_stats, diff_stats = TABLE_STATS + pass_stats(groups), DIFF_STATS + pass_stats(groups)
    fmt = lambda m_se, d: f"{m_se[0]:.{d}f} ± {m_se[1]:.{d}f}"   # noqa: E731
    out = ["| setting | seeds | collapsed | " + " | ".join(name for _, name, _ in table_stats) + " |",
           "|---|---|---|" + "---|" * len(table_stats)]
    for label, runs in groups:
        down = [r for r in runs if r["collapse_step"] is not None]
        what = f"{len(down)} of {len(runs)}" + (f" (steps {', '.join(str(r['collapse_step']) for r in down)}; "
                                                 f"{sum(r['recovered'] for r in down)} recovered)" if down else "")
        out.append(f"| {label} | {len(runs)} | {what} | " +
                   " | ".join(fmt(mean_se([r[k] for r in runs]), d) for k, _, d in table_stats) + " |")
        kept = [r for r in runs if r["collapse_step"] is None]
        if down and len(kept) >= 1:
            out.append(f"| {label}, without the collapsed | {len(kept)} | - | " +
                       " | ".join(fmt(mean_se([r[k] for r in kept]), d) for k, _, d in table_stats) + " |")
    if baseline is None:
        return "\n".join(out) + "\n"
    base = next((runs for label, runs in groups if label.startswith(baseline)), None)
    if base is None:
        raise ValueError(f"--baseline {baseline}: no setting's label starts with it")
    out += ["", f"Differences from {baseline}, paired by seed (mean ± standard error; * beyond 2 standard errors):", "",
            "| setting | seeds | " + " | ".join(name for _, name, _ in diff_stats) + " |",
            "|---|---|" + "---|" * len(diff_stats)]
    for label, runs in groups:
        if runs is base:
            continue
        cells = [paired_difference(runs, base, k, d) for k, _, d in diff_stats]
        if cells[0] is not None:
            out.append(f"| {label} | {len(cells[0][2])} | " + " | ".join(c[3] for c in cells) + " |")
    return "\n".join(out) + "\n"


def paired_difference(runs, base, key, digits=3):
    """(mean, standard error, seeds, text) of runs' `key` minus base's, paired by seed (run summaries);
    None where no seed is in both. The text marks a difference beyond two standard errors with *."""
    by_seed = {r["seed"]: r for r in base}
    pairs = [(r, by_seed[r["seed"]]) for r in runs if r["seed"] in by_seed]
    if not pairs:
        return None
    m, se = mean_se([a[key] - b[key] for a, b in pairs])
    return m, se, [a["seed"] for a, _ in pairs], f"{m:+.{digits}f} ± {se:.{digits}f}" + (" *" if beyond(m, se) else "")


def beyond(m, se):
    """Is a difference beyond two standard errors (se nan: one seed, never)?"""
    return se == se and abs(m) > 2 * se


# ----------------------------------------------------------------------------------------------
# The step-size map: each setting's difference from a baseline, paired by seed, at each learning rate
# ----------------------------------------------------------------------------------------------
MAP_STATS = (("heldout_end", "held-out accuracy at the end", 3), ("heldout_auc", "held-out, area under the curve", 3),
             ("entropy_last20", "entropy, last 20% of steps", 4))


def step_size_points(run_dirs, baseline):
    """The map's numbers: [(label, learning rate, summaries, baseline's summaries)] for every setting
    (runs grouped by everything but seed and learning rate) at every learning rate the baseline ran
    too, the baseline's own points included; sorted by setting, then learning rate."""
    methods = group_by_setting(run_dirs, ignore=NOT_A_SETTING | {"learning_rate"})
    split = []
    for label, runs in methods:
        by_lr = {}
        for r in runs:
            by_lr.setdefault(read_config(r).get("learning_rate"), []).append(run_summary(r))
        split.append((label.split(" (")[0], by_lr))
    base = next((by_lr for label, by_lr in split if label.startswith(baseline)), None)
    if base is None:
        raise ValueError(f"--baseline {baseline}: no setting's label starts with it")
    return [(label, lr, by_lr[lr], base[lr]) for label, by_lr in split for lr in sorted(by_lr) if lr in base]


def step_size_map(run_dirs, output, baseline="algo=grpo"):
    """The lab's map: x the step size, as the baseline's median per-step KL to pi_old (its learning
    rate written beside each point); y each setting's difference from the baseline at that step size,
    paired by seed, with bars of two standard errors (a bar that misses 0: beyond them)."""
    points = step_size_points(run_dirs, baseline)
    plt = pyplot()
    fig, axes = plt.subplots(1, len(MAP_STATS), figsize=(5.2 * len(MAP_STATS), 4.6))
    labels = [lb for lb in dict.fromkeys(p[0] for p in points) if not lb.startswith(baseline)]
    for ax, (key, title, _) in zip(axes, MAP_STATS):
        for i, label in enumerate(labels):
            mine = [(median([b["kl_median"] for b in base]), lr, paired_difference(runs, base, key))
                    for lb, lr, runs, base in points if lb == label]
            shift = 1.05 ** (i - (len(labels) - 1) / 2)      # settings side by side at one step size, not on top
            mine = [(x * shift, lr, d) for x, lr, d in mine]
            xs, ms, ses = [x for x, _, _ in mine], [d[0] for _, _, d in mine], [d[1] for _, _, d in mine]
            ax.errorbar(xs, ms, yerr=[2 * e if e == e else 0 for e in ses], fmt="o-" if len(xs) > 1 else "o",
                        color=f"C{i}", lw=2, capsize=4, label=label)
            for x, lr, d in mine:
                ax.plot([x], [d[0]], "o", ms=9, color=f"C{i}", mfc=f"C{i}" if beyond(d[0], d[1]) else "white")
                if i == 0:
                    ax.annotate(f"lr {lr:g}", (x / shift, 0.02), xycoords=("data", "axes fraction"), ha="center",
                                fontsize=9, color="gray")
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.margins(x=0.12)
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        ax.set(title=f"{title}: minus {baseline}", xlabel=f"step size: {baseline}'s median KL(pi_old || pi) per step")
        ax.grid(alpha=0.3)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="upper center", ncol=min(3, max(1, len(names))), fontsize=10)
    fig.text(0.01, 0.01, "paired by seed; bars: 2 standard errors; filled: beyond them", fontsize=9, color="gray")
    fig.tight_layout(rect=(0, 0.03, 1, 1 - 0.07 * (1 + (len(names) - 1) // 3)))
    save(fig, output)


def verdict_of(diffs):
    """ahead / behind / level from paired differences [(mean, se, ...)]: ahead where one is beyond two
    standard errors above 0 and none below, behind the other way, mixed where both, else level."""
    signs = {m > 0 for m, se, *_ in diffs if beyond(m, se)}
    if len(signs) == 2:
        return "mixed"
    return "ahead" if True in signs else "behind" if False in signs else "level"


def map_table(run_dirs, baseline="algo=grpo"):
    """Markdown: one row per setting and learning rate, with its difference from the baseline at the
    same learning rate (paired by seed) and the verdict on held-out accuracy (at the end and its area
    under the curve, verdict_of)."""
    stats = (("heldout_end", ".3f"), ("heldout_auc", ".3f"), ("entropy_last20", ".4f"), ("clip_low", ".4f"),
             ("clip_high", ".4f"), ("kl_median", ".1e"), ("kl_max", ".1e"))
    out = ["| setting | lr | steps | seeds | collapsed | held-out, end | held-out, AUC | entropy, last 20% | clip low "
           "| clip high | median KL | max KL | vs baseline: held-out, end | held-out, AUC | entropy | verdict |",
           "|---|---|---|---|---|" + "---|" * (len(stats) + 4)]
    points = step_size_points(run_dirs, baseline)
    points.sort(key=lambda p: (-p[1], not p[0].startswith(baseline)))     # by step size, its baseline first
    for label, lr, runs, base in points:
        cells = [f"{mean_se([r[k] for r in runs])[0]:{f}} ± {mean_se([r[k] for r in runs])[1]:{f}}" for k, f in stats]
        if label.startswith(baseline):
            diffs, verdict = ["", "", ""], "(baseline)"
        else:
            ds = [paired_difference(runs, base, k, d) for k, _, d in MAP_STATS]
            diffs = [x[3] for x in ds]
            verdict = verdict_of(ds[:2])
        down = sum(r["collapse_step"] is not None for r in runs)
        out.append(f"| {label} | {lr:g} | {max(r['steps'] for r in runs)} | {len(runs)} | {down} of {len(runs)} | "
                   + " | ".join(cells + diffs) + f" | {verdict} |")
    return "\n".join(out) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="*", help="train.py output folders (seeds of one setting are banded together)")
    ap.add_argument("--output", default="compare.png", help="PNG to write")
    ap.add_argument("--window", type=int, default=5, help="moving-average window for the thick lines")
    ap.add_argument("--gradient_weight", "--gradient-weight", metavar="PNG",
                    help="draw the gradient weight against the ratio instead")
    ap.add_argument("--metrics", type=lambda t: t.split(","), default=None, metavar="KEYS",
                    help="draw only these panels, e.g. entropy,eval/accuracy,eval/pass@16 (default: all ten, and the "
                    "betas of a run with --entropy_target)")
    ap.add_argument("--table", action="store_true", help="also print the seed table (mean ± standard error per "
                    "setting, collapses counted) in Markdown")
    ap.add_argument("--entropy_target", type=float, metavar="H", help="with --table: how far each run's entropy "
                    "stayed from H (mean |log(entropy / H)| over its second half); default: a run's own --entropy_target")
    ap.add_argument("--baseline", metavar="LABEL", help="with --table or --map: differences from the setting whose "
                    "label starts with LABEL (e.g. algo=grpo), paired by seed")
    ap.add_argument("--tokens", metavar="RUN", help="(re)write RUN/tokens.html, the page of what the update did "
                    "to each recorded token (from RUN/tokens.jsonl), instead of curves")
    ap.add_argument("--map", metavar="PNG", help="draw the step-size map instead of curves: each setting's "
                    "difference from --baseline at each learning rate (and print its table)")
    args = ap.parse_args(argv)
    if args.gradient_weight:
        plot_gradient_weight(args.gradient_weight)
        print(f"wrote {args.gradient_weight}")
        return 0
    if args.tokens:
        if not os.path.isfile(os.path.join(args.tokens, "tokens.jsonl")):
            print(f"error: --tokens {args.tokens}: no tokens.jsonl (a train.py run with --token_groups > 0)",
                  file=sys.stderr)
            return 2
        from engine import token_page
        print(f"wrote {token_page.write_page(args.tokens, token_steps(args.tokens))}")
        return 0
    if not args.runs:
        print("error: give at least one train.py output folder (or --gradient_weight PNG)", file=sys.stderr)
        return 2
    for r in args.runs:
        if not os.path.isfile(os.path.join(r, "metrics.jsonl")):
            print(f"error: {r}: no metrics.jsonl (not a train.py output folder)", file=sys.stderr)
            return 2
    if args.window < 1:
        print(f"error: --window {args.window}: must be at least 1", file=sys.stderr)
        return 2
    if args.entropy_target is not None and not args.entropy_target > 0:
        print(f"error: --entropy_target {args.entropy_target:g}: must be > 0 (nats per token)", file=sys.stderr)
        return 2
    if args.map:
        try:
            step_size_map(args.runs, args.map, args.baseline or "algo=grpo")
            print(f"wrote {args.map}")
            print(map_table(args.runs, args.baseline or "algo=grpo"))
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    unknown = [k for k in args.metrics or [] if k not in dict(PANELS + BETA_PANELS)
               and not re.fullmatch(r"eval/pass@\d+", k)]
    if unknown:
        print(f"error: --metrics {','.join(unknown)}: not a panel; one of "
              f"{', '.join(k for k, _ in PANELS + BETA_PANELS)}, eval/pass@K", file=sys.stderr)
        return 2
    plot_runs(args.runs, args.output, args.window, required=True, metrics=args.metrics)
    print(f"wrote {args.output}")
    if args.table:
        try:
            print(seed_table(args.runs, args.baseline, args.entropy_target))
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
