"""Draw training curves of one or several runs into one PNG, and the README's figure of the loss's gradient weight.

    python plot.py runs/lab-grpo runs/lab-cegppo --output compare.png
    python plot.py runs/lab-b1-0/seed-* runs/lab-b1-1/seed-* --output seeds.png     # one band per setting
    python plot.py --gradient-weight docs/gradient_weight.png

Each run is a train.py output folder (metrics.jsonl + config.json). Runs whose configurations
differ only in --seed (and the output folder) are one setting: drawn as the mean over seeds with a
band from the lowest to the highest seed, labelled by the flags that differ between settings.
Panels: reward, held-out accuracy, entropy, the two clip regions, response length and the
entropy drive of the four token quadrants (cegppo.token_quadrants). train.py calls plot_runs to
redraw its own curves.png as it trains.
"""

import argparse
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")                 # files only, no window: also on machines with no display
import matplotlib.pyplot as plt      # noqa: E402

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
NOT_A_SETTING = {"seed", "seeds", "output_dir", "resume", "max_steps", "save_steps", "eval_steps", "logging_steps", "wandb",
                 "generation_batch_size", "threads", "preset", "rollout_model"}


def read_config(run_dir):
    try:
        with open(os.path.join(run_dir, "config.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def group_by_setting(run_dirs):
    """[(label, [run_dir, ...])]: runs whose configs differ only by seed share a group, in first-seen order."""
    configs = {r: read_config(r) for r in run_dirs}
    groups = {}
    for r, c in configs.items():
        key = json.dumps({k: v for k, v in c.items() if k not in NOT_A_SETTING}, sort_keys=True) if c else r
        groups.setdefault(key, []).append(r)
    # label each group by the flags whose values differ between groups (all of the loss knobs if none do)
    firsts = [configs[g[0]] for g in groups.values()]
    varying = [k for k in firsts[0] if k not in NOT_A_SETTING and len({json.dumps(c.get(k)) for c in firsts}) > 1]
    shown = varying or ["algo", "beta1", "beta2"]
    out = []
    for runs in groups.values():
        c = configs[runs[0]]
        label = " ".join(f"{k}={c[k]:g}" if isinstance(c.get(k), float) else f"{k}={c.get(k)}" for k in shown) \
            if c else os.path.basename(os.path.normpath(runs[0]))
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
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_runs(run_dirs, output, window=5):
    """One figure, one colour per setting; several seeds of a setting become a mean line with a min-max band."""
    fig, axes = plt.subplots(2, 5, figsize=(22, 8.5))
    for i, (label, runs) in enumerate(group_by_setting(run_dirs)):
        rows = [read_rows(r) for r in runs]
        for ax, (key, _) in zip(axes.flat, PANELS):
            curves = [{r["step"]: r[key] for r in rs if key in r} for rs in rows]
            if not all(curves):
                continue
            xs, mean, lo, hi = seed_band(curves)
            w = 1 if key == "eval/accuracy" else window
            if len(runs) > 1:
                ax.fill_between(xs, smooth(lo, w), smooth(hi, w), color=f"C{i}", alpha=0.2, lw=0)
            elif key != "eval/accuracy":
                ax.plot(xs, mean, color=f"C{i}", alpha=0.25, lw=1)
            ax.plot(xs, smooth(mean, w), "o-" if key == "eval/accuracy" else "-", color=f"C{i}", lw=2, label=label)
    for ax, (key, title) in zip(axes.flat, PANELS):
        ax.set_title(title, fontsize=12)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if key.endswith("_drive"):
            ax.axhline(0, color="k", lw=0.8)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=min(4, max(1, len(labels))), fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    save(fig, output)


def save(fig, output, dpi=80):
    """Write through a temp file and a rename: a reader never sees half a PNG."""
    tmp = output + ".tmp.png"
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    os.replace(tmp, output)


def gradient_weight(ratio, advantage, epsilon=0.2, beta1=0.0, beta2=0.0):
    """The factor F in  d loss / d theta = -F * A * grad log pi  for one token (paper Eq. 10).

    PPO-clip: F = r inside the clip range or where the clip does not bind, 0 where it binds.
    CE-GPPO: beta1 * (1 - eps) and beta2 * (1 + eps) in the two clip regions instead of 0.
    """
    if advantage < 0 and ratio < 1 - epsilon:
        return beta1 * (1 - epsilon)
    if advantage > 0 and ratio > 1 + epsilon:
        return beta2 * (1 + epsilon)
    return ratio


def plot_gradient_weight(output, epsilon=0.2, beta1=0.5, beta2=1.0):
    """The README's figure: F against the ratio, for A > 0 and A < 0, PPO-clip beside CE-GPPO."""
    rs = [i / 200 for i in range(1, 401)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, adv, title in ((axes[0], 1.0, "A > 0: high clip region r > 1+eps (PA&LP)"),
                           (axes[1], -1.0, "A < 0: low clip region r < 1-eps (NA&LP)")):
        ax.plot(rs, [gradient_weight(r, adv, epsilon) for r in rs], lw=3, color="C0", label="PPO-clip / GRPO")
        ax.plot(rs, [gradient_weight(r, adv, epsilon, beta1, beta2) for r in rs], "--", lw=2, color="C3",
                label=f"CE-GPPO (beta1 {beta1:g}, beta2 {beta2:g})")
        for x in (1 - epsilon, 1 + epsilon):
            ax.axvline(x, color="gray", lw=0.8, ls=":")
        ax.set(title=title, xlabel="ratio r = pi / pi_old", ylabel="gradient weight F", ylim=(-0.1, 2.1))
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left")
    fig.tight_layout()
    save(fig, output, dpi=90)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="*", help="train.py output folders (seeds of one setting are banded together)")
    ap.add_argument("--output", default="compare.png", help="PNG to write")
    ap.add_argument("--window", type=int, default=5, help="moving-average window for the thick lines")
    ap.add_argument("--gradient-weight", metavar="PNG", help="draw the gradient weight against the ratio instead")
    args = ap.parse_args(argv)
    if args.gradient_weight:
        plot_gradient_weight(args.gradient_weight)
        print(f"wrote {args.gradient_weight}")
        return 0
    if not args.runs:
        print("error: give at least one train.py output folder (or --gradient-weight PNG)", file=sys.stderr)
        return 2
    for r in args.runs:
        if not os.path.isfile(os.path.join(r, "metrics.jsonl")):
            print(f"error: {r}: no metrics.jsonl (not a train.py output folder)", file=sys.stderr)
            return 2
    if args.window < 1:
        print(f"error: --window {args.window}: must be at least 1", file=sys.stderr)
        return 2
    plot_runs(args.runs, args.output, args.window)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
