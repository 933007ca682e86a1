"""How the worker reads a stored image: once, unless its row says it may be Deflated, which is bounded first."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian
from sqlalchemy import select

from pacs_node.config import Settings
from pacs_node.ops.context import ServerContext
from pipelines.interface import FakePipeline
from storage.repository import add_instance
from storage.schema import Job, JobKind, JobState, utcnow
from storage.studies import touch_study
from tests.pacs_node.helpers import make_cr

pytest.importorskip("pacs_node.results", reason="the result builders (pacs_node.results) are not installed")
from pacs_node.work import worker as worker_module  # noqa: E402 (needs pacs_node.results)
from pacs_node.work.worker import Worker  # noqa: E402


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[ServerContext]:
    settings = Settings(
        node={"data_dir": tmp_path / "var"},
        database={"url": f"sqlite:///{tmp_path / 'node.db'}"},
        store={"min_free_bytes": 0},
        pipeline={"bundle": "fake"},
        routing={"default": "none"},
        studies={"settle_s": 0},
        limits={"max_inflated_bytes": 1024 * 1024},
    )
    rt = ServerContext.open(settings)
    yield rt
    rt.close()


def _stored(rt: ServerContext, ds: pydicom.Dataset) -> None:
    """``ds`` filed in its own transfer syntax, with its row and its study's analysis job."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    relpath = rt.store.relpath_for(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    rt.store.write_bytes(relpath, buffer.getvalue())
    with rt.write_session() as session, session.begin():
        add_instance(session, sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID,
                     transfer_syntax_uid=ds.file_meta.TransferSyntaxUID, study_instance_uid=ds.StudyInstanceUID,
                     series_instance_uid=ds.SeriesInstanceUID, path=relpath, size_bytes=len(buffer.getvalue()),
                     origin="received", disposition="queued", calling_ae="MODALITY", modality="CR")
        touch_study(session, ds.StudyInstanceUID, utcnow(), utcnow())
        rt.queue.enqueue(session, kind=JobKind.ANALYSE, sop_instance_uid=ds.SOPInstanceUID,
                         dedupe_key=f"analyse:study:{ds.StudyInstanceUID}",
                         payload={"study_instance_uid": ds.StudyInstanceUID}, max_attempts=3)


def _analyse(rt: ServerContext, monkeypatch: pytest.MonkeyPatch) -> tuple[Job, int]:
    """One batch through the worker; its job, and how often the File Meta Information was read first."""
    checks: list[Path] = []
    real = worker_module.check_inflated_size

    def counted(path: Path, limits: object) -> None:
        checks.append(path)
        real(path, limits)  # type: ignore[arg-type]

    monkeypatch.setattr(worker_module, "check_inflated_size", counted)
    worker = Worker(rt.settings, rt, FakePipeline(), worker_id="w")
    worker.process(rt.queue.claim("w", [JobKind.ANALYSE]))
    with rt.read_session() as session:
        return session.scalars(select(Job).where(Job.kind == JobKind.ANALYSE.value)).one(), len(checks)


def test_an_image_stored_uncompressed_is_opened_and_parsed_once(runtime: ServerContext, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    ds = make_cr(tmp_path / "cr.dcm", rows=64, cols=48)
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    _stored(runtime, ds)
    job, checks = _analyse(runtime, monkeypatch)
    assert job.state == JobState.DONE.value
    assert checks == 0


def test_an_image_stored_deflated_is_bounded_before_pydicom_inflates_it(runtime: ServerContext, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    ds = make_cr(tmp_path / "cr.dcm", rows=1024, cols=1024)  # 2 MiB of pixels, inflated
    ds.PixelData = np.zeros((1024, 1024), np.uint16).tobytes()  # which deflate to almost nothing
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    _stored(runtime, ds)
    job, checks = _analyse(runtime, monkeypatch)
    assert checks == 1
    assert job.state == JobState.DEAD.value and "not readable DICOM" in (job.last_error or "")
