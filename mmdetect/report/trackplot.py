"""Figures of a track: flagged share by layer against training step, and cos trajectories of the final candidates.

The step axis is logarithmic when the steps span two decades or more (Pythia's revisions run from 0 to 143,000, and
most of the structure forms in the first few thousand); step 0 then sits on a symmetric-log axis's linear part.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from mmdetect.report.plot import BODY_COLOR, THRESHOLD_COLOR, figure, style


def _step_axis(ax: Any, steps: list[int]) -> None:
    positive = [s for s in steps if s > 0]
    if positive and max(positive) / min(positive) >= 100:
        ax.set_xscale("symlog", linthresh=min(positive))
    ax.set_xlabel("training step" + (" (log scale)" if ax.get_xscale() != "linear" else ""))


def share_figure(layers: Any, *, threshold: float) -> Any:
    """Two panels from ``layers.csv`` rows (step, layer, share_flagged): a layers x steps heatmap of the flagged
    share, and one line per layer against step."""
    steps = sorted({int(s) for s in layers["step"]})
    ids = sorted({int(layer) for layer in layers["layer"]})
    grid = np.full((len(ids), len(steps)), np.nan)
    row, col = {v: i for i, v in enumerate(ids)}, {v: i for i, v in enumerate(steps)}
    for step, layer, share in zip(layers["step"], layers["layer"], layers["share_flagged"]):
        grid[row[int(layer)], col[int(step)]] = 100.0 * float(share)
    with style():
        fig = figure(10.0, 4.2)
        heat, lines = fig.subplots(1, 2, width_ratios=[1.1, 1.0])
        image = heat.imshow(grid, aspect="auto", origin="lower", cmap="magma_r", interpolation="nearest",
                            vmin=0.0, vmax=max(1e-9, float(np.nanmax(grid)) if np.isfinite(grid).any() else 1.0))
        heat.set_yticks(range(len(ids)), [str(i) for i in ids] if len(ids) <= 24 else None)
        if len(ids) > 24:
            heat.set_yticks(range(0, len(ids), max(1, len(ids) // 12)))
        ticks = range(0, len(steps), max(1, len(steps) // 8))
        heat.set_xticks(list(ticks), [f"{steps[i]:,}" for i in ticks], rotation=45, ha="right")
        heat.set_xlabel("training step (checkpoints in order)")
        heat.set_ylabel("layer")
        heat.set_title(f"Flagged share (cos ≤ {threshold:g}), % of layer", loc="left")
        fig.colorbar(image, ax=heat, shrink=0.85, label="% flagged")
        import matplotlib

        cmap = matplotlib.colormaps["viridis"]
        for k, layer in enumerate(ids):
            lines.plot(steps, grid[k], color=cmap(k / max(1, len(ids) - 1)), marker="o", markersize=2.5,
                       linewidth=1.2, label=f"L{layer}")
        _step_axis(lines, steps)
        lines.set_ylabel("flagged neurons, % of layer")
        lines.set_ylim(bottom=0)
        lines.grid(color="#eeeeee", linewidth=0.6)
        lines.set_title("Flagged share by layer", loc="left")
        lines.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, ncols=1 if len(ids) <= 16 else 2)
    return fig


def trajectory_figure(steps: list[int], series: dict[str, list[float]], *, threshold: float,
                      what: str = "flagged at the last step") -> Any:
    """cos against step for each final candidate (``series``: "layer/expert/neuron" -> one cos per step)."""
    with style():
        fig = figure(7.2, 4.2)
        ax = fig.subplots()
        import matplotlib

        cmap = matplotlib.colormaps["tab10" if len(series) <= 10 else "tab20"]
        for k, (key, values) in enumerate(series.items()):
            layer, expert, neuron = key.split("/")
            label = f"L{layer}" + (f" E{expert}" if expert else "") + f" N{neuron}"
            ax.plot(steps, values, color=cmap(k % cmap.N), marker="o", markersize=2.5, linewidth=1.2, label=label)
        if not series:
            ax.text(0.5, 0.5, "no neuron was flagged at any checkpoint", ha="center", va="center",
                    transform=ax.transAxes, color=BODY_COLOR)
        ax.axhline(threshold, color=THRESHOLD_COLOR, linestyle="--", linewidth=1.0, label=f"threshold {threshold:g}")
        _step_axis(ax, steps)
        ax.set_ylabel("cos(read, write)")
        ax.set_ylim(-1.05, 1.05)
        ax.grid(color="#eeeeee", linewidth=0.6)
        ax.set_title(f"cos over training: {len(series)} most negative neurons {what}", loc="left")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return fig
