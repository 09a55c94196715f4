"""Plots for people who would rather look than read: the PNGs the stages write and the console's curves,
drawn in one style (STYLE) so that a figure reads the same wherever it is shown."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")  # headless: no display on training or CI machines
import matplotlib.pyplot as plt  # noqa: E402
from cycler import cycler  # noqa: E402

COLORS = ["#3b6ea8", "#d9822b", "#4f9a5a", "#b5473f", "#7c5fa6", "#8a6d3b"]
STYLE = {
    "figure.facecolor": "white",
    "axes.facecolor": "white",
    "axes.edgecolor": "#8a8a8a",
    "axes.grid": True,
    "grid.color": "#d6d6d6",
    "grid.alpha": 0.6,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.prop_cycle": cycler(color=COLORS),
    "axes.titlesize": 10,
    "axes.titleweight": "bold",
    "axes.labelsize": 9,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "legend.fontsize": 8,
    "legend.frameon": False,
    "font.family": "DejaVu Sans",
    "savefig.dpi": 100,
    "svg.fonttype": "none",  # SVG text stays text: smaller, searchable, selectable in the console
}
# the series of a training step's history that the console draws, one panel each, with their labels
TRAINING_PANELS = {
    "loss": "loss (lines: train, diamonds: held-out)",
    "lr": "learning rate",
    "grad_norm": "grad norm (before clipping)",
    "tokens_per_s": "tokens/s",
    "moe_max_load": "MoE max expert load (1 = balanced)",
}


# set for the whole process, not per figure: legends, grids and lines read it when they are drawn
plt.rcParams.update(STYLE)


def figure(rows: int = 1, cols: int = 1, size: tuple[float, float] = (7, 3.5), **subplots):
    return plt.subplots(rows, cols, figsize=size, squeeze=False, **subplots)


def save(fig, path: Path | str | None = None, fmt: str = "png") -> Path | str:
    """Writes the figure to `path`, or returns it as SVG text (fmt="svg", the console's curves)."""
    fig.tight_layout()
    if path is not None:
        fig.savefig(path)
        plt.close(fig)
        return path
    buffer = io.StringIO()
    fig.savefig(buffer, format=fmt)
    plt.close(fig)
    return buffer.getvalue()


def _stages_in_order(ax, histories: dict[str, list[dict]], key: str, eval_dots: bool) -> None:
    """`key` of each stage's history against the step, the stages one after another with a rule between."""
    offset = 0
    for color, (stage, history) in zip(COLORS * 4, histories.items()):
        points = [(offset + h["step"], h[key]) for h in history if h.get(key) is not None]
        if points:
            ax.plot(*zip(*points), marker="o", markersize=2.5, linewidth=1.4, color=color, label=f"{stage}")
        evals = [(offset + h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
        if eval_dots and evals:
            ax.plot(*zip(*evals), linestyle="none", marker="D", markersize=5, color=color, label=f"{stage} held-out")
        offset = offset + history[-1]["step"] if history else offset
        ax.axvline(offset, color="grey", alpha=0.3)


def plot_loss(histories: dict[str, list[dict]], path: Path) -> Path:
    """Training loss (lines) and held-out eval loss (dots) of each stage, the stages one after another."""
    fig, axes = figure()
    ax = axes[0][0]
    _stages_in_order(ax, histories, "loss", eval_dots=True)
    ax.set_xlabel("step (stages in order)")
    ax.set_ylabel("loss")
    ax.legend()
    return save(fig, path)


def plot_training(histories: dict[str, list[dict]], stopped_at: int | None = None) -> str:
    """The console's training page: one panel per TRAINING_PANELS series, SVG; `stopped_at` marks where
    early stopping ended the last stage (a step counted over all stages)."""
    panels = [key for key in TRAINING_PANELS if any(h.get(key) is not None for hs in histories.values() for h in hs)]
    cols = 2
    rows = max(1, -(-len(panels) // cols))
    fig, axes = figure(rows, cols, size=(10, 2.8 * rows))
    for ax, key in zip(axes.flat, panels):
        _stages_in_order(ax, histories, key, eval_dots=key == "loss")
        ax.set_title(TRAINING_PANELS[key])
        if stopped_at is not None:
            ax.axvline(stopped_at, color=COLORS[3], linestyle="--", label="early stop")
        ax.legend()
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    axes.flat[len(panels) - 1].set_xlabel("step (stages in order)")
    return save(fig, fmt="svg")


def plot_histograms(series: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, title: str = "") -> Path:
    """One histogram per named series of (bin edges, counts) over log-spaced bins, drawn on a log x axis
    between its first and last filled bin; a series with no counts is left out."""
    series = {name: (edges, counts) for name, (edges, counts) in series.items() if np.any(counts)}
    fig, axes = figure(1, max(len(series), 1), size=(5 * max(len(series), 1), 3.5))
    for ax, (name, (edges, counts)) in zip(axes[0], series.items()):
        filled = np.flatnonzero(counts)
        first, last = filled[0], filled[-1] + 1
        ax.stairs(counts[first:last], edges[first : last + 1], fill=True, color=COLORS[0], alpha=0.85)
        ax.set_xscale("log")
        ax.set_xlabel(name)
        ax.set_ylabel("documents")
    if title:
        fig.suptitle(title)
    return save(fig, path)
