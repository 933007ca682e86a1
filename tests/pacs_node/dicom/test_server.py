"""The listener in this process, spoken to by DCMTK and pynetdicom peers over loopback."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import _config
from pynetdicom.sop_class import ComputedRadiographyImageStorage, Verification
from sqlalchemy import func, select

from pacs_node.config import Settings
from pacs_node.dicom.server import Listener
from pacs_node.ops.context import ServerContext
from pacs_node.work.ingest import Ingestor
from storage.schema import Instance, Job
from storage.store import StoreFullError
from storage.studies import instance_set_hash
from tests.pacs_node.helpers import echoscu, make_cr, requestor, storescu
from tests.support import dcmtk, free_port


def _settings(tmp_path: Path, database_url: str = "", **sections: dict) -> Settings:
    return Settings(
        node={"ae_title": "PACSNODE", "port": free_port(), "bind": "127.0.0.1", "data_dir": tmp_path / "var"},
        database={"url": database_url},
        allowed_callers=[{"ae_title": "MODALITY"}, {"ae_title": "PYSCU", "host": "127.0.0.1"},
                         {"ae_title": "ELSEWHERE", "host": "10.9.9.9"}],
        store={"min_free_bytes": 0},
        pipeline={"bundle": "fake"},
        studies={"settle_s": 0},
        **sections,
    )


@pytest.fixture
def node(tmp_path: Path, database_url: str) -> Iterator[tuple[Settings, ServerContext]]:
    settings = _settings(tmp_path, database_url)
    runtime = ServerContext.open(settings)
    listener = Listener(settings, runtime)
    listener.start()
    yield settings, runtime
    listener.stop()
    runtime.close()


def _counts(runtime: ServerContext) -> tuple[int, int]:
    with runtime.read_session() as session:
        return (session.scalar(select(func.count()).select_from(Instance)),
                session.scalar(select(func.count()).select_from(Job)))


def _send_with_pynetdicom(port: int, path: Path, sop_class: str = ComputedRadiographyImageStorage) -> int:
    ae = requestor("PYSCU")
    ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSNODE")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(path)
        assert assoc.send_c_echo().Status == 0  # the association survives whatever the store did
        return int(status.Status)
    finally:
        assoc.release()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # the database plays no part here
def test_echo_and_allow_list(node: tuple[Settings, ServerContext]) -> None:
    settings, _ = node
    dcmtk("echoscu")
    assert echoscu(settings.node.port, calling="MODALITY").returncode == 0
    refused = echoscu(settings.node.port, calling="INTRUDER")
    assert refused.returncode != 0
    assert "Rejected" in refused.stdout + refused.stderr
    # an allowed AE title calling from the wrong host is refused too
    assert echoscu(settings.node.port, calling="ELSEWHERE").returncode != 0


def test_store_j2k_as_received_once_with_one_job(node: tuple[Settings, ServerContext], real_dicom_dir: Path) -> None:
    settings, runtime = node
    source = real_dicom_dir / "RG1_J2KR.dcm"
    for _ in range(2):  # the second send is a duplicate: acknowledged, stored once, no second job
        sent = storescu(settings.node.port, [source], "-xv")
        assert sent.returncode == 0, sent.stderr
    original = pydicom.dcmread(source)
    with runtime.read_session() as session:
        rows = session.scalars(select(Instance)).all()
        jobs = session.scalars(select(Job)).all()
    assert len(rows) == 1 and len(jobs) == 1
    row, job = rows[0], jobs[0]
    assert row.sop_instance_uid == original.SOPInstanceUID
    assert row.transfer_syntax_uid == original.file_meta.TransferSyntaxUID
    assert (row.disposition, row.calling_ae) == ("queued", "MODALITY")
    study_job = f"analyse:study:{original.StudyInstanceUID}:{instance_set_hash([original.SOPInstanceUID])}"
    assert (job.kind, job.state, job.dedupe_key) == ("analyse", "queued", study_job)
    stored = pydicom.dcmread(runtime.store.path(row.path))
    assert stored.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID  # not transcoded
    assert stored.PixelData == original.PixelData
    assert os.listdir(runtime.incoming_dir) == []  # no temp file left behind


def test_non_chest_is_acknowledged_and_recorded_not_processed(node: tuple[Settings, ServerContext], tmp_path: Path) -> None:
    settings, runtime = node
    hand = tmp_path / "hand.dcm"
    ds = make_cr(hand, body_part="HAND")
    assert _send_with_pynetdicom(settings.node.port, hand) == 0
    with runtime.read_session() as session:
        row = session.scalars(select(Instance).where(Instance.sop_instance_uid == ds.SOPInstanceUID)).one()
    assert row.disposition == "not_processed" and "HAND" in row.reason
    assert runtime.store.path(row.path).is_file()
    assert _counts(runtime) == (1, 0)


def test_discard_policy_keeps_only_the_record(tmp_path: Path) -> None:
    settings = _settings(tmp_path, policy={"non_chest": "discard"})
    runtime = ServerContext.open(settings)
    listener = Listener(settings, runtime)
    listener.start()
    try:
        hand = tmp_path / "hand.dcm"
        make_cr(hand, body_part="KNEE")
        assert _send_with_pynetdicom(settings.node.port, hand) == 0
        with runtime.read_session() as session:
            row = session.scalars(select(Instance)).one()
        assert row.path == "" and "discarded" in row.reason
        assert list(runtime.store.iter_files()) == []
    finally:
        listener.stop()
        runtime.close()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # the database plays no part here
def test_unparseable_dataset_fails_and_the_listener_stays_up(node: tuple[Settings, ServerContext], tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    settings, runtime = node
    garbage = tmp_path / "garbage.dcm"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    with open(garbage, "wb") as f:
        f.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(f, meta)
        f.write(os.urandom(4096))
    # send the raw bytes as they are (pynetdicom would otherwise refuse to encode a broken dataset)
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    status = _send_with_pynetdicom(settings.node.port, garbage)
    assert 0xC000 <= status <= 0xCFFF
    assert _counts(runtime) == (0, 0)
    assert os.listdir(runtime.incoming_dir) == []
    dcmtk("echoscu")
    assert echoscu(settings.node.port).returncode == 0


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # the database plays no part here
def test_an_unexpected_error_while_recording_fails_the_store_and_leaves_no_file(
        node: tuple[Settings, ServerContext], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings, runtime = node
    image = tmp_path / "cr.dcm"
    make_cr(image)

    # A bug cannot be caused on demand: the study's analysis raises what no handler expects.
    def broken(*args: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(Ingestor, "_analysis", broken)
    assert _send_with_pynetdicom(settings.node.port, image) != 0
    assert _counts(runtime) == (0, 0)
    assert list(runtime.store.iter_files()) == [] and os.listdir(runtime.incoming_dir) == []


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # the database plays no part here
def test_full_store_answers_a700_and_writes_nothing(node: tuple[Settings, ServerContext], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    settings, runtime = node
    image = tmp_path / "cr.dcm"
    make_cr(image)

    # ENOSPC in the middle of the commit cannot be caused on demand here; the store raises what it
    # raises on a full disk.
    def full(temp, relpath):  # noqa: ANN001
        runtime.store.discard(temp)
        raise StoreFullError(28, "instance store is full", relpath)

    monkeypatch.setattr(runtime.store, "begin_commit", full)
    assert _send_with_pynetdicom(settings.node.port, image) == 0xA700
    assert _counts(runtime) == (0, 0)
    assert list(runtime.store.iter_files()) == [] and os.listdir(runtime.incoming_dir) == []
    monkeypatch.undo()

    # the disk fills while the file's fsyncs run (in their threads, as the row's statements run): the
    # row is not committed and the file is not left at its name
    with mock.patch("storage.store.os.fsync", side_effect=OSError(28, "No space left on device")):
        assert _send_with_pynetdicom(settings.node.port, image) == 0xA700
    assert _counts(runtime) == (0, 0)
    assert list(runtime.store.iter_files()) == [] and os.listdir(runtime.incoming_dir) == []

    # below the free-space watermark the node refuses before writing anything
    monkeypatch.setattr(runtime.store, "min_free_bytes", runtime.store.free_bytes() + 10**12)
    assert _send_with_pynetdicom(settings.node.port, image) == 0xA700
    monkeypatch.setattr(runtime.store, "min_free_bytes", 0)
    assert _send_with_pynetdicom(settings.node.port, image) == 0  # space is back: accepted
    assert _counts(runtime) == (1, 1)


def test_nul_and_control_characters_are_stored_sanitised_once(node: tuple[Settings, ServerContext],
                                                              tmp_path: Path) -> None:
    """PostgreSQL refuses NUL in text: the row holds U+FFFD instead, the file the sender's bytes, and
    the sender is answered once, with success (before: 0xA700 for ever)."""
    settings, runtime = node
    path = tmp_path / "nul.dcm"
    ds = make_cr(path)
    ds.PatientName = "NUL\x00NAME"
    ds.PatientID = "ID\x01\x00"
    ds.StudyDescription = "Chest\x00\x7f PA"
    ds.save_as(path, enforce_file_format=True)
    assert _send_with_pynetdicom(settings.node.port, path) == 0x0000
    assert _send_with_pynetdicom(settings.node.port, path) == 0x0000  # a duplicate, acknowledged
    with runtime.read_session() as session:
        row = session.scalars(select(Instance)).one()
    assert (row.patient_name, row.patient_id, row.study_description) == (
        "NUL\ufffdNAME", "ID\ufffd", "Chest\ufffd\ufffd PA")
    assert "\x00" in str(pydicom.dcmread(runtime.store.path(row.path)).PatientName)
    assert _counts(runtime) == (1, 1)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_row_the_database_refuses_is_a_permanent_failure(node: tuple[Settings, ServerContext], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever else a database may refuse in a row (a fault the sanitising leaves no way to cause for
    real), the sender hears 0xC2xx, never the 0xA7xx that makes it retry for ever."""
    from sqlalchemy.exc import DataError

    from storage.receiving import ReceivedInstances

    def refuse(*args, **kwargs):  # noqa: ANN002, ANN003
        raise DataError("INSERT INTO instances ...", {}, ValueError("invalid byte sequence"))

    monkeypatch.setattr(ReceivedInstances, "record", refuse)
    make_cr(tmp_path / "image.dcm")
    status = _send_with_pynetdicom(node[0].node.port, tmp_path / "image.dcm")
    assert 0xC200 <= status <= 0xC2FF
    assert _counts(node[1]) == (0, 0)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_each_association_that_stored_is_logged_once_when_it_ends(node: tuple[Settings, ServerContext],
                                                                  tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """Stored instances are not logged one by one at INFO (a line each was a tenth of a tiny instance's
    CPU); the association's statuses are, in one line, when it ends."""
    make_cr(tmp_path / "image.dcm")
    with caplog.at_level(logging.INFO, logger="pacs_node"):
        assert _send_with_pynetdicom(node[0].node.port, tmp_path / "image.dcm") == 0
        assert _send_with_pynetdicom(node[0].node.port, tmp_path / "image.dcm") == 0  # a duplicate
        deadline = time.monotonic() + 10
        while sum("ended: C-STORE answered" in r.getMessage() for r in caplog.records) < 2:
            assert time.monotonic() < deadline, caplog.text
            time.sleep(0.02)
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO and r.name.startswith("pacs_node")]
    assert [line for line in lines if "ended" in line] == ["association from PYSCU at 127.0.0.1 ended: C-STORE "
                                                           "answered 0x0000 x 1"] * 2
    assert not [line for line in lines if "instance from" in line]
