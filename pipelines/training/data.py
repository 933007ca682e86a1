"""Data sets for training and evaluation: a common :class:`Sample`, two sources, and the conversion to the
square model input.

Sources
-------
``phantoms:seed=S,count=N[,size=P]``
    ``N`` phantoms with seeds ``S .. S+N-1`` drawn on the fly (``size`` defaults to the model input size,
    so no resampling is needed). Disjoint seed ranges are disjoint patients.

``mimic:ROOT[,split=train]`` (or just ``ROOT``)
    MIMIC-CXR-JPG images with Chest ImaGenome scene graphs, laid out as the two PhysioNet downloads unpack::

        ROOT/mimic-cxr-jpg/files/p10/p10000032/s50414267/<dicom_id>.jpg   (or .dcm: MIMIC-CXR DICOM)
        ROOT/mimic-cxr-jpg/mimic-cxr-2.0.0-chexpert.csv[.gz]               subject_id, study_id, 14 labels
        ROOT/chest-imagenome/silver_dataset/scene_graph/<dicom_id>_SceneGraph.json
        ROOT/chest-imagenome/silver_dataset/splits/{train,valid,test}.csv   dicom_id, subject_id, study_id

    From each scene graph: ``objects[].bbox_name`` and ``original_x1/y1/x2/y2`` (pixels of the original
    image) give the region boxes; ``attributes[]`` give, per ``bbox_name``, the report ``phrases`` (joined
    into the region sentence, which marks the region selected) and ``attributes`` lists, where any
    ``"nlp|yes|abnormal"`` marks the region abnormal (RGRG's rule). CheXpert labels: 1 positive, 0 and
    blank negative, -1 (uncertain) unknown (NaN: masked from losses and AUCs). The report is the region
    sentences in anatomical order, as the model writes it.
"""

from __future__ import annotations

import csv
import gzip
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipelines.constants import CHEXPERT_LABELS, NUM_LABELS, NUM_REGIONS, REGIONS
from pipelines.phantoms import generate_phantom
from pipelines.phantoms.report import assemble_report
from pipelines.preprocess import BoxTransform, fit_to_model


class DatasetSpecError(ValueError):
    """A data-set spec or directory cannot be used; the message says which part."""


@dataclass(frozen=True)
class Sample:
    """One image with its ground truth, in the image's own pixel grid."""

    key: str
    image: np.ndarray  # float32 (H, W) in [0, 1], white = dense (MONOCHROME2 sense)
    boxes: np.ndarray  # float32 (29, 4) x1 y1 x2 y2 pixels; NaN row = region not annotated
    sentences: tuple[str | None, ...]  # 29, None = region not reported
    abnormal: np.ndarray  # bool (29,)
    labels: np.ndarray  # float32 (14,): 1 / 0 / NaN unknown
    report: str

    @property
    def selected(self) -> np.ndarray:
        return np.array([s is not None for s in self.sentences], dtype=bool)


class PhantomSource:
    """Phantoms ``seed .. seed+count-1`` at ``size`` pixels tall, generated on access."""

    def __init__(self, seed: int, count: int, size: int = 320) -> None:
        if count < 1:
            raise DatasetSpecError(f"phantoms: count must be >= 1, got {count}")
        self.seed, self.count, self.size = seed, count, size

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> Sample:
        if not 0 <= i < self.count:
            raise IndexError(i)
        p = generate_phantom(self.seed + i, self.size)
        return Sample(f"phantom-{p.seed}", p.image, p.boxes, p.sentences, p.region_abnormal, p.labels, p.report)

    def describe(self) -> str:
        return f"phantoms:seed={self.seed},count={self.count},size={self.size}"


class MimicImaGenomeSource:
    """The MIMIC-CXR(-JPG) + Chest ImaGenome layout described in the module docstring."""

    def __init__(self, root: str | Path, split: str = "train") -> None:
        self.root = Path(root)
        genome = self.root / "chest-imagenome" / "silver_dataset"
        self.scene_dir = genome / "scene_graph"
        split_file = genome / "splits" / f"{split}.csv"
        for path in (self.root / "mimic-cxr-jpg" / "files", self.scene_dir, split_file):
            if not path.exists():
                raise DatasetSpecError(f"MIMIC/Chest ImaGenome layout: {path} is missing (see pipelines.training.data)")
        self.split = split
        with open(split_file, newline="") as fh:
            self.rows = [r for r in csv.DictReader(fh)]
        missing = {"dicom_id", "subject_id", "study_id"} - set(self.rows[0] if self.rows else {})
        if missing:
            raise DatasetSpecError(f"{split_file}: needs columns dicom_id, subject_id, study_id (missing {sorted(missing)})")
        self.labels = self._read_chexpert()

    def _read_chexpert(self) -> dict[str, np.ndarray]:
        base = self.root / "mimic-cxr-jpg"
        path = next((p for p in (base / "mimic-cxr-2.0.0-chexpert.csv", base / "mimic-cxr-2.0.0-chexpert.csv.gz")
                     if p.is_file()), None)
        if path is None:
            raise DatasetSpecError(f"{base}/mimic-cxr-2.0.0-chexpert.csv(.gz) is missing")
        opener = gzip.open if path.suffix == ".gz" else open
        out: dict[str, np.ndarray] = {}
        with opener(path, "rt", newline="") as fh:
            for row in csv.DictReader(fh):
                values = []
                for label in CHEXPERT_LABELS:
                    raw = (row.get(label) or "").strip()
                    values.append(math.nan if raw in ("-1", "-1.0") else float(raw in ("1", "1.0")))
                out[row["study_id"].lstrip("s")] = np.array(values, dtype=np.float32)
        return out

    def __len__(self) -> int:
        return len(self.rows)

    def image_path(self, row: dict[str, str]) -> Path:
        subject, study = row["subject_id"].lstrip("p"), row["study_id"].lstrip("s")
        folder = self.root / "mimic-cxr-jpg" / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}"
        for ext in (".jpg", ".dcm"):
            if (folder / (row["dicom_id"] + ext)).is_file():
                return folder / (row["dicom_id"] + ext)
        raise FileNotFoundError(f"{folder}/{row['dicom_id']}.jpg (or .dcm) is missing")

    def __getitem__(self, i: int) -> Sample:
        row = self.rows[i]
        image = _read_image(self.image_path(row))
        graph_path = self.scene_dir / f"{row['dicom_id']}_SceneGraph.json"
        graph = json.loads(graph_path.read_text())
        boxes = np.full((NUM_REGIONS, 4), np.nan, dtype=np.float32)
        index = {name: k for k, name in enumerate(REGIONS)}
        for obj in graph.get("objects", []):
            k = index.get(obj.get("bbox_name"))
            if k is None:
                continue
            box = [float(obj[f"original_{c}"]) for c in ("x1", "y1", "x2", "y2")]
            if box[2] > box[0] and box[3] > box[1]:
                boxes[k] = box
        sentences: list[str | None] = [None] * NUM_REGIONS
        abnormal = np.zeros(NUM_REGIONS, dtype=bool)
        for attr in graph.get("attributes", []):
            k = index.get(attr.get("bbox_name"))
            if k is None:
                continue
            phrases = [p.strip() for p in attr.get("phrases", []) if p and p.strip()]
            if phrases:
                sentences[k] = " ".join(dict.fromkeys(phrases))
            flat = [a for group in attr.get("attributes", []) for a in (group if isinstance(group, list) else [group])]
            abnormal[k] = "nlp|yes|abnormal" in flat
        labels = self.labels.get(row["study_id"].lstrip("s"), np.full(NUM_LABELS, np.nan, dtype=np.float32))
        return Sample(row["dicom_id"], image, boxes, tuple(sentences), abnormal, labels,
                      assemble_report(tuple(sentences)))

    def describe(self) -> str:
        return f"mimic:{self.root},split={self.split}"


def _read_image(path: Path) -> np.ndarray:
    """A JPEG/PNG (8/16-bit) or a DICOM file as float32 [0, 1], white = dense."""
    if path.suffix == ".dcm":
        import pydicom

        ds = pydicom.dcmread(path)
        arr = ds.pixel_array.astype(np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / max(hi - lo, 1.0)
        return 1.0 - arr if ds.get("PhotometricInterpretation") == "MONOCHROME1" else arr
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert("I;16") if im.mode.startswith("I") else im.convert("L"), dtype=np.float32)
    return arr / (65535.0 if arr.max() > 255 else 255.0)


def parse_dataset(spec: str, default_size: int = 320) -> PhantomSource | MimicImaGenomeSource:
    """``phantoms:seed=1000,count=500[,size=320]``, ``mimic:ROOT[,split=test]`` or a bare MIMIC root."""
    kind, _, rest = spec.partition(":")
    if kind == "phantoms":
        opts = _options(rest, spec, {"seed", "count", "size"})
        try:
            seed = int(opts.get("seed", "0"))
            count = int(opts["count"])
            size = int(opts.get("size", default_size))
        except KeyError:
            raise DatasetSpecError(f"{spec!r}: phantoms need count=N") from None
        except ValueError as exc:
            raise DatasetSpecError(f"{spec!r}: seed, count and size must be integers ({exc})") from None
        return PhantomSource(seed, count, size)
    if kind == "mimic":
        root, _, tail = rest.partition(",")
        opts = _options(tail, spec, {"split"})
        return MimicImaGenomeSource(root, opts.get("split", "train"))
    if Path(spec).is_dir():
        return MimicImaGenomeSource(spec, "test")
    raise DatasetSpecError(f"unknown data set {spec!r}: use phantoms:seed=S,count=N or mimic:ROOT[,split=...]")


def _options(text: str, spec: str, allowed: set[str]) -> dict[str, str]:
    opts = {}
    for part in filter(None, text.split(",")):
        key, eq, value = part.partition("=")
        if not eq or key not in allowed:
            raise DatasetSpecError(f"{spec!r}: unknown option {part!r} (allowed: {', '.join(sorted(allowed))})")
        opts[key] = value
    return opts


# --- model input ---------------------------------------------------------------------------------------

def to_model_input(image: np.ndarray, size: int, mean: float, std: float) -> tuple[torch.Tensor, BoxTransform]:
    """``[1, size, size]`` normalised tensor and its geometry: exactly the inference letterbox
    (:func:`pipelines.preprocess.fit_to_model`), so training sees what the engine will see."""
    prepared = fit_to_model(image, size, mean, std)
    return prepared.tensor, prepared.transform


@dataclass
class Batch:
    images: torch.Tensor  # [B, 1, S, S]
    boxes: torch.Tensor  # [B, 29, 4] model pixels (NaN = not annotated)
    selected: torch.Tensor  # [B, 29] bool
    abnormal: torch.Tensor  # [B, 29] bool
    labels: torch.Tensor  # [B, 14] float, NaN unknown
    sentences: list[tuple[str | None, ...]]
    reports: list[str]
    keys: list[str]

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.images.to(device, non_blocking=True), self.boxes.to(device), self.selected.to(device),
                     self.abnormal.to(device), self.labels.to(device), self.sentences, self.reports, self.keys)


class ModelInputSet(torch.utils.data.Dataset):
    """A source seen through the model's input transform; items are collated by :func:`collate`."""

    def __init__(self, source: Sequence[Sample], size: int, mean: float, std: float) -> None:
        self.source, self.size, self.mean, self.std = source, size, mean, std

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, Sample]:
        sample = self.source[i]
        image, transform = to_model_input(sample.image, self.size, self.mean, self.std)
        boxes = transform.to_model(torch.from_numpy(sample.boxes))  # NaN rows stay NaN
        return image, boxes, _light(sample)


def _light(s: Sample) -> Sample:
    """The sample without its pixels (they travel as the tensor), so workers pickle less."""
    return Sample(s.key, np.zeros((0, 0), np.float32), s.boxes, s.sentences, s.abnormal, s.labels, s.report)


def collate(items: list[tuple[torch.Tensor, torch.Tensor, Sample]]) -> Batch:
    images = torch.stack([im for im, _, _ in items])
    boxes = torch.stack([b for _, b, _ in items])
    samples = [s for _, _, s in items]
    return Batch(
        images=images,
        boxes=boxes,
        selected=torch.from_numpy(np.stack([s.selected for s in samples])),
        abnormal=torch.from_numpy(np.stack([s.abnormal for s in samples])),
        labels=torch.from_numpy(np.stack([s.labels for s in samples])),
        sentences=[s.sentences for s in samples],
        reports=[s.report for s in samples],
        keys=[s.key for s in samples],
    )
