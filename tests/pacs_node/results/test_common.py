"""The evidence header: a pixel-free copy of a source image that shares the elements still as read and
converts them in the copy alone, so normalising the copy never changes the source."""

from __future__ import annotations

from pathlib import Path

import pydicom

from pacs_node.results.common import evidence_header, without_pixel_data
from tests.pacs_node.helpers import make_cr


def test_a_header_copied_as_read_is_the_header_copied_converted_and_the_source_is_left_alone(tmp_path: Path) -> None:
    make_cr(tmp_path / "cr.dcm")
    as_read = pydicom.dcmread(tmp_path / "cr.dcm")
    converted = pydicom.dcmread(tmp_path / "cr.dcm")
    for _ in converted:  # every element converted before the copy
        pass
    raw, whole = without_pixel_data(as_read), without_pixel_data(converted)
    assert "PixelData" not in raw and "PixelData" in as_read
    assert [(e.tag, e.VR, e.value) for e in raw] == [(e.tag, e.VR, e.value) for e in whole]

    odd = pydicom.dcmread(tmp_path / "cr.dcm")
    odd.StudyDate = "2026-01-01"  # a spelling highdicom refuses: the header normalises it
    odd.save_as(tmp_path / "odd.dcm")
    for source in (pydicom.dcmread(tmp_path / "odd.dcm"), odd):  # its elements as read, and converted
        header = evidence_header(source)
        assert header.StudyDate == "20260101" and source.StudyDate == "2026-01-01"
        assert header.PatientSex is None and "PatientSex" not in source
