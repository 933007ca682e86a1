"""The worker's two stages overlap: batch N+1 is loaded and inferred while batch N's results are stored.

Synchronised with events only: a stage that waits for the other to reach a point proves they overlap (a
worker that ran them one after the other would never get there, and the guard's timeout fails the test).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select, update

from pacs_node.config import Settings
from pacs_node.ops.context import ServerContext
from pipelines.interface import FakePipeline, ImageResult, PipelineError
from storage.schema import Instance, Job, JobKind, JobState
from tests.pacs_node.helpers import make_cr
from tests.pacs_node.work.test_worker_export import jobs, receive

pytest.importorskip("pacs_node.results", reason="the result builders (pacs_node.results) are not installed")
from pacs_node.work.worker import Worker, _Result  # noqa: E402 (needs pacs_node.results)

#: Longest any stage waits for another: reached only when the stages do not overlap (the test fails).
GUARD_S = 60.0


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[ServerContext]:
    settings = Settings(
        node={"data_dir": tmp_path / "var"},
        database={"url": f"sqlite:///{tmp_path / 'node.db'}"},
        store={"min_free_bytes": 0},
        pipeline={"bundle": "fake", "max_batch_latency_s": 0, "batch_size": 2},
        routing={"default": "none"},
        worker={"poll_interval_s": 0.05},
        studies={"settle_s": 0},
    )
    rt = ServerContext.open(settings)
    yield rt
    rt.close()


class _Recording(FakePipeline):
    """The fake model, noting the images of each batch it is given; ``inferring[n]`` is set when batch n
    (from 0) reaches it."""

    def __init__(self, batches: int) -> None:
        super().__init__()
        self.batches: list[list[str]] = []
        self.inferring = [threading.Event() for _ in range(batches)]

    def analyse(self, datasets: Sequence[pydicom.Dataset]) -> list[ImageResult | PipelineError]:
        self.batches.append([str(ds.SOPInstanceUID) for ds in datasets])
        if len(self.batches) <= len(self.inferring):
            self.inferring[len(self.batches) - 1].set()
        return super().analyse(datasets)


def _run_until_done(worker: Worker, rt: ServerContext, expected: int) -> None:
    """Run the worker's loop in a thread until ``expected`` analyse jobs are done, then stop it."""
    stop = threading.Event()
    failures: list[BaseException] = []

    def run() -> None:
        try:
            worker.run(stop)
        except BaseException as exc:  # noqa: BLE001 (reported below)
            failures.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        deadline = threading.Event()
        timer = threading.Timer(GUARD_S, deadline.set)
        timer.start()
        while not deadline.wait(0.05) and not failures and thread.is_alive():
            if [j.state for j in jobs(rt, "analyse")].count("done") >= expected:
                break
        timer.cancel()
    finally:
        stop.set()
        thread.join(GUARD_S)
    assert not failures, failures
    assert not thread.is_alive()


def test_the_next_batch_is_inferred_while_the_results_of_this_one_are_stored(runtime: ServerContext,
                                                                            tmp_path: Path) -> None:
    images = [make_cr(tmp_path / f"{i}.dcm", seed=i) for i in range(6)]
    for ds in images:
        receive(runtime, ds)
    pipeline = _Recording(batches=3)
    worker = Worker(runtime.settings, runtime, pipeline, worker_id="overlapping")
    stored: list[list[str]] = []
    overlapped: list[bool] = []
    write_files = worker._write_files

    def store_once_the_next_batch_is_inferred(results: list[_Result]) -> None:
        n = len(stored)
        stored.append([str(r.work.dataset.SOPInstanceUID) for r in results])
        if n + 1 < len(pipeline.inferring):
            # batch n's files are written only once batch n+1 is in the model: a worker that stored
            # before claiming the next batch would wait here until the guard gives up
            overlapped.append(pipeline.inferring[n + 1].wait(GUARD_S))
        write_files(results)

    worker._write_files = store_once_the_next_batch_is_inferred  # type: ignore[method-assign]
    _run_until_done(worker, runtime, expected=6)

    assert overlapped == [True, True]
    uids = [str(ds.SOPInstanceUID) for ds in images]
    assert pipeline.batches == [uids[0:2], uids[2:4], uids[4:6]]
    assert stored == pipeline.batches  # stored in the order inferred, none dropped, none twice
    analyses = jobs(runtime, "analyse")
    assert [j.state for j in analyses] == ["done"] * 6
    finished = {j.sop_instance_uid: j.finished_at for j in analyses}
    assert max(finished[u] for u in uids[0:2]) <= min(finished[u] for u in uids[2:4])
    with runtime.read_session() as session:
        sources = session.scalars(select(Instance.source_sop_instance_uid).where(Instance.origin == "result")).all()
    assert sorted(set(sources)) == sorted(uids) and len(sources) == 4 * 6


def test_a_worker_that_dies_with_two_batches_in_hand_leaves_both_to_be_claimed_again(runtime: ServerContext,
                                                                                     tmp_path: Path) -> None:
    """The second stage of batch 0 fails hard (the process would die) while batch 1 is in the model:
    nothing of either is marked done, and both come back when their leases run out."""
    for i in range(4):
        receive(runtime, make_cr(tmp_path / f"{i}.dcm", seed=i))
    pipeline = _Recording(batches=2)
    worker = Worker(runtime.settings, runtime, pipeline, worker_id="dying")

    overlapped: list[bool] = []

    def die_once_the_next_batch_is_inferred(results: list[_Result]) -> None:
        overlapped.append(pipeline.inferring[1].wait(GUARD_S))
        raise SystemExit("killed")  # not an Exception: no job-by-job retry, the loop ends as a process would

    worker._write_files = die_once_the_next_batch_is_inferred  # type: ignore[method-assign]
    with pytest.raises(SystemExit):
        worker.run(threading.Event())
    assert overlapped == [True]
    assert [j.state for j in jobs(runtime, "analyse")] == ["running"] * 4
    with runtime.write_session() as session, session.begin():  # what the clock does to a dead worker's leases
        session.execute(update(Job).where(Job.state == JobState.RUNNING.value).values(lease_expires_at=Job.created_at))
    again = runtime.queue.claim("successor", [JobKind.ANALYSE], limit=10)
    assert len(again) == 4 and all(job.attempts == 2 for job in again)


def test_the_lease_keeper_renews_both_batches_in_hand_and_releases_each_on_its_own(runtime: ServerContext) -> None:
    from pacs_node.work.leases import LeaseKeeper

    keeper = LeaseKeeper(runtime, "w", 300)
    keeper.hold([1, 2])  # batch N, being stored
    keeper.hold([3, 4])  # batch N+1, in the model
    assert keeper.job_ids == {1, 2, 3, 4}
    keeper.release(1)
    keeper.release_all([1, 2])  # batch N is over
    assert keeper.job_ids == {3, 4}
