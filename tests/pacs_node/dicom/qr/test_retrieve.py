"""C-MOVE and C-GET with DCMTK movescu (to a storescp the test starts) and getscu."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove

from bench.common import wait_for_port
from tests.pacs_node.dicom.qr.conftest import QR_AET, Archive, Scp
from tests.pacs_node.helpers import requestor
from tests.support import dcmtk


def received(directory: Path) -> dict[str, Dataset]:
    return {str(ds.SOPInstanceUID): ds for ds in (dcmread(p) for p in directory.rglob("*") if p.is_file())}


@pytest.fixture
def storescp(store_scp_port: int, tmp_path: Path) -> Iterator[Path]:
    """DCMTK storescp as the C-MOVE destination STORESCP; yields its output directory."""
    out = tmp_path / "storescp"
    out.mkdir()
    process = subprocess.Popen(
        [dcmtk("storescp"), "-aet", "STORESCP", "-od", str(out), "+B", str(store_scp_port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port(store_scp_port, process, timeout=20)
        yield out
    finally:
        process.terminate()
        process.wait(timeout=10)


def study_of(archive: Archive, patient_id: str) -> tuple[str, list[Dataset]]:
    for uid, objects in archive.studies.items():
        if objects[0].PatientID == patient_id:
            return uid, objects
    raise KeyError(patient_id)


def test_movescu_study_to_storescp(archive: Archive, qr_scp: Scp, storescp: Path) -> None:
    uid, objects = study_of(archive, "P-001")
    run = subprocess.run(
        [dcmtk("movescu"), "-S", "-aec", QR_AET, "-aem", "STORESCP",
         "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={uid}", "127.0.0.1", str(qr_scp.port)],
        capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    got = received(storescp)
    assert set(got) == {str(o.SOPInstanceUID) for o in objects}
    # sent as stored: the SR's content tree arrives unchanged
    sr = next(o for o in objects if o.Modality == "SR")
    stored = dcmread(archive.store.path(archive.store.relpath_for(
        str(sr.StudyInstanceUID), str(sr.SeriesInstanceUID), str(sr.SOPInstanceUID))))
    assert got[str(sr.SOPInstanceUID)].ContentSequence == stored.ContentSequence


def test_movescu_results_series_only(archive: Archive, qr_scp: Scp, storescp: Path) -> None:
    uid, objects = study_of(archive, "P-002")
    sr = next(o for o in objects if o.SOPClassUID.name == "Comprehensive 3D SR Storage")
    run = subprocess.run(
        [dcmtk("movescu"), "-S", "-aec", QR_AET, "-aem", "STORESCP",
         "-k", "QueryRetrieveLevel=SERIES", "-k", f"StudyInstanceUID={uid}",
         "-k", f"SeriesInstanceUID={sr.SeriesInstanceUID}", "127.0.0.1", str(qr_scp.port)],
        capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert set(received(storescp)) == {str(sr.SOPInstanceUID)}


def test_move_to_unknown_destination_is_a801(archive: Archive, qr_scp: Scp) -> None:
    uid, _ = study_of(archive, "P-001")
    ae = requestor("TESTSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate("127.0.0.1", qr_scp.port, ae_title=QR_AET)
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel, query.StudyInstanceUID = "STUDY", uid
    try:
        responses = assoc.send_c_move(query, "NOSUCHAE", StudyRootQueryRetrieveInformationModelMove)
        statuses = [s.Status for s, _ in responses]
    finally:
        assoc.release()
    assert statuses == [0xA801]


def test_move_without_keys_is_refused(qr_scp: Scp, storescp: Path) -> None:
    ae = requestor("TESTSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate("127.0.0.1", qr_scp.port, ae_title=QR_AET)
    query = Dataset()
    query.QueryRetrieveLevel, query.StudyInstanceUID = "STUDY", ""
    try:
        responses = assoc.send_c_move(query, "STORESCP", StudyRootQueryRetrieveInformationModelMove)
        statuses = [s.Status for s, _ in responses]
    finally:
        assoc.release()
    assert statuses[-1] == 0xA900
    assert received(storescp) == {}


def test_getscu_study_results(archive: Archive, qr_scp: Scp, tmp_path: Path) -> None:
    uid, objects = study_of(archive, "P-001")
    out = tmp_path / "get"
    out.mkdir()
    run = subprocess.run(
        [dcmtk("getscu"), "-S", "-aec", QR_AET, "-od", str(out),
         "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={uid}", "127.0.0.1", str(qr_scp.port)],
        capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert set(received(out)) == {str(o.SOPInstanceUID) for o in objects}


def test_missing_file_is_a_failed_suboperation(archive: Archive, qr_scp: Scp, tmp_path: Path) -> None:
    """A file lost from the store fails its own sub-operation; the rest of the study still goes."""
    from storage.query import StoredInstance as Match

    uid, objects = study_of(archive, "P-002")
    service = qr_scp.service

    class _Event:
        is_cancelled = False

    matches = [Match("1.2.3.4", "1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.1.2.1", "aa/bb/missing.dcm")]
    (status, ds), = list(service._datasets(_Event(), matches, {}))
    assert status == 0xFF00 and ds.SOPInstanceUID == "1.2.3.4" and "SOPClassUID" not in ds
