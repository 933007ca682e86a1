"""The content gate: is this image within what the bundle's models were trained on?

A model fed a photograph labelled CHEST still writes a confident chest report. Before any result is made,
the image's *own model features* are compared with those of in-distribution images: the spatial mean of
every feature map of the region detector's backbone (for the demo preset the three MobileNetV3-FPN levels,
256 channels each), concatenated, and its Mahalanobis distance to the mean of those features over
in-distribution images. The covariance is shrunk towards its average variance (``(1 - s) C + s tr(C)/D I``):
with a few hundred images and several hundred dimensions the plain estimate is singular.

The threshold is a stated percentile of the distances of a *calibration* split that took no part in the
fit (distances of the fitting images themselves are optimistic and would reject new in-distribution
images), times a stated margin: near the top of the distribution a percentile of a few hundred images is a
noisy estimate (on the demo bundle the 99.9th percentile of 200 calibration phantoms let 2% of held-out ones
through above it), while the non-chest images lie twice as far again. The gate's acceptance of a third, held-out split and its rejection of a set of non-chest
images (:mod:`pipelines.phantoms.nonchest`) are written into the bundle's manifest by
``pacs-node models calibrate``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from torch import nn

GATE_FILE = "gate.safetensors"
FEATURES = "spatial mean of each detector backbone feature map, concatenated"
SCORE = "Mahalanobis distance to in-distribution features (shrunk covariance)"
DEFAULT_PERCENTILE = 99.9
DEFAULT_SHRINKAGE = 0.5
DEFAULT_MARGIN = 1.25


@dataclass(frozen=True)
class ContentGate:
    """``score(features[N,D]) -> [N]``; an image is accepted when its score is at most ``threshold``."""

    mean: np.ndarray  # [D] float64
    precision: np.ndarray  # [D, D] float64, inverse of the shrunk covariance
    threshold: float
    percentile: float
    shrinkage: float
    margin: float = 1.0

    def score(self, features: np.ndarray) -> np.ndarray:
        centred = np.asarray(features, dtype=np.float64) - self.mean
        return np.sqrt(np.maximum(np.einsum("nd,de,ne->n", centred, self.precision, centred), 0.0))

    def accepts(self, score: float) -> bool:
        return bool(score <= self.threshold)


@torch.no_grad()
def pooled_features(detector: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``images[B,1,S,S]`` (preprocessed) -> ``[B, D]``: every backbone map averaged over space, in fp32
    (the gate was fitted in fp32; a bf16 backbone would move scores near the threshold)."""
    with torch.autocast(images.device.type, enabled=False):
        maps = detector.feature_maps(images.float())
        return torch.cat([m.float().mean(dim=(2, 3)) for m in maps.values()], dim=1)


def fit_gate(fit: np.ndarray, calibration: np.ndarray, *, percentile: float = DEFAULT_PERCENTILE,
             shrinkage: float = DEFAULT_SHRINKAGE, margin: float = DEFAULT_MARGIN) -> ContentGate:
    """Mean and shrunk covariance from ``fit[N,D]``; threshold ``margin`` times the ``percentile`` of the
    ``calibration[M,D]`` distances."""
    if len(fit) < 2 or len(calibration) < 1:
        raise ValueError(f"need at least 2 images to fit and 1 to calibrate, got {len(fit)} and {len(calibration)}")
    if not 0 < percentile <= 100 or not 0 < shrinkage <= 1 or margin < 1:
        raise ValueError(f"need 0 < percentile <= 100, 0 < shrinkage <= 1 and margin >= 1, got {percentile}, "
                         f"{shrinkage}, {margin}")
    x = np.asarray(fit, dtype=np.float64)
    mean = x.mean(axis=0)
    centred = x - mean
    cov = centred.T @ centred / len(x)
    dim = cov.shape[0]
    shrunk = (1 - shrinkage) * cov + shrinkage * (np.trace(cov) / dim) * np.eye(dim)
    provisional = ContentGate(mean, np.linalg.inv(shrunk), 0.0, percentile, shrinkage)
    threshold = margin * float(np.percentile(provisional.score(calibration), percentile))
    return ContentGate(mean, provisional.precision, threshold, percentile, shrinkage, margin)


def save_gate(gate: ContentGate, path: Path) -> None:
    """Mean and precision as float32 (the scores move by far less than the gap the threshold sits in)."""
    save_file({"mean": gate.mean.astype(np.float32), "precision": gate.precision.astype(np.float32)}, str(path),
              metadata={"features": FEATURES, "score": SCORE})


def load_gate(path: Path, spec: dict) -> ContentGate:
    """The gate stored at ``path`` with the manifest's ``gate`` section ``spec``."""
    tensors = load_file(str(path))
    return ContentGate(tensors["mean"].astype(np.float64), tensors["precision"].astype(np.float64),
                       float(spec["threshold"]), float(spec["percentile"]), float(spec["shrinkage"]),
                       float(spec.get("margin", 1.0)))


def split(items: Sequence, fractions: tuple[float, float, float], seed: int = 0) -> tuple[list, list, list]:
    """Deterministic fit / calibration / held-out split of ``items``."""
    order = np.random.default_rng(seed).permutation(len(items))
    n_fit = int(round(fractions[0] * len(items)))
    n_cal = int(round(fractions[1] * len(items)))
    pick = [items[i] for i in order]
    return pick[:n_fit], pick[n_fit:n_fit + n_cal], pick[n_fit + n_cal:]
