"""The acceptance policy: which received instances become analyse jobs.

Only chest radiographs go to the model; everything else is acknowledged (a modality must never be told
its image failed because we have no use for it) and recorded with the reason it was not processed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydicom import Dataset
from pynetdicom.sop_class import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
)

from pacs_node.dicom.datasets import header_value
from pacs_node.dicom.plain_header import PlainHeader
from pacs_node.dicom.presentation_contexts import IMAGE_SOP_CLASSES, RESULT_SOP_CLASSES

_CHEST_BODY_PARTS = frozenset({"CHEST", "THORAX", "LUNG", "HEART", "RIB", "RIBS", "CHEST_ABDOMEN", "CHESTABDOMEN"})
_CHEST_TEXT = re.compile(r"chest|thora|lung|cxr|\bpa\b.*\blat|poumon|brust|t[oó]rax", re.IGNORECASE)
_RADIOGRAPH_CLASSES = frozenset(
    {ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation, DigitalXRayImageStorageForProcessing}
)


@dataclass(frozen=True)
class Decision:
    analyse: bool
    reason: str | None = None  # why not, when not; never contains patient data


def _text(ds: Dataset | PlainHeader, keyword: str) -> str:
    value = header_value(ds, keyword)
    return str(value).strip() if value is not None else ""


def decide(ds: Dataset | PlainHeader) -> Decision:
    """Decide from the header alone (no pixel data is read on the receive path)."""
    sop_class = str(header_value(ds, "SOPClassUID") or "")
    if sop_class in RESULT_SOP_CLASSES:
        return Decision(False, "not an image (structured report, key object or presentation state)")
    if sop_class not in IMAGE_SOP_CLASSES:
        return Decision(False, f"SOP class {sop_class} is not a radiograph class")

    modality = _text(ds, "Modality").upper()
    body_part = _text(ds, "BodyPartExamined").upper()
    described_as_chest = any(
        _CHEST_TEXT.search(_text(ds, kw)) for kw in ("StudyDescription", "SeriesDescription", "ProtocolName")
    )

    if sop_class in _RADIOGRAPH_CLASSES or modality in ("CR", "DX"):
        # A radiograph of some other body part (a hand, a knee) must not be read by a chest model; an
        # absent body part is common on chest rooms and is taken as chest.
        if body_part and body_part not in _CHEST_BODY_PARTS and not described_as_chest:
            return Decision(False, f"radiograph of body part {body_part}, not chest")
        return Decision(True)

    # Secondary capture: digitised films and exports; only when the header says it is a chest.
    if body_part in _CHEST_BODY_PARTS or described_as_chest:
        return Decision(True)
    return Decision(False, f"secondary capture (modality {modality or 'unknown'}) not marked as chest")
