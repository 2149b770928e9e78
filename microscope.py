"""The entropy microscope: CE-GPPO's beta1 and beta2 at work on a tabular softmax policy, in seconds.

What it does. P "prompts", each its own softmax over K answers: the P x K logits are the only
parameters. A few answers per prompt are correct (reward 1, else 0). Each step samples G answers
per prompt, turns the rewards into group advantages (cegppo.group_advantages) and takes several
full-batch optimizer updates on that batch with the project's own cegppo.cegppo_loss, each answer
being one token. From the second update on the ratios leave 1, answers get clipped, and the two
betas decide what happens to their gradients. One command runs a grid of settings (GRPO, DAPO and
CE-GPPO with beta1 in {0, 0.5, 1} x beta2 in {0, 1}; beta1 = beta2 = 0 is GRPO knob for knob, so it
is drawn once) over several seeds, prints a table and writes microscope.json and microscope.png.

Why a tabular policy. It is the smallest system in which the paper's mechanism can be watched.
Every answer has its own logit, so a step changes entropy as the paper's first-order analysis of a
softmax policy says, with no shared parameters and no generalisation between prompts to blur it.
Entropy and expected reward are computed exactly from the probabilities, not estimated from
samples. And the whole grid over five seeds takes seconds on one core, so every claim comes with
its seed spread.

What to look for (the defaults, plain SGD; docs/microscope.png):
  * Entropy first rises, then falls: the confident wrong favourite is pushed down (NA&HP) and the
    rare correct answers up (PA&LP), which flattens the policy; then the correct answers take over.
  * beta1 (the low clip region, NA&LP): at fixed beta2, a larger beta1 ends with lower entropy.
    Final entropy for beta1 = 0 / 0.5 / 1: 0.42 / 0.26 / 0.19 at beta2 = 0, 0.16 / 0.08 / 0.05 at
    beta2 = 1 (5 seeds, standard errors <= 0.02). It acts late, once the rare answers are wrong ones.
  * beta2 (the high clip region, PA&LP): early on it raises entropy above GRPO's (2.75 against 2.23
    at step 4), then it speeds up convergence (expected reward 0.9 after 12-15 steps instead of
    26-29) and ends with lower entropy. DAPO's clip-higher does the same, less strongly.
  * 2-5% of answers sit in each clip region on average, up to 15% during the transition.
  * The drive panels describe the batch as sampled (token_quadrants, before any clipping or beta):
    they say which quadrants are populated and which way each pushes. With a larger beta1 the NA&LP
    drive fades sooner late in the run: the rare wrong answers it would push down are gone.
  * Where the paper's story does not hold: there, beta2 and clip-higher keep entropy up over a long
    run. Here the correct answers are few and fixed; once they are found there is nothing left to
    explore, and the extra exploration only speeds the collapse onto them.

How the defaults were chosen (measured). The issue's P 32, K 32, G 16, 8 updates per batch and
plain SGD from a confident start; a favourite 4 nats above the rest (probability 0.64), 4 correct
answers of 32 (expected reward 0.05 at the start), lr 0.3 and 50 steps reproduce the issue's
reference pattern (0.51 / 0.40 / 0.35 and 0.15 / 0.08 / 0.05). lr 0.1 with 2 correct answers
clipped under 1% of answers and the betas barely mattered; 100 steps brings every setting near 0.
The beta1 ordering held at every neighbour we tried: lr 0.2 and 0.4, favourite 3 and 5, 2 and 8
correct answers, K 16, G 8, 100 steps, the uniform start. Adam's default lr 0.02 gives about the
same KL per step as SGD's 0.3 (0.005 against 0.007 over 30 GRPO steps) and the same speed.

The second lesson: Adam (--optimizer adam; docs/microscope_adam.png). At that similar step size
the beta1 effect almost vanishes: 1.12 / 1.08 / 1.05 at beta2 = 0, 0.87 / 0.84 / 0.82 at beta2 = 1.
beta2 still lowers the final entropy (1.12 to 0.87) but no longer raises it early (peak 2.46
against GRPO's 2.81) and barely speeds convergence. The momentum does it, not the per-parameter
scaling: Adam without momentum (--momentum 0) brings the beta1 effect back (0.99 / 0.65 / 0.49),
and SGD with momentum (--momentum 0.9 --lr 0.03) loses it (0.15 / 0.13 / 0.12). Our reading:
momentum spreads each batch's gradient over later updates and batches, so fewer answers leave the
clip range within their own batch (clip low 1.2-1.5% against 2.8-4.6%), and what beta1 restores is a small
part of what moves the logits. The paper trains with AdamW; how much of a beta's effect survives
momentum there is a question this toy raises but cannot answer.

Outputs, in --output_dir: microscope.json with options, settings (their knobs), seeds, summary (the
table's rows), wall_s and curves {setting: {metric: [one list per seed]}}: entropy and reward have
steps + 1 values (index 0 is the start), clip_low / clip_high (share of answers in each clipped
region, mean over a step's updates) and <quadrant>_frac / _drive (cegppo.token_quadrants of the
batch as sampled) one per step. microscope.png: entropy, expected reward and the clip fractions on
top, the four quadrants' drives (share x mean drive: the four add up to the batch's mean) below.

    python microscope.py                      # SGD, the default grid, 5 seeds: about 4 s of compute
    python microscope.py --optimizer adam     # the second lesson
    python microscope.py --grid grpo,0.75:1 --seeds 10 --steps 100
"""

import argparse
import io
import json
import math
import os
import sys
import time

import matplotlib
import numpy as np
import torch
from PIL import Image

import cegppo

matplotlib.use("Agg")                 # files only, no window
import matplotlib.pyplot as plt      # noqa: E402

QUADRANTS = cegppo.QUADRANTS                          # token_quadrants' keys: quadrants/<q>_frac, _drive
METRICS = ("entropy", "reward", "clip_low", "clip_high") + tuple(
    f"{q}_{k}" for q in QUADRANTS for k in ("frac", "drive"))


# ----------------------------------------------------------------------------------------------
# The settings: which loss knobs each curve uses
# ----------------------------------------------------------------------------------------------
DEFAULT_GRID = "grpo,dapo,0.5:0,1:0,0:1,0.5:1,1:1"


def parse_grid(text):
    """"grpo,dapo,0.5:1" -> {name: knobs}. An entry is an ALGOS name or beta1:beta2, the latter with
    CE-GPPO's clip range and dual clip (so 0:0 is GRPO, knob for knob)."""
    settings = {}
    for item in (s.strip() for s in text.split(",") if s.strip()):
        if item == "cispo":     # not a setting of cegppo_loss, whose knobs the microscope varies
            raise ValueError("--grid cispo: the microscope compares clip-based settings of cegppo_loss; "
                             "CISPO runs in the lab (train.py --preset lab --algo cispo)")
        if item in cegppo.ALGOS:
            settings[item] = dict(cegppo.ALGOS[item])
            continue
        try:
            b1, b2 = (float(x) for x in item.split(":"))
        except ValueError:
            raise ValueError(f"--grid {item!r}: each entry is one of {', '.join(a for a in cegppo.ALGOS if a != 'cispo')} "
                             f"or beta1:beta2") from None
        if not all(math.isfinite(b) and b >= 0 for b in (b1, b2)):
            raise ValueError(f"--grid {item!r}: beta1 and beta2 must be finite and >= 0")
        settings[f"b1={b1:g} b2={b2:g}"] = dict(cegppo.ALGOS["cegppo"], beta1=b1, beta2=b2)
    if not settings:
        raise ValueError("--grid is empty")
    return settings


# ----------------------------------------------------------------------------------------------
# The system: S seeds x P prompts, each a softmax over K answers; the logits are the parameters
# ----------------------------------------------------------------------------------------------
def initial_logits(seeds, prompts, answers, correct, init, favourite):
    """Logits [S, P, K] and the correct-answer mask [S, P, K] (answers 0 .. correct - 1).

    In a tabular policy every answer has its own logit, so which answers are correct is only a
    label: fixing them to the first ones loses nothing. "confident": one wrong favourite (answer
    `correct`) sits `favourite` nats above the rest, as a model that is sure of a wrong answer.
    """
    S = len(seeds)
    logits = torch.zeros(S, prompts, answers)                    # [S, P, K]
    if init == "confident":
        logits[:, :, correct] = favourite
    is_correct = torch.zeros(S, prompts, answers)                # [S, P, K]
    is_correct[:, :, :correct] = 1.0
    return logits, is_correct


def sample(logits, gens, group_size):
    """G answers per prompt [S, P, G], seed s drawing from its own generator, so that a seed's run
    does not depend on which other seeds (or settings) run beside it."""
    cdf = torch.softmax(logits, dim=-1).cumsum(dim=-1)           # [S, P, K]
    u = torch.stack([torch.rand(logits.shape[1], group_size, generator=g) for g in gens])   # [S, P, G]
    u = u * cdf[..., -1:]                                        # cdf's end is 1 up to rounding
    return torch.searchsorted(cdf, u).clamp(max=logits.shape[-1] - 1)


def policy_state(logits, is_correct):
    """Entropy [S, P] and exact expected reward [S, P] of the current policy."""
    logp = torch.log_softmax(logits, dim=-1)                     # [S, P, K]
    p = logp.exp()
    return -(p * logp).sum(-1), (p * is_correct).sum(-1)


# ----------------------------------------------------------------------------------------------
# One run: a setting, all seeds at once
# ----------------------------------------------------------------------------------------------
def make_optimizer(params, optimizer, lr, momentum):
    # Both act elementwise on the logits, so the seeds stacked in one tensor stay independent runs.
    # `momentum` is SGD's momentum or Adam's first-moment decay (Adam's "beta1", no relation to
    # CE-GPPO's beta1: hence the other name).
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum)
    return torch.optim.Adam(params, lr=lr, betas=(momentum, 0.999))


def rl_step(logits, opt, answers, adv, knobs, updates):
    """`updates` full-batch steps on one rollout batch; returns per-seed clip fractions [S], [S]. knobs:
    cegppo_loss's, or a list of them, one per seed (--entropy_target: each seed's betas its own).

    answers: [S, P, G]; adv: [S, P*G]. Each answer is one token (logp [P*G, 1], mask of ones).
    num_tokens=G makes each seed's loss the sum over prompts of the group mean: the gradient a
    prompt's logits get does not depend on how many prompts there are.
    """
    S, P, G = answers.shape
    mask = torch.ones(P * G, 1)                                  # [P*G, 1]
    with torch.no_grad():
        old = torch.log_softmax(logits, -1).gather(-1, answers).view(S, P * G, 1)   # [S, P*G, 1]
    low, high = torch.zeros(S), torch.zeros(S)
    for _ in range(updates):
        logp = torch.log_softmax(logits, -1).gather(-1, answers).view(S, P * G, 1)  # [S, P*G, 1]
        total = 0.0
        for s in range(S):      # one loss call per seed: its clip statistics are that seed's own
            seed_knobs = knobs[s] if isinstance(knobs, list) else knobs
            loss, stats = cegppo.cegppo_loss(logp[s], old[s], adv[s], mask, num_tokens=G, **seed_knobs)
            total = total + loss
            low[s] += stats["clip_ratio/low_mean"] / updates
            high[s] += stats["clip_ratio/high_mean"] / updates
        opt.zero_grad()
        total.backward()
        opt.step()
    return low, high


def run_setting(knobs, seeds, *, prompts, answers, correct, init, favourite, group_size, steps,
                updates, optimizer, lr, momentum):
    """All seeds of one setting. Returns {metric: [S lists]}: entropy and reward have steps + 1
    values (index 0 is the start, index t the policy after step t), the others one per step. A setting
    with an entropy_target (--entropy_target) starts from its betas and moves each seed's after every
    step by cegppo.steer_betas, from the policy's entropy that step sampled from; its curves hold the
    betas in force at each step too."""
    knobs = dict(knobs)
    target = knobs.pop("entropy_target", None)
    betas = [(knobs["beta1"], knobs["beta2"], None) for _ in seeds]      # per seed: beta1, beta2, smoothed entropy
    S, P, G = len(seeds), prompts, group_size
    logits, is_correct = initial_logits(seeds, prompts, answers, correct, init, favourite)
    logits.requires_grad_(True)
    opt = make_optimizer([logits], optimizer, lr, momentum)
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    curves = {m: [[] for _ in seeds] for m in METRICS + (("beta1", "beta2") if target else ())}
    mask = torch.ones(P * G, 1)                                  # [P*G, 1]
    for step in range(steps + 1):
        with torch.no_grad():
            ent, rew = policy_state(logits, is_correct)          # [S, P], [S, P]
        for s in range(S):
            curves["entropy"][s].append(ent[s].mean().item())
            curves["reward"][s].append(rew[s].mean().item())
        if step == steps:       # the state after the last update; no batch to draw
            break
        with torch.no_grad():
            a = sample(logits, gens, G)                          # [S, P, G]
            r = is_correct.gather(-1, a)                         # [S, P, G] reward 1 / 0
            # groups are contiguous runs of G, so one call covers all seeds' prompts
            adv = cegppo.group_advantages(r.reshape(-1), G)[0].view(S, P * G)           # [S, P*G]
            logp = torch.log_softmax(logits, -1).gather(-1, a).view(S, P * G, 1)         # [S, P*G, 1]
            ent_tok = ent[:, :, None].expand(S, P, G).reshape(S, P * G, 1)               # [S, P*G, 1]
        for s in range(S):      # the quadrants of the batch as sampled, before the updates
            q = cegppo.token_quadrants(logp[s], ent_tok[s], adv[s], mask)
            for name in QUADRANTS:
                curves[f"{name}_frac"][s].append(q[f"quadrants/{name}_frac"])
                curves[f"{name}_drive"][s].append(q[f"quadrants/{name}_drive"])
        if target:
            seed_knobs = [dict(knobs, beta1=b1, beta2=b2) for b1, b2, _ in betas]
            for s, (b1, b2, smoothed) in enumerate(betas):
                curves["beta1"][s].append(b1)
                curves["beta2"][s].append(b2)
                betas[s] = cegppo.steer_betas(b1, b2, smoothed, ent[s].mean().item(), target)
        low, high = rl_step(logits, opt, a, adv, seed_knobs if target else knobs, updates)
        for s in range(S):
            curves["clip_low"][s].append(low[s].item())
            curves["clip_high"][s].append(high[s].item())
    return curves


def run_grid(settings, seeds, **opts):
    """Every setting over every seed, in-process. settings: {name: knobs} (see parse_grid); seeds:
    ints; opts: run_setting's keywords. Returns {"settings", "seeds", "options", "curves":
    {name: {metric: [one list per seed]}}}. A seed's curves do not depend on the other settings or
    seeds run beside it, so grpo and 0:0 with the same seed give identical curves."""
    torch.set_num_threads(1)    # tiny tensors: threads only add overhead
    curves = {name: run_setting(knobs, seeds, **opts) for name, knobs in settings.items()}
    return {"settings": settings, "seeds": list(seeds), "options": dict(opts), "curves": curves}


# ----------------------------------------------------------------------------------------------
# Reading the results: the table and the figure
# ----------------------------------------------------------------------------------------------
def mean_se(xs):
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, 0.0
    var = sum((x - m) ** 2 for x in xs) / (len(xs) - 1)
    return m, math.sqrt(var / len(xs))


def summarise(results, target=0.9, entropy_target=None):
    """One row per setting: final entropy and expected reward (mean and standard error over seeds),
    the first step whose expected reward reaches `target` (mean over the seeds that reach it), and
    the clip fractions averaged over steps and seeds; with an entropy_target, how far entropy stayed
    from it over the second half of the steps (the mean |log(H / target)|)."""
    rows = []
    for name, c in results["curves"].items():
        knobs = results["settings"][name]
        h, h_se = mean_se([run[-1] for run in c["entropy"]])
        off = entropy_target and mean_se([sum(abs(math.log(x / entropy_target)) for x in run[len(run) // 2:])
                                          / len(run[len(run) // 2:]) for run in c["entropy"]])
        r, r_se = mean_se([run[-1] for run in c["reward"]])
        hits = [next((t for t, x in enumerate(run) if x >= target), None) for run in c["reward"]]
        hits = [t for t in hits if t is not None]
        rows.append(dict(setting=name, beta1=knobs["beta1"], beta2=knobs["beta2"],
                         epsilon_high=knobs["epsilon_high"], entropy=h, entropy_se=h_se,
                         reward=r, reward_se=r_se, steps_to_target=sum(hits) / len(hits) if hits else None,
                         reached=len(hits), target=target,
                         clip_low=mean_se([sum(run) / len(run) for run in c["clip_low"]])[0],
                         clip_high=mean_se([sum(run) / len(run) for run in c["clip_high"]])[0],
                         **({"off_target": off[0], "off_target_se": off[1]} if entropy_target else {})))
    return rows


def format_table(rows, n_seeds):
    target, off = rows[0]["target"], "off_target" in rows[0]
    head = (f"{'setting':<12} {'beta1':>5} {'beta2':>5} | {'final entropy':>15} | {'final E[reward]':>15} | "
            f"{f'steps to {target:g}':>13} | {'clip low':>8} {'clip high':>9}" + (" | |log H/H*|, 2nd half" if off else ""))
    lines = [head, "-" * len(head)]
    for r in rows:
        reach = "-" if r["steps_to_target"] is None else f"{r['steps_to_target']:.1f}"
        if r["reached"] not in (0, n_seeds):
            reach += f" ({r['reached']}/{n_seeds})"
        lines.append(f"{r['setting']:<12} {r['beta1']:>5g} {r['beta2']:>5g} | "
                     f"{r['entropy']:>6.3f} +- {r['entropy_se']:.3f} | "
                     f"{r['reward']:>6.3f} +- {r['reward_se']:.3f} | "
                     f"{reach:>13} | {100 * r['clip_low']:>7.2f}% {100 * r['clip_high']:>8.2f}%" +
                     (f" | {r['off_target']:>6.3f} +- {r['off_target_se']:.3f}" if off else ""))
    lines.append(f"mean +- standard error over {n_seeds} seeds. clip low: answers with A < 0 and "
                 f"ratio < 1 - eps_low (beta1's region), clip high: A > 0 and ratio > 1 + eps_high "
                 f"(beta2's); share of answers, mean over updates and steps.")
    return "\n".join(lines)


PANELS = (("entropy", "entropy (nats, mean over prompts)"), ("reward", "expected reward (exact)"),
          ("clip_low", "clip low: NA&LP, beta1's region"), ("clip_high", "clip high: PA&LP, beta2's region"),
          ("pa_hp", "PA&HP drive (lowers entropy)"), ("pa_lp", "PA&LP drive (raises entropy)"),
          ("na_hp", "NA&HP drive (raises entropy)"), ("na_lp", "NA&LP drive (lowers entropy)"))


LABELS = {"grpo": "grpo (b1=0 b2=0)", "dapo": "dapo (b1=b2=0, eps_high 0.28)"}


def style(name, knobs):
    """Colour and dash per setting: blues for beta2 = 0, reds for beta2 > 0, darker for larger beta1; the
    entropy target's setting purple, dotted."""
    if "entropy_target" in knobs:
        return dict(color="tab:purple", linestyle=":")
    if name in cegppo.ALGOS and knobs["beta1"] == knobs["beta2"] == 0:
        return dict(color="black" if name == "grpo" else "tab:green", linestyle="--" if name != "grpo" else "-")
    cmap = plt.get_cmap("Reds" if knobs["beta2"] > 0 else "Blues")
    return dict(color=cmap(0.4 + 0.5 * min(knobs["beta1"], 1.0)), linestyle="-")


def panel_curves(c, key):
    """[S][n] per-seed curves of one panel; a quadrant's drive is share x mean drive, its
    contribution to the batch's mean drive per answer (the four add up to the total)."""
    if key in c:
        return c[key]
    return [[f * d for f, d in zip(fr, dr)] for fr, dr in zip(c[f"{key}_frac"], c[f"{key}_drive"])]


def plot(results, path):
    """Two rows: what happens (entropy, reward, clip fractions) and why (the quadrants' drives); with an entropy
    target a fifth column: the betas it set, and entropy on a log scale around the target."""
    steered = [n for n, k in results["settings"].items() if "entropy_target" in k]
    fig, grid = plt.subplots(2, 5 if steered else 4, figsize=(20 if steered else 16, 7.5), sharex=True)
    axes = grid[:, :4]
    for name, c in results["curves"].items():
        st = style(name, results["settings"][name])
        label = LABELS.get(name, name)
        if steered:
            grid[1, 4].semilogy(np.arange(len(c["entropy"][0])), np.array(c["entropy"]).mean(0), lw=1.6, **st)
        for ax, (key, title) in zip(axes.flat, PANELS):
            y = np.array(panel_curves(c, key))                    # [S, n]
            x = np.arange(y.shape[1]) + (0 if key in ("entropy", "reward") else 1)
            m, sd = y.mean(0), y.std(0)
            ax.plot(x, m, label=label, lw=1.6, **st)
            ax.fill_between(x, m - sd, m + sd, color=st["color"], alpha=0.15, lw=0)
            ax.set_title(title, fontsize=10)
            if key == "entropy" and "entropy_target" in results["settings"][name]:
                ax.axhline(results["settings"][name]["entropy_target"], color="tab:purple", lw=0.8, ls="--")
    for name in steered:
        c, target = results["curves"][name], results["settings"][name]["entropy_target"]
        for key, ls in (("beta1", "-"), ("beta2", "--")):
            y = np.array(c[key])                                 # [S, n] each seed's betas in force
            grid[0, 4].plot(np.arange(1, y.shape[1] + 1), y.mean(0), color="tab:purple", ls=ls, lw=1.6, label=key)
            grid[0, 4].fill_between(np.arange(1, y.shape[1] + 1), y.min(0), y.max(0), color="tab:purple", alpha=0.15)
        grid[0, 4].set_title(f"betas set by the controller ({LABELS.get(name, name)})", fontsize=10)
        grid[0, 4].legend(fontsize=8)
        grid[1, 4].axhline(target, color="tab:purple", lw=0.8, ls="--")
        grid[1, 4].set_title("entropy (log scale), the target dashed", fontsize=10)
    for ax in grid[1]:
        ax.axhline(0, color="grey", lw=0.6)
        ax.set_xlabel("step")
    axes[1, 0].set_ylabel("drive per answer: share x mean -(log pi + H) A")
    axes[0, 1].legend(fontsize=8, loc="lower right")     # the reward panel's empty corner
    o = results["options"]
    fig.suptitle(f"Entropy microscope: {o['prompts']} prompts x {o['answers']} answers ({o['correct']} correct), "
                 f"{o['init']} start, G = {o['group_size']}, {o['updates']} updates per batch, {o['optimizer']} "
                 f"lr {o['lr']:g} momentum {o['momentum']:g}. Lines: mean over {len(results['seeds'])} seeds; "
                 f"bands: mean +- std.", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_small_png(fig, path)
    plt.close(fig)


def save_small_png(fig, path, dpi=80):
    """A 256-colour PNG: a third of the size of matplotlib's RGBA one, small enough to commit."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    buf.seek(0)
    image = Image.open(buf).convert("RGB").quantize(256, method=0)     # method 0: median cut
    image.save(path, optimize=True)


# ----------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------
DEFAULT_LR = {"sgd": 0.3, "adam": 0.02}
DEFAULT_MOMENTUM = {"sgd": 0.0, "adam": 0.9}


class Parser(argparse.ArgumentParser):
    def error(self, message):   # one line, as the project's other scripts: no usage dump
        sys.stderr.write(f"error: {message}\n")
        sys.exit(2)


def parse_args(argv):
    p = Parser(description="CE-GPPO's beta1 / beta2 on a tabular softmax policy (see the module docstring).")
    p.add_argument("--grid", default=DEFAULT_GRID,
                   help="settings: ALGOS names and beta1:beta2 pairs, comma separated")
    p.add_argument("--seeds", type=int, default=5, help="number of seeds (0 .. N-1), all run by this one command")
    p.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd",
                   help="plain SGD, or Adam (the second lesson)")
    p.add_argument("--lr", type=float, default=None,
                   help="step size; default 0.3 for sgd, 0.02 for adam (about the same KL per step)")
    p.add_argument("--momentum", type=float, default=None,
                   help="SGD momentum / Adam's first-moment decay; default 0 for sgd, 0.9 for adam")
    p.add_argument("--steps", type=int, default=50, help="rollout batches (steps)")
    p.add_argument("--updates", type=int, default=8,
                   help="optimizer updates per batch (ratios leave 1 from the second on)")
    p.add_argument("--prompts", type=int, default=32, help="prompts P, each its own softmax")
    p.add_argument("--answers", type=int, default=32, help="answers K per prompt")
    p.add_argument("--correct", type=int, default=4, help="correct answers per prompt (reward 1, else 0)")
    p.add_argument("--group_size", "--group-size", type=int, default=16, help="answers G sampled per prompt per step")
    p.add_argument("--init", choices=("confident", "uniform"), default="confident",
                   help="starting policy: one wrong favourite, or uniform")
    p.add_argument("--favourite", type=float, default=4.0,
                   help="the favourite's logit above the others (confident start)")
    p.add_argument("--output_dir", "--output-dir", default=None,
                   help="for microscope.json and .png; default runs/microscope (sgd), runs/microscope_adam")
    p.add_argument("--figure", default=None, help="the figure's path (default: OUTPUT_DIR/microscope.png)")
    p.add_argument("--entropy_target", "--entropy-target", type=float, default=None,
                   help="add a setting that starts at CE-GPPO's betas and moves them to hold the entropy at this "
                        "value (cegppo.steer_betas, as train.py --entropy_target)")
    a = p.parse_args(argv)
    a.lr = DEFAULT_LR[a.optimizer] if a.lr is None else a.lr
    a.momentum = DEFAULT_MOMENTUM[a.optimizer] if a.momentum is None else a.momentum
    a.output_dir = a.output_dir or ("runs/microscope" if a.optimizer == "sgd" else "runs/microscope_adam")
    for flag, value, low in (("--seeds", a.seeds, 1), ("--steps", a.steps, 1), ("--updates", a.updates, 1),
                             ("--prompts", a.prompts, 1), ("--answers", a.answers, 2),
                             ("--group_size", a.group_size, 2)):
        if value < low:
            p.error(f"{flag} {value}: must be at least {low}")
    if not 1 <= a.correct < a.answers:
        p.error(f"--correct {a.correct}: must be between 1 and --answers - 1 = {a.answers - 1}")
    if not (a.lr > 0 and math.isfinite(a.lr)):
        p.error(f"--lr {a.lr:g}: must be a positive number")
    if not 0 <= a.momentum < 1:
        p.error(f"--momentum {a.momentum:g}: must be in [0, 1)")
    if not math.isfinite(a.favourite):
        p.error(f"--favourite {a.favourite}: must be finite")
    try:
        a.settings = parse_grid(a.grid)
    except ValueError as e:
        p.error(str(e))
    if a.entropy_target is not None:
        if not (a.entropy_target > 0 and math.isfinite(a.entropy_target)):
            p.error(f"--entropy_target {a.entropy_target:g}: must be a positive number (nats)")
        a.settings[f"H*={a.entropy_target:g}"] = dict(cegppo.ALGOS["cegppo"], entropy_target=a.entropy_target)
    return a


def main(argv=None):
    a = parse_args(argv)
    opts = dict(prompts=a.prompts, answers=a.answers, correct=a.correct, init=a.init, favourite=a.favourite,
                group_size=a.group_size, steps=a.steps, updates=a.updates, optimizer=a.optimizer, lr=a.lr,
                momentum=a.momentum)
    t0 = time.perf_counter()
    results = run_grid(a.settings, list(range(a.seeds)), **opts)
    wall = time.perf_counter() - t0
    rows = summarise(results, entropy_target=a.entropy_target)
    os.makedirs(a.output_dir, exist_ok=True)
    json_path = os.path.join(a.output_dir, "microscope.json")
    with open(json_path, "w") as f:
        json.dump(dict(results, summary=rows, wall_s=round(wall, 2),
                       metrics="entropy, reward: steps + 1 values (index 0 = start); the rest one per step"),
                  f, separators=(",", ":"))
    fig_path = a.figure or os.path.join(a.output_dir, "microscope.png")
    plot(results, fig_path)
    print(format_table(rows, a.seeds))
    print(f"{len(a.settings)} settings x {a.seeds} seeds x {a.steps} steps in {wall:.1f} s; "
          f"wrote {json_path}, {fig_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
