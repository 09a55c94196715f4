"""PNG plots for people who would rather look than read."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")  # headless: no display on training or CI machines
import matplotlib.pyplot as plt  # noqa: E402


def plot_loss(histories: dict[str, list[dict]], path: Path) -> Path:
    """Training loss (lines) and held-out eval loss (dots) of each stage, the stages one after another."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    offset = 0
    for color, (stage, history) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], histories.items()):
        steps = [offset + h["step"] for h in history]
        ax.plot(steps, [h["loss"] for h in history], marker="o", markersize=3, color=color, label=f"{stage} train")
        evals = [(offset + h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
        if evals:
            ax.plot(*zip(*evals), linestyle="none", marker="D", markersize=5, color=color, label=f"{stage} eval")
        offset = steps[-1] if steps else offset
        ax.axvline(offset, color="grey", alpha=0.3)
    ax.set_xlabel("step (stages in order)")
    ax.set_ylabel("loss")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_histograms(series: dict[str, list[float]], path: Path, title: str = "") -> Path:
    """One histogram per named series (log-scaled x when it spans orders of magnitude)."""
    series = {name: values for name, values in series.items() if len(values)}
    fig, axes = plt.subplots(1, max(len(series), 1), figsize=(5 * max(len(series), 1), 3.5), squeeze=False)
    for ax, (name, values) in zip(axes[0], series.items()):
        positive = [v for v in values if v > 0]
        wide = positive and max(positive) / max(min(positive), 1e-9) > 100
        bins = np.geomspace(min(positive), max(positive), 40) if wide else 40
        ax.hist(positive if wide else values, bins=bins, color="tab:blue", alpha=0.8)
        if wide:
            ax.set_xscale("log")
        ax.set_xlabel(name)
        ax.set_ylabel("documents")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
