"""The narrow interface between the node and the model stack.

The worker hands a pipeline decoded DICOM datasets and gets back plain data: one :class:`ImageResult`
per dataset, with boxes already mapped to the *source* image's pixel grid, so that nothing downstream
(SR builder, presentation state) needs to know how the image was resized or padded for the model.
"""

from __future__ import annotations

import time

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import pydicom

from pipelines.constants import CHEXPERT_LABELS, FRONTAL_VIEWS, REGIONS


class PipelineError(Exception):
    """Base of all errors a pipeline raises for one input; the worker records ``str(exc)`` as the reason."""


class PreprocessError(PipelineError):
    """The dataset's pixel data cannot be decoded or is not a usable grayscale radiograph.

    Not retryable: the same bytes will fail the same way."""


@dataclass(frozen=True)
class RegionResult:
    """One of the 29 anatomical regions of one image."""

    name: str
    #: (x_min, y_min, x_max, y_max) in source pixel coordinates: x = column, y = row, both from the
    #: top-left corner of the top-left pixel, i.e. the DICOM SCOORD convention.
    box: tuple[float, float, float, float]
    detected: bool
    selected: bool
    abnormal_prob: float
    sentence: str | None = None
    #: The model's abnormality decision (RGRG: abnormality logit > -1; the bundle's ``abnormal_logit``).
    abnormal: bool = False


@dataclass(frozen=True)
class ImageResult:
    """Everything the model stack says about one image."""

    regions: tuple[RegionResult, ...]  # len == 29, in ``REGIONS`` order
    report: str  # the selected regions' sentences, de-duplicated, in anatomical order
    label_probs: dict[str, float]  # CheXpert label -> probability, all 14 labels
    model_name: str
    model_version: str
    clinical_use: bool
    source_rows: int
    source_columns: int
    impression: str | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    #: the content gate's out-of-distribution score and threshold (None: the bundle has no gate)
    gate_score: float | None = None
    gate_threshold: float | None = None

    @property
    def selected_regions(self) -> tuple[RegionResult, ...]:
        return tuple(r for r in self.regions if r.selected)


@dataclass(frozen=True)
class NotInterpreted:
    """The image was read but not interpreted: the content gate found it outside what the models were
    trained on (a photograph, another body part). Not an error: the node reports that it did not read it."""

    reason: str
    model_name: str
    model_version: str
    clinical_use: bool
    gate_score: float | None = None
    gate_threshold: float | None = None


class Pipeline(Protocol):
    """What the worker needs of a model stack. ``views``: the projections its models read (the worker
    never hands it another view)."""

    model_name: str
    model_version: str
    views: tuple[str, ...]

    def analyse(self, datasets: Sequence[pydicom.Dataset]) -> list[ImageResult | NotInterpreted | PipelineError]:
        """Analyse a batch; a dataset that cannot be processed yields its error in its slot
        instead of failing the whole batch."""
        ...


class FakePipeline:
    """A deterministic stand-in with the real interface, for tests of the node that must not depend
    on model weights. Boxes are fixed fractions of the source image, so they are always inside it."""

    model_name = "fake"
    model_version = "0"
    clinical_use = False
    views = FRONTAL_VIEWS
    #: Seconds each batch takes, like a model would: lets tests catch a worker in the middle of a job.
    delay_s = 0.0

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s

    def analyse(self, datasets: Sequence[pydicom.Dataset]) -> list[ImageResult | PipelineError]:
        if self.delay_s:
            time.sleep(self.delay_s)
        out: list[ImageResult | PipelineError] = []
        for ds in datasets:
            rows, cols = int(getattr(ds, "Rows", 0) or 0), int(getattr(ds, "Columns", 0) or 0)
            if rows <= 0 or cols <= 0 or "PixelData" not in ds:
                out.append(PreprocessError("dataset has no usable pixel data"))
                continue
            regions = []
            for i, name in enumerate(REGIONS):
                fx, fy = (i % 6) / 7.0, (i // 6) / 6.0
                box = (fx * cols, fy * rows, (fx + 1 / 7.0) * cols, (fy + 1 / 6.0) * rows)
                selected = i in (0, 8, 24)
                sentence = f"The {name} is unremarkable." if selected else None
                regions.append(RegionResult(name, box, True, selected, 0.1, sentence))
            report = " ".join(r.sentence for r in regions if r.sentence)
            probs = {label: (0.9 if label == "Cardiomegaly" else 0.05) for label in CHEXPERT_LABELS}
            out.append(
                ImageResult(tuple(regions), report, probs, self.model_name, self.model_version,
                            self.clinical_use, rows, cols)
            )
        return out
