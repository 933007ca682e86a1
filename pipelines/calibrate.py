"""Fitting a bundle's content gate (``pacs-node models calibrate BUNDLE DATASET``).

DATASET is a directory of in-distribution images (DICOM files, or 8/16-bit grayscale PNGs), e.g. phantoms
written by ``pacs-node phantoms``. It is split, deterministically, into images the statistics are fitted on,
images the threshold is calibrated on, and held-out images the acceptance rate is measured on; the
rejection rate is measured on :func:`pipelines.phantoms.nonchest.probes`. The statistics go into
``gate.safetensors``, the settings and both rates into the manifest's ``gate`` section.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import torch

from pipelines.bundle import Bundle, BundleError, load_bundle, sha256_file, write_manifest
from pipelines.gate import (
    DEFAULT_MARGIN,
    DEFAULT_PERCENTILE,
    DEFAULT_SHRINKAGE,
    FEATURES,
    GATE_FILE,
    SCORE,
    fit_gate,
    pooled_features,
    save_gate,
    split,
)
from pipelines.preprocess import dicom_to_unit, fit_to_model

#: fit / calibration / held-out shares of DATASET
FRACTIONS = (0.6, 0.2, 0.2)


def read_unit(path: Path) -> np.ndarray:
    """A dataset image as float32 [0, 1] (DICOM through the node's own decoding, PNG by its bit depth)."""
    if path.suffix.lower() == ".png":
        from PIL import Image

        with Image.open(path) as image:
            array = np.asarray(image)
        if array.ndim == 3:
            array = array[..., :3].mean(axis=2)
        top = 65535.0 if array.dtype == np.uint16 or array.max() > 255 else 255.0
        return (array.astype(np.float32) / top).clip(0, 1)
    return dicom_to_unit(pydicom.dcmread(path))


def dataset_files(dataset: Path) -> list[Path]:
    files = sorted(p for p in dataset.rglob("*") if p.is_file() and p.suffix.lower() in (".dcm", ".png", ""))
    if not files:
        raise BundleError(f"{dataset}: no .dcm or .png images")
    return files


def features(bundle: Bundle, units: Iterable[np.ndarray], batch_size: int = 16) -> np.ndarray:
    """Gate features ``[N, D]`` of images given as [0, 1] arrays, preprocessed as the pipeline does."""
    cfg = bundle.config
    device = next(bundle.model.parameters()).device
    out, batch = [], []

    def flush() -> None:
        if batch:
            images = torch.stack([fit_to_model(u, cfg.image_size, cfg.image_mean, cfg.image_std).tensor
                                  for u in batch]).to(device)
            out.append(pooled_features(bundle.model.detector, images).cpu().numpy())
            batch.clear()

    for unit in units:
        batch.append(unit)
        if len(batch) == batch_size:
            flush()
    flush()
    return np.concatenate(out) if out else np.zeros((0, 0))


def calibrate_bundle(bundle_dir: Path, dataset: Path, *, percentile: float = DEFAULT_PERCENTILE,
                     shrinkage: float = DEFAULT_SHRINKAGE, margin: float = DEFAULT_MARGIN, probes: Sequence[tuple[str, np.ndarray]] | None = None,
                     seed: int = 0) -> dict[str, Any]:
    """Fit and store the gate of the bundle at ``bundle_dir``; returns the manifest's new ``gate`` section."""
    from pipelines.phantoms.nonchest import probes as make_probes

    bundle = load_bundle(bundle_dir, "cpu")
    fit_files, cal_files, held_files = split(dataset_files(dataset), FRACTIONS, seed)
    if len(fit_files) < 2 or not cal_files or not held_files:
        raise BundleError(f"{dataset}: {len(fit_files) + len(cal_files) + len(held_files)} images are too few "
                          "to fit, calibrate and hold out (at least 10)")
    fit, cal, held = (features(bundle, (read_unit(p) for p in files)) for files in (fit_files, cal_files, held_files))
    gate = fit_gate(fit, cal, percentile=percentile, shrinkage=shrinkage, margin=margin)
    held_scores = gate.score(held)
    probe_list = list(probes if probes is not None else make_probes())
    probe_scores = gate.score(features(bundle, (image for _, image in probe_list)))
    rejected = Counter(kind for (kind, _), s in zip(probe_list, probe_scores) if not gate.accepts(s))
    total = Counter(kind for kind, _ in probe_list)
    save_gate(gate, bundle_dir / GATE_FILE)
    section = {
        "file": GATE_FILE,
        "features": FEATURES,
        "dim": int(gate.mean.shape[0]),
        "score": SCORE,
        "shrinkage": shrinkage,
        "percentile": percentile,
        "margin": margin,
        "threshold": round(gate.threshold, 4),
        "fitted_on": {"dataset": dataset.name, "fit": len(fit_files), "calibration": len(cal_files),
                      "held_out": len(held_files), "seed": seed},
        "evaluation": {
            "held_out_accepted": round(float(np.mean([gate.accepts(s) for s in held_scores])), 4),
            "held_out_max_score": round(float(held_scores.max()), 3),
            "non_chest_rejected": round(sum(rejected.values()) / max(len(probe_list), 1), 4),
            "non_chest_min_score": round(float(probe_scores.min()), 3) if len(probe_scores) else None,
            "non_chest_count": len(probe_list),
            "non_chest_rejected_by_kind": {k: f"{rejected[k]}/{n}" for k, n in sorted(total.items())},
        },
    }
    manifest = dict(bundle.manifest)
    manifest["views"] = list(bundle.views)  # said explicitly, now that the gate was fitted on those views
    manifest["gate"] = section
    manifest["files"] = {**manifest["files"], GATE_FILE: sha256_file(bundle_dir / GATE_FILE)}
    write_manifest(bundle_dir, manifest)
    return section
