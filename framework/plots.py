"""Headless matplotlib figures for reports and comparisons."""

from __future__ import annotations

from pathlib import Path


def plot_figure(ncols: int = 1, width: float = 6.0):
    """(pyplot, figure, axes list) with a headless backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, 4), squeeze=False)
    return plt, fig, list(axes[0])


def save_plot(plt, fig, axes, path: Path) -> None:
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend() is None and ax.get_legend_handles_labels()[0]:  # keep a legend the caller made
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")  # keeps a legend placed outside the axes
    plt.close(fig)
