"""Pictures a person can check an evaluation with: ROC curves, and images with boxes and sentences."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a display
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Rectangle
from sklearn.metrics import roc_auc_score, roc_curve

from pipelines.interface import ImageResult
from pipelines.training.data import Sample


def plot_roc(probs: np.ndarray, labels: np.ndarray, names: Sequence[str], path: Path) -> None:
    """One ROC curve per label that has both classes; the legend gives each AUC and its positives."""
    fig, ax = plt.subplots(figsize=(7, 7))
    for j, name in enumerate(names):
        known = ~np.isnan(labels[:, j])
        y, p = labels[known, j], probs[known, j]
        if len(np.unique(y)) < 2:
            continue
        fpr, tpr, _ = roc_curve(y, p)
        ax.plot(fpr, tpr, lw=1.4, label=f"{name} (AUC {roc_auc_score(y, p):.3f}, n+={int(y.sum())})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="chance")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01),
           title="CheXpert label ROC curves")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_examples(items: Sequence[tuple[Sample, ImageResult]], path: Path) -> None:
    """Each image with ground-truth (green, dashed) and predicted (red) boxes of the regions the model
    reported, the generated and the reference report underneath."""
    n = len(items)
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 8.5), squeeze=False)
    for ax, (sample, result) in zip(axes[0], items):
        ax.imshow(sample.image, cmap="gray", vmin=0, vmax=1)
        for r, region in enumerate(result.regions):
            if not region.selected:
                continue
            x1, y1, x2, y2 = region.box
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec="red", lw=1.2))
            gx1, gy1, gx2, gy2 = sample.boxes[r]
            if np.isfinite(gx1):
                ax.add_patch(Rectangle((gx1, gy1), gx2 - gx1, gy2 - gy1, fill=False, ec="lime", lw=1.0, ls="--"))
            ax.text(x1 + 2, y1 + 10, region.name, color="yellow", fontsize=6)
        ax.set_axis_off()
        wrap = lambda t: "\n".join(textwrap.wrap(t, 62))
        ax.set_title(sample.key, fontsize=9)
        ax.text(0, -0.02, f"generated:\n{wrap(result.report)}\n\nreference:\n{wrap(sample.report)}",
                transform=ax.transAxes, va="top", fontsize=7, family="monospace")
    fig.subplots_adjust(left=0.02, right=0.98, top=0.95, bottom=0.35, wspace=0.05)
    fig.savefig(path, dpi=100)
    plt.close(fig)
