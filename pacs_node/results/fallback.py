"""Comprehensive SR copy of a Comprehensive 3D SR, for receivers that refuse the 3D class."""

from __future__ import annotations

import copy
from collections.abc import Iterable

from pydicom import Dataset
from pydicom.uid import UID, Comprehensive3DSRStorage, ComprehensiveSRStorage

from pacs_node.results.uids import derived_uid


def _content_items(items: Iterable[Dataset]) -> Iterable[Dataset]:
    for item in items:
        yield item
        yield from _content_items(item.get("ContentSequence", []))


def comprehensive_fallback(ds: Dataset) -> Dataset | None:
    """The same document as a Comprehensive SR, or None when ``ds`` is not a Comprehensive 3D SR or
    uses SCOORD3D (which the 2D class cannot hold).

    The copy gets its own SOP Instance UID, derived from the original's, so sending the fallback
    twice still yields one object; Series and Study stay the same."""
    if ds.get("SOPClassUID") != Comprehensive3DSRStorage:
        return None
    if any(item.get("ValueType") == "SCOORD3D" for item in _content_items(ds.get("ContentSequence", []))):
        return None
    out = copy.deepcopy(ds)
    uid = UID(derived_uid("comprehensive-sr-fallback", str(ds.SOPInstanceUID)))
    out.SOPClassUID = ComprehensiveSRStorage
    out.SOPInstanceUID = uid
    if getattr(out, "file_meta", None) is not None:
        out.file_meta.MediaStorageSOPClassUID = ComprehensiveSRStorage
        out.file_meta.MediaStorageSOPInstanceUID = uid
    return out
