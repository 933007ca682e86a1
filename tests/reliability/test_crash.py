"""Crash safety of the analysis path, in process, on SQLite and PostgreSQL: a worker that dies after
storing its results (but before completing its job) leaves a lease that expires; the job comes back, and
the second run makes the *same* result objects once, with one export job each. A decompression bomb is
refused before the pipeline decodes a pixel."""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from pathlib import Path

import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless
from sqlalchemy import func, select, update

from pacs_node.config import Settings
from pacs_node.work.ingest import Caller, Ingestor
from pacs_node.ops.context import ServerContext
from pacs_node.work.worker import Worker, _Result
from pipelines.interface import FakePipeline, ImageResult, PipelineError
from storage.schema import Instance, Job, JobKind, JobState
from tests.pacs_node.helpers import make_cr
from tests.storage.conftest import db_url, pg_server, pg_url, sqlite_db  # noqa: F401 (fixtures)


@pytest.fixture
def runtime(tmp_path: Path, db_url: str) -> Iterator[tuple[Settings, ServerContext]]:  # noqa: F811
    settings = Settings(
        node={"data_dir": tmp_path / "var"}, database={"url": db_url}, store={"min_free_bytes": 0},
        pipeline={"bundle": "fake"}, worker={"lease_seconds": 5}, studies={"settle_s": 0},
        peers={"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 104}}, routing={"always": ["pacs"]},
    )
    rt = ServerContext.open(settings)
    yield settings, rt
    rt.close()


def _ingest(settings: Settings, rt: ServerContext, path: Path) -> str:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    incoming = rt.incoming_dir / "tmp-test.dcm"
    incoming.write_bytes(path.read_bytes())
    assert Ingestor(settings, rt).ingest(incoming, str(ds.SOPInstanceUID), Caller("MODALITY", "127.0.0.1")) == 0
    return str(ds.SOPInstanceUID)


def _expire_leases(rt: ServerContext) -> None:
    """What the clock does to a dead worker's lease, without waiting for it."""
    with rt.write_session() as session, session.begin():
        session.execute(update(Job).where(Job.state == JobState.RUNNING.value)
                        .values(lease_expires_at=Job.created_at))


def test_a_worker_dying_after_storing_results_does_not_duplicate_them(runtime, tmp_path: Path) -> None:
    settings, rt = runtime
    make_cr(tmp_path / "cr.dcm")
    sop = _ingest(settings, rt, tmp_path / "cr.dcm")
    first = Worker(settings, rt, FakePipeline(), worker_id="first")
    (job,) = rt.queue.claim("first", [JobKind.ANALYSE])
    ((work, outcome),) = first.analyse([job])
    report = first._report(work, outcome)
    (built,) = first._builders.build([report])
    result = _Result(work, report, built)
    first._write_files([result])
    with rt.write_session() as session, session.begin():  # results recorded, the job not completed: ...
        ((made, _peers),) = first._record_results(session, [result])
    # ... and the process dies here (or its lease had run out, so its completion was refused)
    _expire_leases(rt)
    second = Worker(settings, rt, FakePipeline(), worker_id="second")
    jobs = rt.queue.claim("second", [JobKind.ANALYSE])
    assert [j.id for j in jobs] == [job.id] and jobs[0].attempts == 2
    second.process(jobs)
    with rt.read_session() as session:
        results = session.scalars(select(Instance.sop_instance_uid).where(Instance.source_sop_instance_uid == sop)).all()
        exports = session.scalars(select(Job.sop_instance_uid).where(Job.kind == JobKind.EXPORT.value)).all()
        state = session.scalar(select(Job.state).where(Job.id == job.id))
    assert sorted(results) == sorted(made) and len(made) >= 2
    assert sorted(exports) == sorted(made)  # one export job per result, not two
    assert state == JobState.DONE.value
    # the stale first worker cannot overwrite the second one's outcome
    assert rt.queue.complete(job.id, "first") is False


class _MustNotDecode(FakePipeline):
    def analyse(self, datasets: Sequence[pydicom.Dataset]) -> list[ImageResult | PipelineError]:
        raise AssertionError("the pipeline was handed a decompression bomb")


def test_a_decompression_bomb_is_refused_before_decoding(runtime, tmp_path: Path) -> None:
    settings, rt = runtime
    ds = make_cr(tmp_path / "bomb.dcm")
    ds.Rows = ds.Columns = 60000  # 3.6 gigapixels declared ...
    # ... in a 64-byte J2K stream whose SIZ says the same (a frame that contradicts its header is refused
    # at ingest already, see tests/pacs_node/dicom/test_datasets.py)
    siz = b"\xff\x4f\xff\x51" + struct.pack(">HHIIII", 41, 0, 60000, 60000, 0, 0)
    ds.PixelData = encapsulate([siz + b"\x00" * (64 - len(siz))])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.save_as(tmp_path / "bomb.dcm", enforce_file_format=True)
    _ingest(settings, rt, tmp_path / "bomb.dcm")  # the header is fine: stored, queued
    worker = Worker(settings, rt, _MustNotDecode(), worker_id="w")
    worker.process(rt.queue.claim("w", [JobKind.ANALYSE]))
    with rt.read_session() as session:
        job = session.scalars(select(Job).where(Job.kind == JobKind.ANALYSE.value)).one()
        results = session.scalar(select(func.count()).select_from(Instance).where(Instance.origin == "result"))
    assert job.state == JobState.DEAD.value and "exceeds the limit" in (job.last_error or "")
    assert results == 0


def test_housekeeping_removes_the_temp_file_of_a_killed_writer(tmp_path: Path) -> None:
    import subprocess
    import sys

    from pacs_node.ops.housekeeping import remove_dead_temp_files
    from tests.support import REPO

    settings = Settings(node={"data_dir": tmp_path / "var"}, store={"min_free_bytes": 0})
    rt = ServerContext.open(settings)
    script = ("import sys, time; from storage.store import InstanceStore; "
              "f = InstanceStore(sys.argv[1]).open_temp(); f.write(b'half'); f.flush(); "
              "print(f.name, flush=True); time.sleep(120)")
    writer = subprocess.Popen([sys.executable, "-c", script, str(rt.store.root)],
                              stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert writer.stdout is not None
        orphaned = Path(writer.stdout.readline().strip())
        live = rt.store.open_temp()  # this process is alive and still writing
        assert remove_dead_temp_files(rt) == 0  # both writers alive: nothing touched
        writer.kill()
        writer.wait()
        assert remove_dead_temp_files(rt) == 1
        assert not orphaned.exists() and Path(live.name).exists()
        rt.store.discard(live)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
        rt.close()
