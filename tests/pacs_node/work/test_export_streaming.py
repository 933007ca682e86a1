"""The exporter against a real DCMTK ``storescp``: stored results go as they are on disk, and one
association carries consecutive batches."""

from __future__ import annotations

import io
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom.sop_class import EnhancedSRStorage

from bench.common import stop_process, wait_for_port
from pacs_node.config import Settings
from pacs_node.dicom.adjustments import apply_pynetdicom_adjustments, undo_pynetdicom_adjustments
from pacs_node.ops.context import ServerContext
from pacs_node.work.export import Exporter
from storage.repository import add_instance
from storage.schema import JobKind
from tests.support import dcmtk, free_port

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # the database plays no part


class VerboseStoreSCP:
    """DCMTK ``storescp -v`` writing exactly the bytes it receives (``+B``) and logging its associations."""

    def __init__(self, directory: Path, *options: str, port: int | None = None) -> None:
        self.directory, self.port, self.log = directory, port or free_port(), directory.with_suffix(".log")
        directory.mkdir(parents=True)
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([dcmtk("storescp"), "-v", "+B", "-aet", "RECEIVER", "-od", str(directory),
                                          *options, str(self.port)], stdout=log, stderr=subprocess.STDOUT)
        wait_for_port(self.port, timeout=20, proc=self.proc)

    def count(self, line: str) -> int:
        return self.log.read_text(errors="replace").count(line)

    def received(self) -> dict[str, Path]:
        """SOP Instance UID -> the file storescp wrote."""
        return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p
                for p in self.directory.iterdir() if p.is_file()}

    def stop(self) -> None:
        stop_process(self.proc, timeout=5)


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[VerboseStoreSCP]:
    scp = VerboseStoreSCP(tmp_path / "received")
    yield scp
    scp.stop()


def runtime_for(tmp_path: Path, database_url: str, port: int, keep_open_s: float = 2.0) -> ServerContext:
    return ServerContext.open(Settings(
        node={"data_dir": tmp_path / "var"}, database={"url": database_url}, store={"min_free_bytes": 0},
        peers={"pacs": {"ae_title": "RECEIVER", "host": "127.0.0.1", "port": port}},
        export={"timeout_s": 10, "keep_open_s": keep_open_s},
    ))


@pytest.fixture
def runtime(tmp_path: Path, database_url: str, storescp: VerboseStoreSCP) -> Iterator[ServerContext]:
    rt = runtime_for(tmp_path, database_url, storescp.port)
    yield rt
    rt.close()


def a_result(seed: int, syntax: str = ExplicitVRLittleEndian) -> bytes:
    """An SR file whose Series Description is encoded with VR UN, as a peer may have sent it: pydicom
    reads it as LO and would write it back as LO, so only a file sent as it is arrives with it."""
    ds = pydicom.Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = EnhancedSRStorage, generate_uid(entropy_srcs=[f"result {seed}"])
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.ValueType, ds.CompletionFlag, ds.VerificationFlag = "SR", "CONTAINER", "COMPLETE", "UNVERIFIED"
    ds.SeriesDescription = "AI RESULT"
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True, implicit_vr=syntax == ImplicitVRLittleEndian)
    if syntax != ExplicitVRLittleEndian:
        return buffer.getvalue()
    as_lo = b"\x08\x00\x3e\x10LO\x0a\x00AI RESULT "
    assert buffer.getvalue().count(as_lo) == 1
    return buffer.getvalue().replace(as_lo, b"\x08\x00\x3e\x10UN\0\0\x0a\0\0\0AI RESULT ")


def store_results(rt: ServerContext, files: list[bytes]) -> list[str]:
    """File ``files`` as the worker files results (store, Instance row, an export job to ``pacs``);
    their SOP Instance UIDs."""
    uids = []
    with rt.write_session() as session, session.begin():
        for data in files:
            ds = pydicom.dcmread(io.BytesIO(data))
            relpath = rt.store.relpath_for(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
            rt.store.write_bytes(relpath, data)
            add_instance(session, sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID,
                         transfer_syntax_uid=ds.file_meta.TransferSyntaxUID, study_instance_uid=ds.StudyInstanceUID,
                         series_instance_uid=ds.SeriesInstanceUID, path=relpath, size_bytes=len(data),
                         origin="result", disposition="result", modality="SR")
            rt.queue.enqueue(session, kind=JobKind.EXPORT, sop_instance_uid=ds.SOPInstanceUID, destination="pacs",
                             dedupe_key=f"export:{ds.SOPInstanceUID}:pacs")
            uids.append(str(ds.SOPInstanceUID))
    return uids


def export_batch(rt: ServerContext, exporter: Exporter, files: list[bytes]) -> list[str]:
    """Store ``files`` as results and export them as one claimed batch; every job is done."""
    uids = store_results(rt, files)
    claimed = rt.queue.claim("x", [JobKind.EXPORT], limit=100)
    assert sorted(j.sop_instance_uid for j in claimed) == sorted(uids)
    exporter.run_jobs(claimed, "x")
    assert {rt.queue.get(j.id).state for j in claimed} == {"done"}
    return uids


def dataset_bytes(data: bytes) -> bytes:
    """A DICOM file's bytes after its File Meta Information (preamble, ``DICM``, then the group length
    element, whose value says how much of group 2 follows it)."""
    assert data[128:132] == b"DICM" and data[132:138] == b"\2\0\0\0UL"
    return data[144 + int.from_bytes(data[140:144], "little"):]


@pytest.fixture
def adjusted() -> Iterator[None]:
    """pynetdicom as the exporter threads see it (:meth:`Exporter.start` applies the adjustments)."""
    apply_pynetdicom_adjustments()
    yield
    undo_pynetdicom_adjustments()


def test_stored_results_are_sent_as_they_are_on_disk(runtime: ServerContext, storescp: VerboseStoreSCP) -> None:
    exporter = Exporter(runtime.settings, runtime, worker_id="x")
    exporter.start()  # as in serve: the exporter streams stored files whether or not a listener runs
    try:
        files = [a_result(i) for i in range(3)]
        uids = store_results(runtime, files)
        runtime.doorbell(JobKind.EXPORT).ring()
        deadline = time.monotonic() + 30
        while len(storescp.received()) < len(files) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        exporter.stop()
    received = storescp.received()
    for uid, data in zip(uids, files, strict=True):
        arrived = dataset_bytes(received[uid].read_bytes())
        assert arrived == dataset_bytes(data)
        assert b"\x08\x00\x3e\x10UN" in arrived  # the UN element as stored, not re-encoded as LO


@pytest.mark.usefixtures("adjusted")
def test_a_peer_that_refuses_the_stored_syntax_gets_one_it_accepts(tmp_path: Path, database_url: str) -> None:
    implicit_only = VerboseStoreSCP(tmp_path / "implicit", "+xi")
    rt = runtime_for(tmp_path, database_url, implicit_only.port)
    exporter = Exporter(rt.settings, rt, worker_id="x")
    try:
        (uid,) = export_batch(rt, exporter, [a_result(1, ExplicitVRLittleEndian)])
    finally:
        exporter.associations.close_all()
        rt.close()
        implicit_only.stop()
    got = pydicom.dcmread(implicit_only.received()[uid])
    assert got.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    assert got.SeriesDescription == "AI RESULT"  # decoded and encoded again, as before streaming


@pytest.mark.usefixtures("adjusted")
def test_one_association_carries_consecutive_batches_and_is_released_when_idle(
        tmp_path: Path, database_url: str, storescp: VerboseStoreSCP) -> None:
    rt = runtime_for(tmp_path, database_url, storescp.port, keep_open_s=0.5)
    exporter = Exporter(rt.settings, rt, worker_id="x")
    try:
        for batch in range(3):
            export_batch(rt, exporter, [a_result(10 * batch + i) for i in range(2)])
        assert storescp.count("Association Acknowledged") == 1
        assert storescp.count("Association Release") == 0
        deadline = time.monotonic() + 10  # released after keep_open_s without work
        while storescp.count("Association Release") == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert storescp.count("Association Release") == 1
        export_batch(rt, exporter, [a_result(100)])  # work again: a new association
        assert storescp.count("Association Acknowledged") == 2
    finally:
        exporter.associations.close_all()  # what Exporter.stop does with the one kept open
        rt.close()
    assert storescp.count("Association Release") == 2
    assert len(storescp.received()) == 7


@pytest.mark.usefixtures("adjusted")
def test_a_kept_association_the_peer_dropped_is_replaced_without_failing_a_job(
        tmp_path: Path, database_url: str) -> None:
    first = VerboseStoreSCP(tmp_path / "first")
    rt = runtime_for(tmp_path, database_url, first.port, keep_open_s=4.0)
    exporter = Exporter(rt.settings, rt, worker_id="x")
    try:
        export_batch(rt, exporter, [a_result(1)])
        first.stop()  # the peer restarts with our association open
        second = VerboseStoreSCP(tmp_path / "second", port=first.port)
        try:
            export_batch(rt, exporter, [a_result(2), a_result(3)])  # every job done: see export_batch
        finally:
            second.stop()
        assert second.count("Association Acknowledged") == 1 and len(second.received()) == 2
    finally:
        exporter.associations.close_all()
        rt.close()
