"""One call, one synthetic chest radiograph with complete ground truth.

``generate_phantom(seed, size)`` is deterministic in ``seed``: the patient (anatomy, placement, findings,
report) comes from one random stream that does not depend on ``size``, so seed 7 at 256 px and at 2500
px is the same patient with the same report; only pixel noise differs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from pipelines.constants import CHEXPERT_LABELS, REGIONS
from pipelines.phantoms.anatomy import (
    Anatomy,
    Placement,
    boxes_from_masks,
    place,
    region_masks,
)
from pipelines.phantoms.findings import (
    Finding,
    abnormal_regions,
    labels_of,
    sample_findings,
)
from pipelines.phantoms.render import attenuation, expose
from pipelines.phantoms.report import assemble_report, region_sentences

BOX_GRID = 512  # region masks for the boxes are measured on at most this many rows
#: the anatomy is drawn on at most this many rows and interpolated up: at clinical sizes the structures
#: are far smoother than a pixel, so only the noise needs the full grid (and it is 10x faster)
DRAW_MAX = 768


@dataclass(frozen=True)
class Phantom:
    seed: int
    image: np.ndarray  # float32 (rows, cols) in [0, 1], 1 = most attenuating (white on MONOCHROME2)
    boxes: np.ndarray  # float32 (29, 4) x_min, y_min, x_max, y_max in pixels, REGIONS order
    findings: tuple[Finding, ...]
    labels: np.ndarray  # float32 (14,), CHEXPERT_LABELS order
    region_abnormal: np.ndarray  # bool (29,)
    sentences: tuple[str | None, ...]  # per region, None = not reported
    report: str
    anatomy: Anatomy
    placement: Placement

    @property
    def selected(self) -> np.ndarray:
        """bool (29,): regions the report has a sentence for (region selection labels)."""
        return np.array([s is not None for s in self.sentences], dtype=bool)

    @property
    def positive_labels(self) -> list[str]:
        return [name for name, y in zip(CHEXPERT_LABELS, self.labels) if y > 0.5]


def generate_phantom(seed: int, size: int = 256) -> Phantom:
    """A phantom ``size`` pixels tall; the width is 85-100% of that, as on real PA films."""
    if size < 64:
        raise ValueError(f"phantom size must be >= 64 pixels, got {size}")
    patient = np.random.default_rng([int(seed), 0])
    rows = int(size)
    cols = int(round(size * patient.uniform(0.85, 1.0)))
    placement = place(patient, rows, cols)
    anatomy, findings = sample_findings(patient, Anatomy.sample(patient))
    sentences = region_sentences(findings)

    pixels = np.random.default_rng([int(seed), 1, rows, cols])
    draw_rows = min(rows, DRAW_MAX)
    draw_cols = max(1, int(round(cols * draw_rows / rows)))
    u, v = placement.grid(draw_rows, draw_cols)
    att = attenuation(anatomy, findings, u, v, pixels)
    if draw_rows != rows:
        att = ndimage.zoom(att, (rows / draw_rows, cols / draw_cols), order=1, mode="nearest", grid_mode=True)
    image = expose(att, pixels, pixel_scale=rows / 256)

    grid_rows = min(rows, BOX_GRID)
    grid_cols = max(1, int(round(cols * grid_rows / rows)))
    gu, gv = (u, v) if (grid_rows, grid_cols) == (draw_rows, draw_cols) else placement.grid(grid_rows, grid_cols)
    boxes = boxes_from_masks(region_masks(anatomy, gu, gv), rows, cols)
    if np.isnan(boxes).any():
        missing = [REGIONS[i] for i in np.flatnonzero(np.isnan(boxes).any(axis=1))]
        raise RuntimeError(f"phantom seed {seed}: regions outside the image: {missing}")
    return Phantom(
        seed=int(seed),
        image=image,
        boxes=boxes,
        findings=findings,
        labels=labels_of(findings),
        region_abnormal=abnormal_regions(findings),
        sentences=sentences,
        report=assemble_report(sentences),
        anatomy=anatomy,
        placement=placement,
    )
