"""Draw training curves of one or several runs into one PNG.

    python plot.py runs/lab-grpo runs/lab-cegppo runs/lab-b1-1 --output compare.png

Each run is a train.py output folder (metrics.jsonl + config.json), drawn as one labelled line
per panel: reward, held-out accuracy, entropy, left / right clip fractions, response length and
the entropy drive of the four token quadrants (cegppo.token_quadrants). train.py calls the same
function to redraw its own curves.png as it trains.
"""

import argparse
import json
import os
import sys

PANELS = [
    ("reward", "train reward (mean)"),
    ("eval/accuracy", "held-out accuracy (greedy)"),
    ("entropy", "entropy (nats / token)"),
    ("clip_frac_low", "left clip fraction (r < 1-eps, A < 0)"),
    ("clip_frac_high", "right clip fraction (r > 1+eps, A > 0)"),
    ("response_length", "response length (tokens)"),
    ("pa_hp_drive", "PA&HP entropy drive (lowers H)"),
    ("pa_lp_drive", "PA&LP entropy drive (raises H)"),
    ("na_hp_drive", "NA&HP entropy drive (raises H)"),
    ("na_lp_drive", "NA&LP entropy drive (lowers H)"),
]


def label(run_dir):
    """'cegppo b1=0.5 b2=1' from the run's config.json, else the folder name."""
    try:
        c = json.load(open(os.path.join(run_dir, "config.json")))
        return f"{c['algo']} b1={c['beta1']:g} b2={c['beta2']:g} eps={c['epsilon_low']:g}/{c['epsilon_high']:g}"
    except (OSError, KeyError, ValueError, TypeError):
        return os.path.basename(os.path.normpath(run_dir))


def smooth(ys, w):
    out, acc = [], []
    for y in ys:
        acc = (acc + [y])[-w:]
        out.append(sum(acc) / len(acc))
    return out


def plot_runs(run_dirs, output, window=5):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 5, figsize=(22, 8.5))
    for i, run in enumerate(run_dirs):
        rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl")) if line.strip()]
        color = f"C{i}"
        for ax, (key, _) in zip(axes.flat, PANELS):
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if not pts:
                continue
            xs, ys = zip(*pts)
            if key == "eval/accuracy":
                ax.plot(xs, ys, "o-", color=color, label=label(run))
            else:
                ax.plot(xs, ys, color=color, alpha=0.25, lw=1)
                ax.plot(xs, smooth(ys, window), color=color, lw=2, label=label(run))
    for ax, (key, title) in zip(axes.flat, PANELS):
        ax.set_title(title, fontsize=12)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if key.endswith("_drive"):
            ax.axhline(0, color="k", lw=0.8)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=min(4, max(1, len(labels))), fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    tmp = output + ".tmp.png"
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, output)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="train.py output folders")
    ap.add_argument("--output", default="compare.png", help="PNG to write")
    ap.add_argument("--window", type=int, default=5, help="moving-average window for the thick lines")
    args = ap.parse_args(argv)
    for r in args.runs:
        if not os.path.isfile(os.path.join(r, "metrics.jsonl")):
            print(f"error: {r}: no metrics.jsonl (not a train.py output folder)", file=sys.stderr)
            return 2
    plot_runs(args.runs, args.output, args.window)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
