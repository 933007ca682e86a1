"""C-MOVE and C-GET sub-operations that send the stored file as it is (pacs_node.dicom.qr.sending), with
the listener's pynetdicom adjustments applied (the file streamed from disk, command sets encoded by
pacs_node.dicom.command_sets) and without them (pynetdicom reads the file by path): DCMTK storescp and
getscu receive the stored bytes, a receiver that wants another syntax gets a converted copy, and a
file gone from the store fails its own sub-operation only; consecutive C-FINDs get complete answers.
pynetdicom's narrating handlers are taken off
an association only when their lines would be dropped."""

from __future__ import annotations

import io
import logging
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove

from bench.common import wait_for_port
from pacs_node.config import Peer
from pacs_node.dicom.adjustments import apply_pynetdicom_adjustments, undo_pynetdicom_adjustments
from pacs_node.dicom.qr import QueryRetrieveService
from pacs_node.dicom.qr.sending import skip_unlogged_narration
from pacs_node.work.instance_record import instance_record
from storage.schema import Origin
from tests.pacs_node.dicom.qr.conftest import Archive
from tests.pacs_node.helpers import requestor
from tests.pacs_node.results.synthetic import make_cr
from tests.support import dcmtk, free_port

AET = "STREAMQR"
STUDY = generate_uid()
GONE_STUDY = generate_uid()


def data_set_bytes(path: Path) -> tuple[str, bytes]:
    """(transfer syntax, the encoded data set after the file meta) of a DICOM file."""
    raw = path.read_bytes()
    ds = dcmread(io.BytesIO(raw), stop_before_pixels=True)
    return str(ds.file_meta.TransferSyntaxUID), raw[-_data_set_length(raw):]


def _data_set_length(raw: bytes) -> int:
    meta_end = 132 + 12 + int.from_bytes(raw[140:144], "little")  # preamble, DICM, group length element
    return len(raw) - meta_end


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    """Three tiny CRs of one study, and a study whose one file is then removed from the store."""
    archive, engine = Archive.open(tmp_path_factory.mktemp("stream-archive"))
    for i in range(3):
        archive.add(make_cr(patient_id="S-1", patient_name="Stream^One", study_uid=STUDY, study_date="20240101",
                            accession=f"S{i}"), Origin.RECEIVED)
    gone = make_cr(patient_id="S-2", patient_name="Stream^Two", study_uid=GONE_STUDY, study_date="20240102",
                   accession="S9")
    archive.add(gone, Origin.RECEIVED)
    archive.add(make_cr(patient_id="S-2", patient_name="Stream^Two", study_uid=GONE_STUDY, study_date="20240102",
                        accession="S9"), Origin.RECEIVED)
    record = instance_record(gone)
    archive.store.path(archive.store.relpath_for(record.study_instance_uid, record.series_instance_uid,
                                                 record.sop_instance_uid)).unlink()
    yield archive
    engine.dispose()


def stored_path(archive: Archive, ds: Dataset) -> Path:
    return archive.store.path(archive.store.relpath_for(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                                                        str(ds.SOPInstanceUID)))


@pytest.fixture(params=["adjusted", "stock"], scope="module")
def adjusted(request: pytest.FixtureRequest) -> Iterator[bool]:
    """With the listener's pynetdicom adjustments applied (as in ``pacs-node serve``), or stock pynetdicom."""
    if request.param == "adjusted":
        apply_pynetdicom_adjustments()
        assert _config.STORE_SEND_CHUNKED_DATASET
        yield True
        undo_pynetdicom_adjustments()
    else:
        assert not _config.STORE_SEND_CHUNKED_DATASET
        yield False


@pytest.fixture(scope="module")
def receivers() -> dict[str, int]:
    return {"STORESCP": free_port(), "IMPLICIT": free_port()}


@pytest.fixture(scope="module")
def scp(archive: Archive, adjusted: bool, receivers: dict[str, int]) -> Iterator[int]:
    peers = {name.lower(): Peer(ae_title=name, host="127.0.0.1", port=port) for name, port in receivers.items()}
    service = QueryRetrieveService(archive.sessions, archive.store, peers, ae_title=AET)
    ae = AE(ae_title=AET)
    service.add_contexts(ae)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=service.handlers())
    yield port
    server.shutdown()


def storescp(port: int, ae_title: str, out: Path, *options: str) -> subprocess.Popen:
    out.mkdir()
    process = subprocess.Popen([dcmtk("storescp"), "-aet", ae_title, "-od", str(out), *options, str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(port, process, timeout=20)
    return process


def move(port: int, destination: str, study: str) -> tuple[Dataset, Dataset | None]:
    """The final C-MOVE response (status, identifier), requested with pynetdicom."""
    ae = requestor("TESTSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate("127.0.0.1", port, ae_title=AET)
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study
    try:
        return list(assoc.send_c_move(query, destination, StudyRootQueryRetrieveInformationModelMove))[-1]
    finally:
        assoc.release()


def test_movescu_delivers_the_stored_bytes(archive: Archive, scp: int, receivers: dict[str, int],
                                           tmp_path: Path) -> None:
    receiver = storescp(receivers["STORESCP"], "STORESCP", tmp_path / "in")
    try:
        run = subprocess.run([dcmtk("movescu"), "-S", "-aec", AET, "-aem", "STORESCP",
                              "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={STUDY}",
                              "127.0.0.1", str(scp)], capture_output=True, text=True, timeout=120)
    finally:
        receiver.terminate()
        receiver.wait(timeout=10)
    assert run.returncode == 0, run.stdout + run.stderr
    got = {str(dcmread(p).SOPInstanceUID): data_set_bytes(p) for p in (tmp_path / "in").iterdir()}
    sent = {str(ds.SOPInstanceUID): data_set_bytes(stored_path(archive, ds)) for ds in archive.studies[STUDY]}
    assert got == sent


def test_getscu_delivers_the_stored_bytes(archive: Archive, scp: int, tmp_path: Path) -> None:
    out = tmp_path / "get"
    out.mkdir()
    run = subprocess.run([dcmtk("getscu"), "-S", "-aec", AET, "-od", str(out),
                          "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={STUDY}",
                          "127.0.0.1", str(scp)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    got = {str(dcmread(p).SOPInstanceUID): data_set_bytes(p) for p in out.iterdir()}
    sent = {str(ds.SOPInstanceUID): data_set_bytes(stored_path(archive, ds)) for ds in archive.studies[STUDY]}
    assert got == sent


def test_a_receiver_that_takes_only_implicit_vr_gets_converted_copies(archive: Archive, scp: int,
                                                                      receivers: dict[str, int],
                                                                      tmp_path: Path) -> None:
    receiver = storescp(receivers["IMPLICIT"], "IMPLICIT", tmp_path / "in", "+xi")
    try:
        (status, _identifier) = move(scp, "IMPLICIT", STUDY)
    finally:
        receiver.terminate()
        receiver.wait(timeout=10)
    assert status.Status == 0x0000 and status.NumberOfCompletedSuboperations == 3
    got = {str(ds.SOPInstanceUID): ds for ds in (dcmread(p) for p in (tmp_path / "in").iterdir())}
    assert {str(ds.file_meta.TransferSyntaxUID) for ds in got.values()} == {ImplicitVRLittleEndian}
    for stored in archive.studies[STUDY]:
        assert stored.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert got[str(stored.SOPInstanceUID)].PixelData == stored.PixelData
        assert got[str(stored.SOPInstanceUID)].PatientName == stored.PatientName


def test_a_file_gone_from_the_store_fails_its_own_suboperation(archive: Archive, scp: int,
                                                               receivers: dict[str, int], tmp_path: Path) -> None:
    gone, kept = archive.studies[GONE_STUDY]
    receiver = storescp(receivers["STORESCP"], "STORESCP", tmp_path / "in")
    try:
        (status, identifier) = move(scp, "STORESCP", GONE_STUDY)
    finally:
        receiver.terminate()
        receiver.wait(timeout=10)
    assert status.Status == 0xB000  # warning: some sub-operations failed
    assert (status.NumberOfCompletedSuboperations, status.NumberOfFailedSuboperations) == (1, 1)
    assert identifier is not None and identifier.FailedSOPInstanceUIDList == gone.SOPInstanceUID
    assert [str(dcmread(p).SOPInstanceUID) for p in (tmp_path / "in").iterdir()] == [str(kept.SOPInstanceUID)]


@pytest.mark.parametrize("level", [logging.WARNING, logging.DEBUG], ids=["warning", "debug"])
def test_narration_is_taken_off_only_when_nobody_would_read_it(level: int) -> None:
    narrated = (evt.EVT_DIMSE_SENT, evt.EVT_DIMSE_RECV, evt.EVT_PDU_SENT, evt.EVT_PDU_RECV)
    pynetdicom_log = logging.getLogger("pynetdicom")
    before = pynetdicom_log.level
    pynetdicom_log.setLevel(level)
    try:
        assoc = Association(AE(), "requestor")
        assert all(assoc.get_handlers(event) for event in narrated)  # pynetdicom binds them by default
        skip_unlogged_narration(assoc)
        assert [bool(assoc.get_handlers(event)) for event in narrated] == [level == logging.DEBUG] * 4
    finally:
        pynetdicom_log.setLevel(before)


def test_findscu_gets_every_pending_response_query_after_query(archive: Archive, scp: int, tmp_path: Path) -> None:
    """Consecutive C-FINDs (each its own message ID and association) get their own, complete answers
    (with the adjustments, their pending responses' command sets are built once per C-FIND)."""
    expected = {str(ds.SOPInstanceUID) for ds in archive.studies[STUDY]}
    for attempt in range(2):
        out = tmp_path / f"find{attempt}"
        out.mkdir()
        run = subprocess.run([dcmtk("findscu"), "-S", "-aec", AET, "-X", "-od", str(out),
                              "-k", "QueryRetrieveLevel=IMAGE", "-k", f"StudyInstanceUID={STUDY}",
                              "-k", "SOPInstanceUID", "-k", "InstanceNumber", "127.0.0.1", str(scp)],
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stdout + run.stderr
        assert {str(dcmread(p).SOPInstanceUID) for p in out.iterdir()} == expected
