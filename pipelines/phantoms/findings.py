"""Findings a phantom can carry: how they are sampled, which regions they make abnormal, which region
reports them, and which CheXpert labels they map to.

A finding is pure data (kind, side, zone, severity and canonical-frame geometry); drawing it is
:mod:`pipelines.phantoms.render`'s job and phrasing it is :mod:`pipelines.phantoms.report`'s, so the
image, the labels and the report are three views of the same record and cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from pipelines.constants import CHEXPERT_LABELS, REGIONS
from pipelines.phantoms.anatomy import Anatomy, region_masks

SIDES = {-1: "right", 1: "left"}
ZONES = ("upper", "mid", "lower")

#: finding kind -> the CheXpert labels it makes positive. "No Finding" is positive when no pathology
#: label is (support devices do not count, as in the CheXpert labeller); Fracture and Pleural Other are
#: never drawn and stay negative.
LABELS_OF: dict[str, tuple[str, ...]] = {
    "cardiomegaly": ("Cardiomegaly",),
    "widened_mediastinum": ("Enlarged Cardiomediastinum",),
    "effusion": ("Pleural Effusion",),
    "pneumothorax": ("Pneumothorax",),
    "consolidation": ("Consolidation", "Lung Opacity", "Pneumonia"),
    "opacity": ("Lung Opacity",),
    "nodule": ("Lung Lesion",),
    "atelectasis": ("Atelectasis",),
    "edema": ("Edema",),
    "et_tube": ("Support Devices",),
    "central_line": ("Support Devices",),
}
KINDS = tuple(LABELS_OF)

#: how often each kind appears in an image that is not drawn normal
PREVALENCE: dict[str, float] = {
    "cardiomegaly": 0.2,
    "widened_mediastinum": 0.14,
    "effusion": 0.2,
    "pneumothorax": 0.2,
    "consolidation": 0.16,
    "opacity": 0.12,
    "nodule": 0.18,
    "atelectasis": 0.16,
    "edema": 0.14,
    "et_tube": 0.12,
    "central_line": 0.14,
}
NORMAL_FRACTION = 0.25  # images with no pathology at all (devices may still be present)


@dataclass(frozen=True)
class Finding:
    kind: str
    side: int = 0  # -1 right, +1 left, 0 central or bilateral
    zone: str | None = None  # "upper" / "mid" / "lower" for parenchymal findings
    severity: str = ""  # kind-specific grade that the report phrases, e.g. "small"/"moderate"/"large"
    geometry: dict[str, float] = field(default_factory=dict)  # canonical-frame parameters for drawing

    @property
    def side_name(self) -> str:
        return SIDES.get(self.side, "")

    def affected_regions(self) -> tuple[str, ...]:
        """Regions whose appearance this finding changes (the region abnormality labels)."""
        s = self.side_name
        match self.kind:
            case "cardiomegaly":
                return ("cardiac silhouette",)
            case "widened_mediastinum":
                return ("upper mediastinum", "mediastinum")
            case "effusion":
                extra = (f"{s} mid lung zone",) if self.severity == "large" else ()
                return (f"{s} costophrenic angle", f"{s} hemidiaphragm", f"{s} lower lung zone",
                        f"{s} lung", *extra)
            case "pneumothorax":
                return (f"{s} apical zone", f"{s} upper lung zone", f"{s} lung")
            case "consolidation" | "opacity" | "nodule" | "atelectasis":
                return (f"{s} {self.zone} lung zone", f"{s} lung")
            case "edema":
                return ("right lung", "left lung", "right hilar structures", "left hilar structures")
            case "et_tube":
                return ("trachea",)
            case "central_line":
                return ("svc", "cavoatrial junction") if self.severity == "cavoatrial" else ("svc",)
        raise ValueError(f"unknown finding kind {self.kind!r}")

    def report_regions(self) -> tuple[str, ...]:
        """Regions whose sentence reports this finding (the region selection labels)."""
        s = self.side_name
        match self.kind:
            case "cardiomegaly":
                return ("cardiac silhouette",)
            case "widened_mediastinum":
                return ("upper mediastinum",)
            case "effusion":
                return (f"{s} costophrenic angle",)
            case "pneumothorax":
                return (f"{s} apical zone",)
            case "consolidation" | "opacity" | "nodule" | "atelectasis":
                return (f"{s} {self.zone} lung zone",)
            case "edema":
                return ("right lung", "left lung")
            case "et_tube":
                return ("trachea",)
            case "central_line":
                return ("cavoatrial junction",) if self.severity == "cavoatrial" else ("svc",)
        raise ValueError(f"unknown finding kind {self.kind!r}")


def labels_of(findings: tuple[Finding, ...]) -> np.ndarray:
    """The 14 CheXpert labels (0/1, ``CHEXPERT_LABELS`` order) of a set of findings."""
    positive = {label for f in findings for label in LABELS_OF[f.kind]}
    if not positive - {"Support Devices"}:
        positive.add("No Finding")
    return np.array([label in positive for label in CHEXPERT_LABELS], dtype=np.float32)


def abnormal_regions(findings: tuple[Finding, ...]) -> np.ndarray:
    """(29,) bool: which regions any finding affects."""
    hit = {r for f in findings for r in f.affected_regions()}
    return np.array([r in hit for r in REGIONS], dtype=bool)


# --- sampling ----------------------------------------------------------------------------------------

_ZONE_GRID = np.meshgrid(np.linspace(-1.1, 1.1, 111, dtype=np.float32),
                         np.linspace(-1.1, 1.2, 116, dtype=np.float32))


def _point_in(rng: np.random.Generator, a: Anatomy, region: str, margin: int = 2) -> tuple[float, float]:
    """A random canonical point well inside ``region`` (eroded by ``margin`` grid steps)."""
    u, v = _ZONE_GRID
    m = region_masks(a, u, v)[region]
    core = m.copy()
    for axis in (0, 1):
        for shift in range(1, margin + 1):
            core &= np.roll(m, shift, axis) & np.roll(m, -shift, axis)
    ys, xs = np.nonzero(core if core.any() else m)
    i = rng.integers(len(ys))
    return float(u[ys[i], xs[i]]), float(v[ys[i], xs[i]])


def sample_findings(rng: np.random.Generator, a: Anatomy) -> tuple[Anatomy, tuple[Finding, ...]]:
    """Draw a set of findings for anatomy ``a``; returns the anatomy as the findings reshape it
    (a bigger heart, a wider mediastinum) and the findings, in a fixed kind order."""
    normal = rng.random() < NORMAL_FRACTION
    present = {k for k, p in PREVALENCE.items() if rng.random() < p}
    if normal:
        present &= {"et_tube", "central_line"}
    findings: list[Finding] = []
    used_slots: set[tuple[int, str]] = set()
    pleural_sides: dict[str, int] = {}

    def free_slot(zones: tuple[str, ...]) -> tuple[int, str] | None:
        options = [(s, z) for s in (-1, 1) for z in zones if (s, z) not in used_slots]
        if not options:
            return None
        slot = options[rng.integers(len(options))]
        used_slots.add(slot)
        return slot

    for kind in KINDS:
        if kind not in present:
            continue
        match kind:
            case "cardiomegaly":
                severity = ("mild", "moderate", "severe")[rng.integers(3)]
                lo, hi = {"mild": (0.46, 0.48), "moderate": (0.5, 0.53), "severe": (0.56, 0.6)}[severity]
                a = replace(a, heart_halfwidth=rng.uniform(lo, hi),
                            heart_halfheight=a.heart_halfheight * rng.uniform(1.08, 1.18))
                findings.append(Finding(kind, 0, None, severity))
            case "widened_mediastinum":
                a = replace(a, med_halfwidth=a.med_halfwidth + rng.uniform(0.07, 0.1))
                findings.append(Finding(kind, 0, None, "widened"))
            case "effusion":
                sides = ((-1,), (1,), (-1, 1))[rng.integers(3)]
                for side in sides:
                    severity = ("small", "moderate", "large")[rng.integers(3)]
                    depth = {"small": (0.12, 0.16), "moderate": (0.26, 0.32), "large": (0.45, 0.55)}[severity]
                    findings.append(Finding(kind, side, None, severity, {"depth": rng.uniform(*depth)}))
                    pleural_sides[f"effusion{side}"] = side
            case "pneumothorax":
                side = int(rng.choice([s for s in (-1, 1) if f"effusion{s}" not in pleural_sides] or [0]))
                if side == 0:
                    continue
                severity = ("small", "large")[rng.integers(2)]
                gap, reach = {"small": ((0.09, 0.12), (0.3, 0.4)), "large": ((0.2, 0.26), (0.75, 0.9))}[severity]
                findings.append(Finding(kind, side, None, severity,
                                        {"gap": rng.uniform(*gap), "reach": rng.uniform(*reach)}))
            case "consolidation" | "opacity" | "nodule" | "atelectasis":
                slot = free_slot(("lower",) if kind == "atelectasis" else ZONES)
                if slot is None:
                    continue
                side, zone = slot
                cu, cv = _point_in(rng, a, f"{SIDES[side]} {zone} lung zone", margin=3)
                geometry = {"u": cu, "v": cv}
                severity = ""
                if kind == "nodule":
                    severity = ("small", "medium", "mass")[rng.integers(3)]
                    radius = {"small": (0.045, 0.055), "medium": (0.07, 0.085), "mass": (0.1, 0.12)}[severity]
                    geometry["r"] = rng.uniform(*radius)
                elif kind == "atelectasis":
                    geometry.update(angle=rng.uniform(-0.3, 0.3), length=rng.uniform(0.22, 0.32),
                                    thickness=rng.uniform(0.02, 0.03))
                else:
                    geometry.update(ru=rng.uniform(0.14, 0.2), rv=rng.uniform(0.1, 0.15),
                                    texture=float(rng.integers(1 << 30)))
                findings.append(Finding(kind, side, zone, severity, geometry))
            case "edema":
                severity = ("mild", "moderate")[rng.integers(2)]
                findings.append(Finding(kind, 0, None, severity))
            case "et_tube":
                severity = ("standard", "low")[int(rng.random() < 0.3)]
                above = rng.uniform(0.02, 0.05) if severity == "low" else rng.uniform(0.12, 0.2)
                findings.append(Finding(kind, 0, None, severity, {"above": above}))
            case "central_line":
                severity = ("svc", "cavoatrial")[rng.integers(2)]
                findings.append(Finding(kind, -1, None, severity))
    return a, tuple(findings)
