"""The worker and the exporter in this process, with pynetdicom receivers on loopback."""

from __future__ import annotations

import io
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    EnhancedSRStorage,
    GrayscaleSoftcopyPresentationStateStorage,
    KeyObjectSelectionDocumentStorage,
)
from sqlalchemy import select, update

from pacs_node.config import Settings
from pacs_node.work.export import Exporter
from pacs_node.ops.context import ServerContext
from pipelines.interface import FakePipeline
from storage.repository import add_instance
from storage.schema import Instance, Job, JobKind
from tests.pacs_node.helpers import make_cr
from tests.support import free_port

pytest.importorskip("pacs_node.results", reason="the result builders (pacs_node.results) are not installed")
from pacs_node.work.worker import Worker  # noqa: E402 (needs pacs_node.results)


class Receiver:
    """A pynetdicom C-STORE SCP that, like many PACSs, knows Comprehensive SR but not its 3D variant."""

    def __init__(self) -> None:
        self.port = free_port()
        self.received: list[pydicom.Dataset] = []
        self.status = 0x0000  # what it answers to every C-STORE
        self.status_by_class: dict[str, int] = {}  # ... unless the SOP class has its own answer here
        self.associations = 0
        ae = AE(ae_title="OLDPACS")
        for sop_class in (ComprehensiveSRStorage, EnhancedSRStorage, KeyObjectSelectionDocumentStorage,
                          GrayscaleSoftcopyPresentationStateStorage):
            ae.add_supported_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._on_store),
                                                    (evt.EVT_ACCEPTED, self._on_accepted)])

    def _on_store(self, event: evt.Event) -> int:
        status = self.status_by_class.get(event.request.AffectedSOPClassUID, self.status)
        if status == 0x0000:
            self.received.append(event.dataset)
        return status

    def _on_accepted(self, event: evt.Event) -> None:
        self.associations += 1

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    scp = Receiver()
    yield scp
    scp.stop()


@pytest.fixture
def runtime(tmp_path: Path, receiver: Receiver, database_url: str) -> Iterator[ServerContext]:
    settings = Settings(
        node={"data_dir": tmp_path / "var"},
        database={"url": database_url},
        store={"min_free_bytes": 0},
        pipeline={"bundle": "fake", "max_batch_latency_s": 0},
        peers={"oldpacs": {"ae_title": "OLDPACS", "host": "127.0.0.1", "port": receiver.port},
               "down": {"ae_title": "DOWN", "host": "127.0.0.1", "port": free_port()}},
        routing={"always": ["down", "oldpacs"]},
        export={"timeout_s": 5, "concurrency": 2},
        worker={"poll_interval_s": 0.05},
        studies={"settle_s": 0},
    )
    rt = ServerContext.open(settings)
    yield rt
    rt.close()


def receive(rt: ServerContext, ds: pydicom.Dataset) -> None:
    """File ``ds`` as the listener would: store, Instance row, analyse job."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    relpath = rt.store.relpath_for(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    rt.store.write_bytes(relpath, buffer.getvalue())
    with rt.write_session() as session, session.begin():
        add_instance(session, sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID,
                     transfer_syntax_uid=ExplicitVRLittleEndian, study_instance_uid=ds.StudyInstanceUID,
                     series_instance_uid=ds.SeriesInstanceUID, path=relpath, size_bytes=len(buffer.getvalue()),
                     origin="received", disposition="queued", calling_ae="MODALITY", modality="CR")
        rt.queue.enqueue(session, kind=JobKind.ANALYSE, sop_instance_uid=ds.SOPInstanceUID,
                         dedupe_key=f"analyse:{ds.SOPInstanceUID}", max_attempts=3)


def jobs(rt: ServerContext, kind: str) -> list[Job]:
    with rt.read_session() as session:
        return list(session.scalars(select(Job).where(Job.kind == kind).order_by(Job.id)))


def run_worker_once(rt: ServerContext) -> None:
    worker = Worker(rt.settings, rt, FakePipeline(), worker_id="test-worker")
    claimed = worker.claim_batch(threading.Event())
    assert claimed
    worker.process(claimed)


def test_results_are_routed_and_a_dead_peer_blocks_no_one(runtime: ServerContext, receiver: Receiver,
                                                          tmp_path: Path) -> None:
    source = make_cr(tmp_path / "cr.dcm")
    receive(runtime, source)
    run_worker_once(runtime)
    assert [j.state for j in jobs(runtime, "analyse")] == ["done"]

    with runtime.read_session() as session:
        results = session.scalars(select(Instance).where(Instance.origin == "result")).all()
    assert results and all(r.source_sop_instance_uid == source.SOPInstanceUID for r in results)
    exports = jobs(runtime, "export")
    assert sorted((e.sop_instance_uid, e.destination) for e in exports) == sorted(
        (r.sop_instance_uid, peer) for r in results for peer in ("down", "oldpacs"))

    exporter = Exporter(runtime.settings, runtime, worker_id="test-export")
    exporter.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            states = {(e.destination, e.state) for e in jobs(runtime, "export")}
            if all(state == "done" for dest, state in states if dest == "oldpacs") and \
                    ("down", "queued") not in states and ("down", "running") not in states:
                break
            time.sleep(0.2)
    finally:
        exporter.stop()

    by_dest: dict[str, list[Job]] = {}
    for e in jobs(runtime, "export"):
        by_dest.setdefault(e.destination, []).append(e)
    assert {e.state for e in by_dest["oldpacs"]} == {"done"}
    # the dead peer's jobs are waiting for their retry (backoff), with the reason
    assert {e.state for e in by_dest["down"]} == {"failed"}
    assert all("DOWN@127.0.0.1" in e.last_error for e in by_dest["down"])

    # the receiver refused Comprehensive 3D SR in negotiation and got the Comprehensive SR copy
    classes = [ds.SOPClassUID for ds in receiver.received]
    assert Comprehensive3DSRStorage not in classes
    with runtime.read_session() as session:
        made_3d = session.scalar(select(Instance.id).where(Instance.sop_class_uid == Comprehensive3DSRStorage))
    if made_3d is not None:
        assert ComprehensiveSRStorage in classes
    assert len(receiver.received) == len(by_dest["oldpacs"])


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # the database plays no part here
def test_an_image_the_pipeline_cannot_read_is_dead_with_the_reason(runtime: ServerContext, tmp_path: Path) -> None:
    source = make_cr(tmp_path / "cr.dcm")
    del source.PixelData  # the fake pipeline, like the real one, refuses an image without pixels
    receive(runtime, source)
    run_worker_once(runtime)
    (job,) = jobs(runtime, "analyse")
    assert job.state == "dead" and job.attempts == 1  # not retryable: the same bytes fail the same way
    assert "pixel data" in job.last_error
    assert jobs(runtime, "export") == []


def test_a_job_run_twice_produces_its_results_once(runtime: ServerContext, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker that died after storing results but before completing its job: the job comes back
    (lease expiry, simulated here) and the rerun adds nothing."""
    source = make_cr(tmp_path / "cr.dcm")
    receive(runtime, source)
    monkeypatch.setattr(runtime.queue, "complete", lambda *a, **k: False)  # "dies" before completing
    run_worker_once(runtime)
    monkeypatch.undo()
    with runtime.read_session() as session:
        before = sorted(session.scalars(select(Instance.sop_instance_uid)).all())
    exports_before = len(jobs(runtime, "export"))
    with runtime.write_session() as session, session.begin():
        session.execute(update(Job).where(Job.kind == "analyse").values(state="queued", lease_owner=None))
    run_worker_once(runtime)
    with runtime.read_session() as session:
        after = sorted(session.scalars(select(Instance.sop_instance_uid)).all())
    assert len(before) > 1 and after == before
    assert len(jobs(runtime, "export")) == exports_before
    assert [j.state for j in jobs(runtime, "analyse")] == ["done"]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # the database plays no part here
def test_batches_fill_up_to_the_batch_size_while_the_latency_cap_lasts(runtime: ServerContext, tmp_path: Path) -> None:
    settings = runtime.settings.model_copy(update={"pipeline": runtime.settings.pipeline.model_copy(
        update={"batch_size": 2, "max_batch_latency_s": 30.0})})
    worker = Worker(settings, runtime, FakePipeline(), worker_id="batcher")
    receive(runtime, make_cr(tmp_path / "a.dcm", seed=1))
    # a second image arrives while the first waits for company: both run in one batch
    later = threading.Timer(0.2, receive, args=(runtime, make_cr(tmp_path / "b.dcm", seed=2)))
    later.start()
    batch = worker.claim_batch(threading.Event())
    later.join()
    assert len(batch) == 2
    # a full batch never waits; the rest stays queued for the next one
    for i in range(3):
        receive(runtime, make_cr(tmp_path / f"c{i}.dcm", seed=10 + i))
    assert len(worker.claim_batch(threading.Event())) == 2
    assert [j.state for j in jobs(runtime, "analyse")].count("queued") == 1


class _BreaksOnOneImage(FakePipeline):
    """A model that crashes (not a PipelineError) on one particular image, taking its batch with it."""

    def __init__(self, poison_uid: str) -> None:
        self.poison_uid = poison_uid

    def analyse(self, datasets):  # noqa: ANN001, ANN201
        if any(ds.SOPInstanceUID == self.poison_uid for ds in datasets):
            raise RuntimeError("CUDA error: device-side assert triggered")
        return super().analyse(datasets)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # the database plays no part here
def test_one_bad_image_does_not_fail_its_batch(runtime: ServerContext, tmp_path: Path) -> None:
    images = [make_cr(tmp_path / f"{i}.dcm", seed=i) for i in range(3)]
    for ds in images:
        receive(runtime, ds)
    settings = runtime.settings.model_copy(update={"pipeline": runtime.settings.pipeline.model_copy(
        update={"batch_size": 3})})
    worker = Worker(settings, runtime, _BreaksOnOneImage(images[1].SOPInstanceUID), worker_id="w")
    batch = worker.claim_batch(threading.Event())
    assert len(batch) == 3
    worker.process(batch)
    states = {j.sop_instance_uid: (j.state, j.last_error) for j in jobs(runtime, "analyse")}
    assert states[images[0].SOPInstanceUID][0] == states[images[2].SOPInstanceUID][0] == "done"
    state, error = states[images[1].SOPInstanceUID]
    assert state == "failed" and "device-side assert" in error  # retryable: it may be transient


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # the database plays no part here
def test_an_images_results_share_one_association_and_each_is_settled_on_its_own_status(
        runtime: ServerContext, receiver: Receiver, tmp_path: Path) -> None:
    receive(runtime, make_cr(tmp_path / "cr.dcm"))
    run_worker_once(runtime)
    receiver.status_by_class[KeyObjectSelectionDocumentStorage] = 0xA700  # out of space for this one only
    claimed = runtime.queue.claim("x", [JobKind.EXPORT], limit=100)
    mine = [j for j in claimed if j.destination == "oldpacs"]
    assert len(mine) >= 3
    Exporter(runtime.settings, runtime, worker_id="x").run_jobs(mine, "x")
    assert receiver.associations == 1
    with runtime.read_session() as session:
        classes = dict(session.execute(select(Instance.sop_instance_uid, Instance.sop_class_uid)).all())
    states = {classes[j.sop_instance_uid]: runtime.queue.get(j.id) for j in mine}
    assert states.pop(KeyObjectSelectionDocumentStorage).state == "failed"
    assert {record.state for record in states.values()} == {"done"}
    assert len(receiver.received) == len(mine) - 1


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # the database plays no part here
def test_a_peer_that_hangs_does_not_hold_up_the_others_in_the_same_batch(
        runtime: ServerContext, receiver: Receiver, tmp_path: Path) -> None:
    receive(runtime, make_cr(tmp_path / "cr.dcm"))
    run_worker_once(runtime)
    with socket.socket() as hanging:  # "down" now accepts connections and never answers them
        hanging.bind(("127.0.0.1", runtime.settings.peers["down"].port))
        hanging.listen(16)
        claimed = runtime.queue.claim("x", [JobKind.EXPORT], limit=100)
        assert claimed[0].destination == "down"  # the hanging peer's share comes first in the batch
        Exporter(runtime.settings, runtime, worker_id="x").run_jobs(claimed, "x")
    records = [runtime.queue.get(j.id) for j in claimed]
    sent = [r for r in records if r.destination == "oldpacs"]
    hung = [r for r in records if r.destination == "down"]
    assert {r.state for r in sent} == {"done"} and {r.state for r in hung} == {"failed"}
    assert max(r.finished_at for r in sent) < min(r.updated_at for r in hung)  # sent while "down" still hung


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # the database plays no part here
def test_an_unreadable_result_file_fails_alone_and_its_batch_mates_are_sent(
        runtime: ServerContext, receiver: Receiver, tmp_path: Path) -> None:
    receive(runtime, make_cr(tmp_path / "cr.dcm"))
    run_worker_once(runtime)
    mine = [j for j in runtime.queue.claim("x", [JobKind.EXPORT], limit=100) if j.destination == "oldpacs"]
    with runtime.read_session() as session:
        path = session.scalar(select(Instance.path).where(Instance.sop_instance_uid == mine[0].sop_instance_uid))
    runtime.store.path(path).write_bytes(b"not DICOM at all")  # a bad sector, a careless administrator
    Exporter(runtime.settings, runtime, worker_id="x").run_jobs(mine, "x")
    first, *rest = (runtime.queue.get(j.id) for j in mine)
    assert first.state == "dead" and "not readable DICOM" in first.last_error
    assert {r.state for r in rest} == {"done"} and len(receiver.received) == len(rest)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # the database plays no part here
def test_a_refused_c_store_is_retried_later(runtime: ServerContext, receiver: Receiver, tmp_path: Path) -> None:
    receive(runtime, make_cr(tmp_path / "cr.dcm"))
    run_worker_once(runtime)
    receiver.status = 0xA700  # the PACS is out of space
    exporter = Exporter(runtime.settings, runtime, worker_id="x")
    claimed = runtime.queue.claim("x", [JobKind.EXPORT], limit=100)
    job = next(j for j in claimed if j.destination == "oldpacs")
    exporter.run_jobs([job], "x")
    record = runtime.queue.get(job.id)
    assert record.state == "failed" and "0xA700" in record.last_error and record.not_before > record.updated_at
    assert receiver.received == []


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # the database plays no part here
def test_a_result_the_builders_refuse_fails_at_once_a_full_disk_is_retried(runtime: ServerContext, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The same image builds the same way every time: a builder's own error is not worth 5 attempts;
    an OSError while storing the results (a full disk) is."""
    import pacs_node.results.builder_pool as builder_pool

    def refuse(*args, **kwargs):  # noqa: ANN002, ANN003
        raise ValueError("For grayscale presentation states, all referenced images must have a single sample")

    monkeypatch.setattr(builder_pool, "build_study_objects", refuse)
    source = make_cr(tmp_path / "cr.dcm")
    receive(runtime, source)
    run_worker_once(runtime)
    (job,) = jobs(runtime, "analyse")
    assert (job.state, job.attempts) == ("dead", 1)
    monkeypatch.undo()

    def full(*args, **kwargs):  # noqa: ANN002, ANN003
        raise OSError(28, "No space left on device")

    second = make_cr(tmp_path / "cr2.dcm", seed=2)
    receive(runtime, second)
    monkeypatch.setattr(runtime.store, "write_many", full)
    run_worker_once(runtime)
    job = jobs(runtime, "analyse")[-1]
    assert job.state == "failed" and job.attempts == 1  # will be tried again after its backoff
