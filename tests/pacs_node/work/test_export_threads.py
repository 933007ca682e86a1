"""The exporter's threads against a real DCMTK ``storescp``: a ring answered by one claim, not one by
every thread it woke (each a write transaction that finds nothing), a thread busy with a slow peer
still leaves new work to the others, and a burst larger than a batch is shared by the threads."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from pacs_node.config import Settings
from pacs_node.ops.context import ServerContext
from pacs_node.work.export import Exporter
from storage.schema import Job, JobKind
from tests.pacs_node.work.test_export_streaming import VerboseStoreSCP, a_result, runtime_for, store_results

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # the database plays no part

#: A claim's extra time in the first test: well under pacs_node.work.export.DEFER_S (0.25 s)
CLAIM_DELAY_S = 0.015


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[VerboseStoreSCP]:
    scp = VerboseStoreSCP(tmp_path / "received")
    yield scp
    scp.stop()


def done_jobs(rt: ServerContext) -> int:
    with rt.read_session() as session:
        return int(session.scalar(select(func.count()).select_from(Job).where(Job.state == "done")) or 0)


def wait_done(rt: ServerContext, count: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while done_jobs(rt) < count:
        assert time.monotonic() < deadline, f"{done_jobs(rt)} of {count} exports done"
        time.sleep(0.02)


def counting_claims(rt: ServerContext, delay_s: float) -> list[int]:
    """Count the queue's claims (how many jobs each got), each taking ``delay_s`` longer: the threads a
    ring woke ask while the first claim runs, as on a busy machine where they get the CPU late."""
    claims: list[int] = []
    claim = rt.queue.claim

    def slow_claim(*args: Any, **kwargs: Any) -> Any:
        time.sleep(delay_s)
        jobs = claim(*args, **kwargs)
        claims.append(len(jobs))
        return jobs

    rt.queue.claim = slow_claim  # type: ignore[method-assign]
    return claims


def test_a_ring_is_answered_by_one_claim(tmp_path: Path, database_url: str, storescp: VerboseStoreSCP) -> None:
    rt = runtime_for(tmp_path, database_url, storescp.port)
    assert rt.settings.export.concurrency == 4
    exporter = Exporter(rt.settings, rt, worker_id="x")
    exporter.start()
    try:
        time.sleep(0.3)  # every thread idle on the doorbell
        claims = counting_claims(rt, delay_s=CLAIM_DELAY_S)
        rounds = 6
        for n in range(rounds):
            store_results(rt, [a_result(10 * n + i) for i in range(4)])  # an image's results, then the ring
            rt.doorbell(JobKind.EXPORT).ring()
            wait_done(rt, 4 * (n + 1))
            time.sleep(0.1)  # the threads idle again
        assert sum(claims) == 4 * rounds
        assert len(claims) <= rounds + 1, f"claims per ring: {claims}"  # (a poll may fall between)
    finally:
        exporter.stop()
        rt.close()
    assert len(storescp.received()) == 4 * rounds


def test_work_queued_while_a_batch_is_held_up_goes_on_another_thread(
        tmp_path: Path, database_url: str, storescp: VerboseStoreSCP) -> None:
    """The first batch's send takes 2 s (a slow peer); results queued meanwhile are sent by another thread
    well before it ends."""
    rt = runtime_for(tmp_path, database_url, storescp.port)
    exporter = Exporter(rt.settings, rt, worker_id="x")
    send = exporter.associations.send
    held: list[str] = []

    def slow_once(destination: str, peer: Any, instances: list[Any]) -> Any:
        if not held:
            held.append(instances[0].sop_instance_uid)
            time.sleep(2.0)
        return send(destination, peer, instances)

    exporter.associations.send = slow_once  # type: ignore[method-assign]
    exporter.start()
    try:
        time.sleep(0.3)
        store_results(rt, [a_result(1)])
        rt.doorbell(JobKind.EXPORT).ring()
        deadline = time.monotonic() + 5
        while not held:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        started = time.monotonic()
        store_results(rt, [a_result(2), a_result(3)])
        rt.doorbell(JobKind.EXPORT).ring()
        wait_done(rt, 2, timeout=1.5)
        assert time.monotonic() - started < 1.5
        wait_done(rt, 3)
    finally:
        exporter.stop()
        rt.close()


def test_the_other_threads_export_after_one_ended_with_an_error(
        tmp_path: Path, database_url: str, storescp: VerboseStoreSCP) -> None:
    """A batch whose settling raises ends the thread that sent it (as before); the others do not wait for
    it to claim."""
    rt = runtime_for(tmp_path, database_url, storescp.port)
    exporter = Exporter(rt.settings, rt, worker_id="x")
    settle = exporter._settle
    failed: list[int] = []

    def failing_once(*args: Any, **kwargs: Any) -> Any:
        if not failed:
            failed.append(1)
            raise RuntimeError("the database went away")
        return settle(*args, **kwargs)

    exporter._settle = failing_once  # type: ignore[method-assign]
    exporter.start()
    try:
        time.sleep(0.3)
        store_results(rt, [a_result(1)])
        rt.doorbell(JobKind.EXPORT).ring()
        deadline = time.monotonic() + 5
        while sum(thread.is_alive() for thread in exporter._threads) == 4:
            assert time.monotonic() < deadline, "no thread ended"
            time.sleep(0.01)
        store_results(rt, [a_result(2), a_result(3)])
        rt.doorbell(JobKind.EXPORT).ring()
        wait_done(rt, 2, timeout=5)
    finally:
        exporter.stop()
        rt.close()


def test_a_burst_larger_than_a_batch_is_shared_by_the_threads(tmp_path: Path, database_url: str) -> None:
    """One ring announces more than a batch; the threads after the first look before it claims (so they
    leave the work to it): its full claim rings them again, and they claim the rest at once instead of
    after their slow poll (``IDLE_POLL_FACTOR`` x ``worker.poll_interval_s``)."""
    scp = VerboseStoreSCP(tmp_path / "received")
    rt = ServerContext.open(rt_settings(tmp_path, database_url, scp.port))
    exporter = Exporter(rt.settings, rt, worker_id="x")
    claim = exporter._claim

    def first_thread_late(owner: str, index: int) -> Any:
        if index == 0:
            time.sleep(0.05)  # the others take the claiming lock first and leave the work to it
        return claim(owner, index)

    exporter._claim = first_thread_late  # type: ignore[method-assign]
    send = exporter.associations.send
    sending: list[int] = [0]
    most: list[int] = [0]

    def slow_send(destination: str, peer: Any, instances: list[Any]) -> Any:
        sending[0] += 1
        most[0] = max(most[0], sending[0])
        try:
            time.sleep(0.5)
            return send(destination, peer, instances)
        finally:
            sending[0] -= 1

    exporter.associations.send = slow_send  # type: ignore[method-assign]
    exporter.start()
    try:
        time.sleep(0.3)  # every thread idle on the doorbell
        store_results(rt, [a_result(i) for i in range(8)])
        rt.doorbell(JobKind.EXPORT).ring()
        time.sleep(1.0)  # well before the slow poll (8 s)
        assert most[0] >= 2, "one thread sends the burst alone"
        wait_done(rt, 8, timeout=60.0)  # (storescp takes one association at a time: the others wait their turn)
    finally:
        exporter.stop()
        rt.close()
        scp.stop()


def rt_settings(tmp_path: Path, database_url: str, port: int) -> Settings:
    """Batches of two, a slow poll for the threads after the first."""
    return Settings(
        node={"data_dir": tmp_path / "var"}, database={"url": database_url}, store={"min_free_bytes": 0},
        peers={"pacs": {"ae_title": "RECEIVER", "host": "127.0.0.1", "port": port}},
        export={"timeout_s": 10, "keep_open_s": 2.0, "batch_size": 2}, worker={"poll_interval_s": 1.0},
    )
