"""Figures: a training run's trajectory (``trl-prob plot RUN_DIR``) and the probe's histogram.

Matplotlib with the Agg backend (files only, no display needed).
"""

from __future__ import annotations

import glob
import json
import math
import os
import re

TRAINER_STATE = "trainer_state.json"
TRAINING_PNG = "training.png"

# One colour per quantity, shared by both figures.
_COLORS = {
    "mean": "#6baed6",
    "ema": "#08519c",
    "eval": "#e6550d",
    "lambda": "#31a354",
    "exponent": "#756bb1",
    "loss": "#08519c",
    "median": "#636363",
}
_BAND_COLORS = {"model-weak": "#fdae6b", "model-intermediate": "#fee391", "model-strong": "#a1d99b"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


# ------------------------------------------------------------------------------------------- training curves


def find_trainer_state(run_dir_or_trainer_state_json: str) -> str:
    """Path of the ``trainer_state.json`` to plot.

    Accepts the file itself, a run directory holding one (``trainer.save_state()`` writes it at the end of
    training) or, failing that, the run's latest ``checkpoint-N/trainer_state.json``.
    """
    path = run_dir_or_trainer_state_json
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path!r} is neither a run directory nor a trainer_state.json file.")
    direct = os.path.join(path, TRAINER_STATE)
    if os.path.isfile(direct):
        return direct
    checkpoints = [c for c in glob.glob(os.path.join(path, "checkpoint-*", TRAINER_STATE))]
    if checkpoints:
        return max(checkpoints, key=lambda c: int(re.findall(r"checkpoint-(\d+)", c)[-1]))
    raise FileNotFoundError(
        f"No {TRAINER_STATE} in {path!r} nor in a checkpoint-*/ below it. Point at the run's output_dir after "
        "training ends (the trainer saves its state there) or at a checkpoint directory."
    )


def _series(log_history: list[dict], key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for entry in log_history:
        value = entry.get(key)
        if isinstance(value, (int, float)) and "step" in entry and math.isfinite(value):
            steps.append(entry["step"])
            values.append(float(value))
    return steps, values


def plot_training(run_dir_or_trainer_state_json: str, output_png: str | None = None) -> str:
    """Plot a run's trajectory from its ``trainer_state.json`` (``log_history``) against the optimizer step.

    Panels: target-token probability (per-step mean, its moving average the adaptive schedule follows, eval mean and
    eval exact match),
    the schedule (lambda, and the exponent of ``schedule_mode='exponent'``), the training loss and the NLL (train
    and eval where logged). Panels without data say so.

    Args:
        run_dir_or_trainer_state_json: a run directory (its ``output_dir``), a checkpoint directory or the
            ``trainer_state.json`` file itself.
        output_png: where to write the figure; defaults to ``training.png`` beside the ``trainer_state.json``.

    Returns:
        The path of the written PNG.
    """
    state_path = find_trainer_state(run_dir_or_trainer_state_json)
    with open(state_path) as f:
        try:
            state = json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"{state_path} is not valid JSON: {error}") from None
    history = state.get("log_history") if isinstance(state, dict) else None
    if not history:
        raise ValueError(f"{state_path} has an empty log_history: nothing to plot (was logging_steps > max_steps?).")
    if output_png is None:
        output_png = os.path.join(os.path.dirname(os.path.abspath(state_path)), TRAINING_PNG)

    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(12, 7.5), sharex=True, constrained_layout=True)
    _probability_panel(axes[0, 0], history)
    _schedule_panel(axes[0, 1], history)
    _pair_panel(axes[1, 0], history, "loss", "Training loss (the objective trained)", "loss")
    _pair_panel(axes[1, 1], history, "nll", "Negative log-likelihood of the targets", "NLL (nats / token)")
    from matplotlib.ticker import MaxNLocator

    for ax in axes[1]:
        ax.set_xlabel("optimizer step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    run_name = os.path.basename(os.path.dirname(os.path.abspath(state_path)))
    last = state.get("global_step") or max((e.get("step", 0) for e in history), default=0)
    fig.suptitle(f"trl-prob run: {run_name}  ({last} steps)", fontsize=13, fontweight="bold")

    os.makedirs(os.path.dirname(os.path.abspath(output_png)), exist_ok=True)
    fig.savefig(output_png, dpi=120)
    plt.close(fig)
    return output_png


def _probability_panel(ax, history: list[dict]) -> None:
    from .stats import CONFIDENT_P

    signal = followed_signal(history)
    ema = "schedule_signal_ema" if any("schedule_signal_ema" in e for e in history) else "ema_token_prob"
    plotted = _plot(ax, history, "mean_token_prob", "per-step mean p", color=_COLORS["mean"], lw=1.2)
    if signal is not None and signal.metric is not None:
        plotted |= _plot(ax, history, signal.metric, f"per-step {signal.label}", color=_COLORS["ema"], lw=0.8, alpha=0.5)
    ema_label = f"{signal.label if signal is not None else 'signal'}, moving average (schedule input)"
    plotted |= _plot(ax, history, ema, ema_label, color=_COLORS["ema"], lw=2.2)
    plotted |= _plot(ax, history, "eval_mean_token_prob", "eval mean", color=_COLORS["eval"], lw=1.5, marker="o", ms=4)
    # what the signal should track: held-out exact match (teacher-forced), wherever the run evaluated
    plotted |= _plot(ax, history, "eval_exact_match", "eval exact match", color=_COLORS["eval"], lw=1.5, ls="--",
                     marker="s", ms=4)
    for color, source in zip(_source_colors(), _sources(history)):
        plotted |= _plot(ax, history, f"mean_token_prob/{source}", f"source {source}", color=color, lw=1.0, alpha=0.8)
    ax.axhline(CONFIDENT_P, color="grey", ls=":", lw=1)
    ax.annotate(f"p = {CONFIDENT_P}", (1.0, CONFIDENT_P), xycoords=("axes fraction", "data"), ha="right",
                va="bottom", fontsize=8, color="grey")
    ax.set_ylim(0, 1)
    title = "Target-token probability" if signal is None or signal.name == "mean" else (
        f"Target-token probability and the schedule's signal ({signal.name})")
    _finish(ax, title, "p / signal (target tokens)", plotted)


def followed_signal(history: list[dict]):
    """The signal an adaptive run followed, from the metric it logged (``mean`` logs none of its own); None for a
    run without a schedule signal."""
    from .schedules import SIGNALS

    logged = set().union(*history) if history else set()
    if not ({"schedule_signal_ema", "ema_token_prob"} & logged):
        return None
    for signal in SIGNALS.values():
        if signal.metric is not None and signal.metric in logged:
            return signal
    return SIGNALS["mean"]


def _schedule_panel(ax, history: list[dict]) -> None:
    plotted = _plot(ax, history, "objective_lambda", "lambda (share of the objective)", color=_COLORS["lambda"], lw=2,
                    drawstyle="steps-post")
    for color, source in zip(_source_colors(), _sources(history)):  # per-source schedules: one lambda each
        plotted |= _plot(ax, history, f"objective_lambda/{source}", f"source {source}", color=color, lw=1.4,
                         ls="--", drawstyle="steps-post")
    ax.set_ylim(-0.03, 1.03)
    steps, exponent = _series(history, "objective_exponent")
    if exponent:
        twin = ax.twinx()
        twin.plot(steps, exponent, color=_COLORS["exponent"], lw=1.5, ls="--", drawstyle="steps-post",
                  label="exponent a of power:a")
        twin.set_ylabel("exponent a", color=_COLORS["exponent"])
        twin.tick_params(axis="y", colors=_COLORS["exponent"])
        # exponent = lambda * k: scale the right axis by k so the two curves coincide.
        _, lambdas = _series(history, "objective_lambda")
        scale = max(exponent) / max(lambdas) if lambdas and max(lambdas) > 0 else max(max(exponent), 1.0)
        twin.set_ylim(-0.03 * scale, 1.03 * scale)
        lines = ax.get_lines() + twin.get_lines()
        ax.legend(lines, [line.get_label() for line in lines], loc="lower right", fontsize=8, frameon=False)
        plotted = True
    elif plotted:
        ax.legend(loc="lower right", fontsize=8, frameon=False)
    if not plotted:
        ax.text(0.5, 0.5, "no schedule logged\n(objective trained alone)", ha="center", va="center",
                transform=ax.transAxes, color="grey")
    ax.set_title("Objective schedule: NLL (0) to the objective (1)", fontsize=11, loc="left")
    ax.set_ylabel("lambda")
    ax.grid(alpha=0.3)


def _sources(history: list[dict]) -> list[str]:
    """The sources of a per-source run, from its logged ``objective_lambda/<source>`` keys, in first-seen order."""
    found: dict[str, None] = {}
    for entry in history:
        for key in entry:
            if key.startswith("objective_lambda/"):
                found.setdefault(key.split("/", 1)[1])
    return list(found)


def _source_colors():
    from matplotlib import colormaps

    palette = colormaps["tab10"].colors
    return (palette[(i + 3) % len(palette)] for i in range(64))  # away from the run-wide curves' colours


def _pair_panel(ax, history: list[dict], key: str, title: str, ylabel: str) -> None:
    plotted = _plot(ax, history, key, "train", color=_COLORS["loss"], lw=1.6)
    plotted |= _plot(ax, history, f"eval_{key}", "eval", color=_COLORS["eval"], lw=1.5, marker="o", ms=4)
    _finish(ax, title, ylabel, plotted)


def _plot(ax, history: list[dict], key: str, label: str, **style) -> bool:
    steps, values = _series(history, key)
    if not values:
        return False
    ax.plot(steps, values, label=label, **style)
    return True


def _finish(ax, title: str, ylabel: str, plotted: bool) -> None:
    ax.set_title(title, fontsize=11, loc="left")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if plotted:
        ax.legend(fontsize=8, frameon=False)
    else:
        ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="grey")


# ----------------------------------------------------------------------------------------- probe histogram


def plot_probe_histogram(report, output_png: str) -> str:
    """``report``: a ``trl_prob.probe.ProbeReport`` (or anything with its fields). Histogram of target-token probabilities with the paper's continuum bands, the mean and the median marked."""
    plt = _pyplot()
    histogram = report.histogram_fine
    counts, edges = histogram["token_counts"], histogram["bin_edges"]
    total = sum(counts) or 1
    shares = [100.0 * c / total for c in counts]
    widths = [b - a for a, b in zip(edges, edges[1:])]

    fig, ax = plt.subplots(figsize=(12, 5.2), constrained_layout=True)
    top = max(shares + [1.0]) * 1.08
    for name, (low, high) in report.reference_bands.items():
        ax.axvspan(low, high, color=_BAND_COLORS.get(name, "#dddddd"), alpha=0.55, lw=0, zorder=0)
        ax.text((low + high) / 2, 1.01, f"paper: {name.removeprefix('model-')}\n{low:.2f}-{high:.2f}",
                transform=ax.get_xaxis_transform(), ha="center", va="bottom", fontsize=8, color="#444444")
    ax.axvspan(report.schedule_ramp_low, report.schedule_ramp_high, color="#bdbdbd", alpha=0.25, lw=0, zorder=0,
               hatch="//", label=f"adaptive ramp {report.schedule_ramp_low:.2f} to {report.schedule_ramp_high:.2f}")
    ax.bar(edges[:-1], shares, width=widths, align="edge", color="#3182bd", edgecolor="white", lw=0.4,
           label="target tokens", zorder=2)
    if math.isfinite(report.mean_p):
        ax.axvline(report.mean_p, color="#a50f15", lw=2, zorder=3, label=f"mean {report.mean_p:.3f}")
        ax.axvline(report.median_p, color=_COLORS["median"], lw=1.5, ls="--", zorder=3,
                   label=f"median {report.median_p:.3f}")
    ax.axvline(report.confident_p, color="black", lw=1, ls=":", zorder=3,
               label=f"p = {report.confident_p:.2f} ({report.share_confident:.0%} of tokens above)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, top)
    ax.set_xlabel("probability of the target token, p")
    ax.set_ylabel("share of target tokens (%)")
    ax.set_title(
        f"{report.model}: {report.continuum}  -  recommended {report.recommended_flags}\n"
        f"{report.num_samples:,} samples, {report.num_tokens:,} target tokens",
        fontsize=10, loc="left", pad=30,
    )
    # Outside the axes: a histogram can have mass anywhere in [0, 1].
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(output_png, dpi=120)
    plt.close(fig)
    return output_png
