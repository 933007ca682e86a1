"""Which projection a radiograph is, from its header alone, and which image of a study to read.

The region detector and the report decoder are frontal models (Chest ImaGenome has frontal images only): a
lateral fed to them gets a confident, wrong report. So every received image is classified before
analysis, from the most explicit evidence the header has:

1. View Position (0018,5101): ``PA``, ``AP``, ``LL``/``RL``/``LATERAL``, oblique and decubitus terms;
2. View Code Sequence (0054,0220), CID 4010 codes (SCT postero-anterior, antero-posterior, lateral...);
3. Patient Orientation (0020,0020): the row direction of a frontal chest runs along the patient's left-right
   axis (``L``/``R``), that of a lateral along the antero-posterior axis (``A``/``P``).

An image none of these describe is *unknown*: it may be read when the study has no image known to be
frontal (many older CR rooms send no view at all), and the reason says the view was assumed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pydicom import Dataset

from pipelines.constants import FRONTAL_VIEWS

_VIEW_POSITIONS = {
    "PA": "PA", "AP": "AP",
    "LL": "LATERAL", "RL": "LATERAL", "LAT": "LATERAL", "LATERAL": "LATERAL", "LLAT": "LATERAL", "RLAT": "LATERAL",
    "LAO": "OBLIQUE", "RAO": "OBLIQUE", "LPO": "OBLIQUE", "RPO": "OBLIQUE", "OBL": "OBLIQUE", "OBLIQUE": "OBLIQUE",
    "LLD": "DECUBITUS", "RLD": "DECUBITUS", "DECUB": "DECUBITUS",
}

#: CID 4010 (DX View) codes, SCT, by value.
_VIEW_CODES = {
    "272479007": "PA", "399348003": "AP", "399033003": "FRONTAL",
    "49370004": "LATERAL", "399067008": "LATERAL", "399173006": "LATERAL", "399198007": "LATERAL",
    "399352003": "LATERAL", "399260004": "LATERAL",
}

_NAMES = {"PA": "postero-anterior view", "AP": "antero-posterior view", "FRONTAL": "frontal view",
          "LATERAL": "lateral view", "OBLIQUE": "oblique view", "DECUBITUS": "decubitus view"}


@dataclass(frozen=True)
class View:
    """``name`` PA, AP, FRONTAL (frontal, direction not stated), LATERAL, OBLIQUE, DECUBITUS, OTHER or
    UNKNOWN; ``evidence`` says which attribute decided, in words safe to log and to print in a report."""

    name: str
    evidence: str

    @property
    def known(self) -> bool:
        return self.name != "UNKNOWN"

    @property
    def description(self) -> str:
        return _NAMES.get(self.name, f"{self.name.lower()} view")


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return str(value or "").strip().upper()


def classify_view(ds: Dataset) -> View:
    """The projection of ``ds`` (header only)."""
    position = _text(ds, "ViewPosition")
    if position:
        name = _VIEW_POSITIONS.get(position, "OTHER")
        return View(name, f"View Position {position}")
    for item in ds.get("ViewCodeSequence") or []:
        code = str(item.get("CodeValue", "") or "").strip()
        if code in _VIEW_CODES:
            return View(_VIEW_CODES[code], f"View Code Sequence ({item.get('CodeMeaning', code)})")
        if code:
            return View("OTHER", f"View Code Sequence ({item.get('CodeMeaning', code)})")
    orientation = ds.get("PatientOrientation")
    if orientation is not None and not isinstance(orientation, str) and len(orientation) == 2:
        row = str(orientation[0]).strip().upper()[:1]
        if row in ("L", "R"):
            # Row runs towards the patient's left: seen from behind (PA); towards the right: from the front (AP).
            return View("PA" if row == "L" else "AP", f"Patient Orientation {orientation[0]}\\{orientation[1]}")
        if row in ("A", "P"):
            return View("LATERAL", f"Patient Orientation {orientation[0]}\\{orientation[1]}")
    return View("UNKNOWN", "no View Position, View Code Sequence or Patient Orientation")


@dataclass(frozen=True)
class Candidate:
    """One image of a study as the choice sees it."""

    sop_instance_uid: str
    view: View
    acquired: str  # AcquisitionDate+Time (or Content/Instance creation), sortable; "" when absent


@dataclass(frozen=True)
class Choice:
    """The image read and why, and every other image with the reason it was set aside."""

    analysed: str | None
    reason: str
    set_aside: dict[str, str]


def acquisition_time(ds: Dataset) -> str:
    """A sortable acquisition date-time (the latest acquisition wins a tie between equal views)."""
    for date, time in (("AcquisitionDate", "AcquisitionTime"), ("ContentDate", "ContentTime"),
                       ("InstanceCreationDate", "InstanceCreationTime")):
        if ds.get(date):
            return f"{ds.get(date)}{str(ds.get(time) or '').ljust(13, '0')}"
    return str(ds.get("AcquisitionDateTime") or "")


def choose(candidates: Sequence[Candidate], readable: Sequence[str] = FRONTAL_VIEWS) -> Choice:
    """The best image a bundle that reads ``readable`` views can analyse: PA over AP (the order of
    ``readable``), then a frontal view of unstated direction, then an image of unknown view; among equals
    the latest acquisition. Every image not chosen is set aside with its reason."""
    readable = tuple(readable)
    frontal = set(FRONTAL_VIEWS) & set(readable)

    def rank(c: Candidate) -> int | None:
        if c.view.name in readable:
            return readable.index(c.view.name)
        if c.view.name == "FRONTAL" and frontal:
            return len(readable)
        if not c.view.known and frontal:
            return len(readable) + 1
        return None

    usable = [(rank(c), c) for c in candidates if rank(c) is not None]
    set_aside = {c.sop_instance_uid: f"{c.view.description} ({c.view.evidence}); the model reads "
                 f"{', '.join(readable)} views only" for c in candidates if rank(c) is None}
    if not usable:
        return Choice(None, "no image of the study is a view the model reads "
                      f"({', '.join(readable)})", set_aside)
    best_rank = min(r for r, _ in usable)
    best = max((c for r, c in usable if r == best_rank), key=lambda c: (c.acquired, c.sop_instance_uid))
    if best.view.known:
        reason = f"{best.view.description} ({best.view.evidence})"
    else:
        reason = f"view not stated ({best.view.evidence}); assumed frontal, no image of the study is known to be"
    others = [c for _, c in usable if c is not best]
    if others:
        reason += f"; chosen over {len(others)} other readable image(s)"
    for c in others:
        better = "a preferred view" if rank(c) != best_rank else "a later acquisition of the same view"
        set_aside[c.sop_instance_uid] = f"{c.view.description} ({c.view.evidence}); {better} was analysed"
    return Choice(best.sop_instance_uid, reason, set_aside)
