"""``pacs-node evaluate BUNDLE DATASET``: run a bundle over a data set and score everything it outputs.

The images go through the node's own inference path - a DICOM dataset in memory, then
:func:`pipelines.engine.load_pipeline`'s ``analyse`` (decode, VOI, letterbox, engine, boxes mapped back to
source pixels) - so the numbers describe what the node would send, not a training-time shortcut.

Output directory: ``metrics.json`` (summary + per-region and per-label detail), ``predictions.jsonl`` (one
line per image: key, reference and generated report, label probabilities), ``roc.png`` (ROC curve per label)
and ``examples.png`` (a few images with ground-truth and predicted boxes of the reported regions, and both
reports).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from tqdm import tqdm

from pipelines.constants import CHEXPERT_LABELS, REGIONS
from pipelines.engine import load_pipeline
from pipelines.evaluation import metrics as M
from pipelines.interface import ImageResult
from pipelines.training.data import Sample, parse_dataset

log = logging.getLogger(__name__)

EVAL_PHANTOM_SIZE = 512  # phantoms are drawn this tall for evaluation unless the spec says size=


def sample_dataset(sample: Sample) -> Dataset:
    """A minimal 16-bit MONOCHROME2 DICOM dataset holding the sample's pixels (in memory only)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[sample.key])
    ds.Modality = "OT"
    rows, cols = sample.image.shape
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.WindowCenter, ds.WindowWidth = 32768, 65536
    ds.PixelData = np.rint(np.clip(sample.image, 0, 1) * 65535).astype(np.uint16).tobytes()
    return ds


def predict(bundle: str | Path, dataset: str, device: str = "auto", batch_size: int = 8,
            progress: bool = True) -> tuple[list[Sample], list[ImageResult], dict[str, Any]]:
    """Ground truth and results for every image of ``dataset`` (samples keep their pixels only for the
    first few, which the example plot needs)."""
    pipeline = load_pipeline(bundle, device=device, batch_size=batch_size)
    source = parse_dataset(dataset, EVAL_PHANTOM_SIZE)
    samples: list[Sample] = []
    results: list[ImageResult] = []
    for start in tqdm(range(0, len(source), batch_size), desc="evaluate", disable=not progress, dynamic_ncols=True):
        chunk = [source[i] for i in range(start, min(start + batch_size, len(source)))]
        for s, r in zip(chunk, pipeline.analyse([sample_dataset(s) for s in chunk])):
            if not isinstance(r, ImageResult):
                raise ValueError(f"{s.key}: the pipeline refused the image: {r}")
            samples.append(s if len(samples) < 16 else _without_pixels(s))
            results.append(r)
    info = {"bundle": {"name": pipeline.model_name, "version": pipeline.model_version,
                       "clinical_use": pipeline.clinical_use, "path": str(bundle)},
            "dataset": source.describe(), "images": len(results)}
    return samples, results, info


def score(samples: list[Sample], results: list[ImageResult], meteor: bool = True) -> dict[str, Any]:
    refs = [s.report for s in samples]
    hyps = [r.report for r in results]
    text = M.report_scores(refs, hyps, meteor=meteor)
    pred_boxes = np.array([[reg.box for reg in r.regions] for r in results], dtype=np.float64)
    true_boxes = np.stack([s.boxes for s in samples]).astype(np.float64)
    det = M.detection_scores(pred_boxes, true_boxes, REGIONS)
    sel = M.binary_scores(np.array([[reg.selected for reg in r.regions] for r in results]),
                          np.stack([s.selected for s in samples]))
    abn = M.binary_scores(np.array([[reg.abnormal_prob > 0.5 for reg in r.regions] for r in results]),
                          np.stack([s.abnormal for s in samples]))
    probs = np.array([[r.label_probs[label] for label in CHEXPERT_LABELS] for r in results])
    labels = np.stack([s.labels for s in samples])
    cls = M.classification_scores(probs, labels, CHEXPERT_LABELS)
    summary = {
        **{k: round(v, 4) for k, v in text.items()},
        "region_mean_iou": _r(det["mean_iou"]),
        "region_hit_rate": _r(det["hit_rate"]),
        "selector_f1": round(sel["f1"], 4),
        "abnormality_f1": round(abn["f1"], 4),
        "macro_auc": _r(cls["macro_auc"]),
    }
    return {
        "summary": summary,
        "report": text,
        "detection": det,
        "selector": sel,
        "abnormality": abn,
        "classification": cls,
        "_probs": probs,
        "_labels": labels,
    }


def evaluate_bundle(bundle: str | Path, dataset: str, out_dir: str | Path, *, device: str = "auto",
                    batch_size: int = 8, examples: int = 4, meteor: bool = True,
                    progress: bool = True) -> dict[str, Any]:
    """Predict, score, write ``metrics.json``, ``predictions.jsonl`` and the plots; returns the metrics."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    samples, results, info = predict(bundle, dataset, device, batch_size, progress)
    scored = score(samples, results, meteor)
    probs, labels = scored.pop("_probs"), scored.pop("_labels")
    metrics = {**info, **scored}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    with open(out / "predictions.jsonl", "w") as fh:
        fh.writelines(json.dumps({"key": s.key, "reference": s.report, "generated": r.report,
                                 "label_probs": r.label_probs,
                                 "labels": {k: (None if np.isnan(v) else float(v))
                                            for k, v in zip(CHEXPERT_LABELS, s.labels)}}) + "\n" for s, r in zip(samples, results))
    from pipelines.evaluation.plots import plot_examples, plot_roc

    plot_roc(probs, labels, CHEXPERT_LABELS, out / "roc.png")
    shown = [(s, r) for s, r in zip(samples, results) if s.image.size][:examples]
    if shown:
        plot_examples(shown, out / "examples.png")
    log.info("evaluation of %s on %s: %s", info["bundle"]["name"], info["dataset"], metrics["summary"])
    return metrics


def _without_pixels(s: Sample) -> Sample:
    return Sample(s.key, np.zeros((0, 0), np.float32), s.boxes, s.sentences, s.abnormal, s.labels, s.report)


def _r(x: float | None) -> float | None:
    return None if x is None else round(float(x), 4)
