"""Transcoding on the way out, against an uncompressed-only DCMTK storescp (its default): ``send``, the
exporter and C-MOVE deliver the real JPEG 2000 chest CR (lossless and lossy) and a JPEG-LS file decoded,
pixel-identical for the lossless sources; C-GET by DCMTK getscu offering only uncompressed likewise."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
)

from pacs_node.dicom.transcoding import choose_syntax, for_peer, proposed_syntaxes
from tests.pacs_node.helpers import Node, StoreSCP, make_cr, storescu
from tests.support import SHARED, dcmtk

REAL = SHARED / "data" / "real-dicom"


def test_the_syntax_chosen_loses_nothing() -> None:
    assert choose_syntax(JPEG2000Lossless, [JPEG2000Lossless, ExplicitVRLittleEndian]) == JPEG2000Lossless
    assert choose_syntax(JPEG2000Lossless, [ImplicitVRLittleEndian]) == ImplicitVRLittleEndian
    assert choose_syntax(JPEG2000, [JPEGLSLossless, RLELossless]) == JPEGLSLossless  # lossless of the lossy pixels
    assert choose_syntax(JPEG2000Lossless, [JPEGBaseline8Bit]) is None  # never a lossy encoding
    assert choose_syntax(ExplicitVRLittleEndian, [ImplicitVRLittleEndian]) == ImplicitVRLittleEndian
    assert choose_syntax(JPEG2000Lossless, [JPEG2000Lossless, JPEGLSLossless], preferred=JPEGLSLossless) \
        == JPEGLSLossless
    assert proposed_syntaxes([JPEG2000Lossless], JPEGLSLossless) == [
        [JPEG2000Lossless], [JPEGLSLossless], [ExplicitVRLittleEndian, ImplicitVRLittleEndian]]


def test_a_compressed_instance_is_re_encoded_losslessly_when_no_uncompressed_syntax_is_accepted(tmp_path: Path) -> None:
    source = make_cr(tmp_path / "cr.dcm", rows=32, cols=32)
    stored = pydicom.dcmread(tmp_path / "cr.dcm")
    stored.compress(RLELossless)
    sent = for_peer(stored, [JPEGLSLossless])
    assert sent.file_meta.TransferSyntaxUID == JPEGLSLossless and stored.file_meta.TransferSyntaxUID == RLELossless
    assert np.array_equal(sent.pixel_array, np.frombuffer(source.PixelData, np.uint16).reshape(32, 32))


def _jpeg_ls_cr(path: Path, study_uid: str) -> pydicom.Dataset:
    ds = make_cr(path, rows=128, cols=128, study_uid=study_uid, seed=3)
    ds.compress(JPEGLSLossless)
    ds.save_as(path, enforce_file_format=True)
    return ds


def _check(received: list[pydicom.Dataset], expected: dict[str, np.ndarray]) -> None:
    by_uid = {str(ds.SOPInstanceUID): ds for ds in received if str(ds.SOPInstanceUID) in expected}
    assert sorted(by_uid) == sorted(expected), f"received {sorted(by_uid)}"
    for uid, ds in by_uid.items():
        assert not ds.file_meta.TransferSyntaxUID.is_compressed, ds.file_meta.TransferSyntaxUID.name
        assert np.array_equal(ds.pixel_array, expected[uid]), f"{uid}: pixels differ"


@pytest.mark.skipif(not (REAL / "RG1_J2KR.dcm").is_file(), reason="../shared/data/real-dicom is not available")
def test_send_export_move_and_get_to_an_uncompressed_only_peer(make_node: Callable[..., Node], receiver: StoreSCP,
                                                               ports: tuple[int, int, int], tmp_path: Path) -> None:
    lossless, lossy = REAL / "RG1_J2KR.dcm", REAL / "RG1_J2KI.dcm"
    original = pydicom.dcmread(REAL / "RG1_UNCR.dcm").pixel_array  # what the lossless file encodes
    lossy_pixels = pydicom.dcmread(lossy).pixel_array  # what any decoder of the lossy file shows
    study = str(pydicom.dcmread(lossless, stop_before_pixels=True).StudyInstanceUID)
    jls = _jpeg_ls_cr(tmp_path / "jls.dcm", study)
    expected = {str(pydicom.dcmread(lossless, stop_before_pixels=True).SOPInstanceUID): original,
                str(pydicom.dcmread(lossy, stop_before_pixels=True).SOPInstanceUID): lossy_pixels,
                str(jls.SOPInstanceUID): jls.pixel_array}
    node = make_node("""
[[allowed_callers]]
ae_title = "RECEIVER"
services = ["store"]
[[allowed_callers]]
ae_title = "VIEWER"
services = ["find", "move", "get"]
""")

    # pacs-node send: one association, each file transcoded as the peer needs
    node.cli("send", "receiver", str(lossless), str(lossy), str(tmp_path / "jls.dcm"))
    _check(receiver.received(), expected)

    # C-MOVE of the stored (compressed) study, and the results the exporter sent: the sender is the peer
    for path, proposes in ((lossless, "-xv"), (lossy, "-xw"), (tmp_path / "jls.dcm", "-xt")):
        sent = storescu(node.port, [path], proposes, calling="RECEIVER")  # each in its own syntax
        assert sent.returncode == 0, sent.stderr
    stored = node.query("SELECT transfer_syntax_uid FROM instances WHERE origin = 'received'")
    assert {r["transfer_syntax_uid"] for r in stored} == {JPEG2000Lossless, JPEG2000, JPEGLSLossless}  # as received
    # one study: the sets before the last are superseded (cancelled), the last one's results all sent
    node.wait_jobs(lambda jobs: len([j for j in jobs if j["kind"] == "export"]) >= 3
                   and all(j["state"] in ("done", "cancelled") for j in jobs), timeout=120)
    moved_to = StoreSCP(tmp_path / "moved", ports[2])
    receiver.stop()
    moved_to.start()
    try:
        moved = subprocess.run(
            [dcmtk("movescu"), "-S", "-aet", "VIEWER", "-aec", "PACSNODE", "-aem", "RECEIVER",
             "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}", "127.0.0.1", str(node.port)],
            capture_output=True, text=True, timeout=120)
        assert moved.returncode == 0, moved.stdout + moved.stderr
        received = moved_to.received()
    finally:
        moved_to.stop()
    _check(received, expected)
    results = {r["sop_instance_uid"] for r in node.query("SELECT sop_instance_uid FROM instances WHERE origin = 'result'")}
    assert results and results <= {str(ds.SOPInstanceUID) for ds in received}
    assert results <= {str(ds.SOPInstanceUID) for ds in receiver.received()}  # exported before, too

    # C-GET: getscu proposes uncompressed storage contexts only
    got_dir = tmp_path / "get"
    got_dir.mkdir()
    got = subprocess.run(
        [dcmtk("getscu"), "-S", "-aet", "VIEWER", "-aec", "PACSNODE", "-od", str(got_dir),
         "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}", "127.0.0.1", str(node.port)],
        capture_output=True, text=True, timeout=120)
    assert got.returncode == 0, got.stdout + got.stderr
    _check([pydicom.dcmread(p) for p in got_dir.iterdir()], expected)
