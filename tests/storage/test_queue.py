"""The job queue's rules, on SQLite and PostgreSQL: dedupe, ordering, backoff, dead letters, leases."""

from __future__ import annotations

import random
from datetime import datetime, timedelta

import pytest
from sqlalchemy import event, func, select
from sqlalchemy.orm import Session, sessionmaker

from storage.queue import JobNotFound, JobQueue
from storage.schema import Job, JobKind, JobState

UID = "1.2.826.0.1.3680043.8.498.7"


class Clock:
    """A clock the test moves by hand, so lease and backoff tests never sleep."""

    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, 12, 0, 0)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def queue(sessions: sessionmaker[Session], clock: Clock) -> JobQueue:
    return JobQueue(sessions, lease_seconds=300, backoff_base_s=10, backoff_max_s=100, clock=clock,
                    rng=random.Random(7))


def _add(queue: JobQueue, sessions: sessionmaker[Session], key: str, **kwargs) -> bool:
    with sessions.begin() as session:
        return queue.enqueue(session, kind=kwargs.pop("kind", JobKind.ANALYSE), sop_instance_uid=UID,
                             dedupe_key=key, **kwargs)


def test_enqueue_is_idempotent_and_does_not_poison_the_transaction(
    queue: JobQueue, sessions: sessionmaker[Session]
) -> None:
    with sessions.begin() as session:
        assert queue.enqueue(session, kind="analyse", sop_instance_uid=UID, dedupe_key=f"analyse:{UID}")
        assert not queue.enqueue(session, kind="analyse", sop_instance_uid=UID, dedupe_key=f"analyse:{UID}")
        # the same transaction goes on working after the duplicate (PostgreSQL would abort it on an error)
        assert queue.enqueue(session, kind=JobKind.EXPORT, sop_instance_uid=UID, dedupe_key=f"export:{UID}:pacs",
                             destination="pacs", payload={"result": "1.2.3"})
    assert not _add(queue, sessions, f"analyse:{UID}")
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 2
    assert queue.counts()["queued"] == 2


def test_enqueue_rolls_back_with_the_callers_transaction(queue: JobQueue, sessions: sessionmaker[Session]) -> None:
    with pytest.raises(RuntimeError), sessions.begin() as session:
        queue.enqueue(session, kind="analyse", sop_instance_uid=UID, dedupe_key="k")
        raise RuntimeError("the instance row failed")
    assert queue.list() == []


def test_bad_arguments_are_refused_clearly(queue: JobQueue, sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        with pytest.raises(ValueError, match="unknown job kind 'analyze'"):
            queue.enqueue(session, kind="analyze", sop_instance_uid=UID, dedupe_key="k")
        with pytest.raises(ValueError, match="max_attempts"):
            queue.enqueue(session, kind="analyse", sop_instance_uid=UID, dedupe_key="k", max_attempts=0)
    with pytest.raises(ValueError, match="unknown job state 'finished'"):
        queue.list(state="finished")
    with pytest.raises(ValueError, match="lease_seconds"):
        JobQueue(sessions, lease_seconds=0)


def test_claim_takes_priority_then_age_and_only_the_asked_kinds(
    queue: JobQueue, sessions: sessionmaker[Session], clock: Clock
) -> None:
    _add(queue, sessions, "old")
    clock.advance(1)
    _add(queue, sessions, "export", kind="export", destination="pacs")
    clock.advance(1)
    _add(queue, sessions, "new")
    clock.advance(1)
    _add(queue, sessions, "urgent", priority=5)
    claimed = queue.claim("w1", ["analyse"], limit=10)
    keys = [queue.get(job.id).dedupe_key for job in claimed]
    assert keys == ["urgent", "old", "new"]
    assert all(job.attempts == 1 and job.kind == "analyse" for job in claimed)
    record = queue.get(claimed[0].id)
    lease_end = clock.now + timedelta(seconds=300)
    assert (record.state, record.lease_owner, record.lease_expires_at) == ("running", "w1", lease_end)
    assert record.started_at == clock.now
    [export] = queue.claim("w2", [JobKind.EXPORT])
    assert (export.destination, export.kind) == ("pacs", "export")
    assert queue.claim("w3", ["analyse", "export"]) == []


def test_backoff_grows_exponentially_with_jitter_and_a_cap(queue: JobQueue) -> None:
    for attempts, ceiling in [(1, 10), (2, 20), (3, 40), (4, 80), (5, 100), (12, 100)]:
        delays = [queue.backoff_delay(attempts) for _ in range(50)]
        assert all(ceiling / 2 <= delay <= ceiling for delay in delays)
        assert len(set(delays)) > 1  # jittered


def test_failed_job_waits_for_its_backoff_then_goes_dead(
    queue: JobQueue, sessions: sessionmaker[Session], clock: Clock
) -> None:
    _add(queue, sessions, "k", max_attempts=3)
    for attempt in (1, 2):
        [job] = queue.claim("w1", ["analyse"])
        assert job.attempts == attempt
        assert queue.fail(job.id, "w1", f"peer refused ({attempt})") is JobState.FAILED
        record = queue.get(job.id)
        assert record.last_error == f"peer refused ({attempt})"
        assert record.lease_owner is None
        wait = (record.not_before - clock.now).total_seconds()
        assert 10 * 2 ** (attempt - 1) / 2 <= wait <= 10 * 2 ** (attempt - 1)
        assert queue.claim("w1", ["analyse"]) == []  # not due yet
        clock.advance(wait + 0.001)
    [job] = queue.claim("w1", ["analyse"])
    assert queue.fail(job.id, "w1", "still refused") is JobState.DEAD
    record = queue.get(job.id)
    assert (record.state, record.attempts, record.finished_at) == ("dead", 3, clock.now)
    clock.advance(10_000)
    assert queue.claim("w1", ["analyse"]) == []
    assert queue.counts()["dead"] == 1


def test_not_retryable_goes_dead_at_once_and_retry_brings_it_back(
    queue: JobQueue, sessions: sessionmaker[Session]
) -> None:
    _add(queue, sessions, "k")
    [job] = queue.claim("w1", ["analyse"])
    assert queue.fail(job.id, "w1", "pixel data cannot be decoded", retryable=False) is JobState.DEAD
    assert queue.retry(job.id)
    record = queue.get(job.id)
    assert (record.state, record.attempts, record.finished_at) == ("queued", 0, None)
    [again] = queue.claim("w1", ["analyse"])
    assert again.attempts == 1
    assert not queue.retry(job.id)  # running: nothing to retry
    with pytest.raises(JobNotFound):
        queue.fail(12345, "w1", "x")


def test_retry_all_failed_resets_failed_and_dead(queue: JobQueue, sessions: sessionmaker[Session]) -> None:
    for key in ("a", "b", "c"):
        _add(queue, sessions, key)
    a, b, c = queue.claim("w1", ["analyse"], limit=3)
    queue.fail(a.id, "w1", "x")
    queue.fail(b.id, "w1", "x", retryable=False)
    queue.complete(c.id, "w1")
    assert queue.retry_all_failed() == 2
    assert queue.counts() | {} == {"queued": 2, "running": 0, "done": 1, "failed": 0, "dead": 0, "cancelled": 0}
    assert {job.id for job in queue.claim("w1", ["analyse"], limit=5)} == {a.id, b.id}


def test_expired_lease_is_reclaimed_and_the_old_owner_is_locked_out(
    queue: JobQueue, sessions: sessionmaker[Session], clock: Clock
) -> None:
    _add(queue, sessions, "k", payload={"bundle": "demo"})
    [job] = queue.claim("w1", ["analyse"])
    clock.advance(299)
    assert queue.claim("w2", ["analyse"]) == []  # lease still valid
    clock.advance(2)
    [again] = queue.claim("w2", ["analyse"])
    assert (again.id, again.attempts) == (job.id, 2)
    assert "lease of w1 expired" in queue.get(job.id).last_error
    # w1 comes back from the dead: it can neither renew, nor finish, nor fail the job
    assert not queue.heartbeat(job.id, "w1")
    assert not queue.complete(job.id, "w1", {"result": "from w1"})
    assert queue.fail(job.id, "w1", "w1 error") is JobState.RUNNING
    record = queue.get(job.id)
    assert (record.state, record.lease_owner, record.payload) == ("running", "w2", {"bundle": "demo"})
    assert queue.complete(job.id, "w2", {"result": "from w2"})
    record = queue.get(job.id)
    assert (record.state, record.lease_owner, record.lease_expires_at) == ("done", None, None)
    assert record.payload == {"bundle": "demo", "result": "from w2"}
    assert not queue.complete(job.id, "w2")  # done once


def test_heartbeat_keeps_the_lease(queue: JobQueue, sessions: sessionmaker[Session], clock: Clock) -> None:
    _add(queue, sessions, "k")
    [job] = queue.claim("w1", ["analyse"])
    for _ in range(5):
        clock.advance(200)
        assert queue.heartbeat(job.id, "w1")
        assert queue.claim("w2", ["analyse"]) == []
    assert queue.reclaim_expired() == 0


def test_lease_lost_on_the_last_attempt_buries_the_job(
    queue: JobQueue, sessions: sessionmaker[Session], clock: Clock
) -> None:
    """A job that kills every worker that takes it must not loop forever."""
    _add(queue, sessions, "poison", max_attempts=2)
    _add(queue, sessions, "fine")
    for worker in ("w1", "w2"):
        [job] = queue.claim(worker, ["analyse"])
        assert queue.get(job.id).dedupe_key == "poison"
        clock.advance(301)
    [job] = queue.claim("w3", ["analyse"])  # the poison job is buried on the way, the next one is claimed
    assert queue.get(job.id).dedupe_key == "fine"
    [dead] = queue.list(state="dead")
    assert dead.dedupe_key == "poison" and "expired on the last attempt" in dead.last_error


def test_reclaim_expired(queue: JobQueue, sessions: sessionmaker[Session], clock: Clock) -> None:
    _add(queue, sessions, "a")
    _add(queue, sessions, "b", max_attempts=1)
    a, b = queue.claim("w1", ["analyse"], limit=2)
    clock.advance(301)
    assert queue.reclaim_expired() == 2
    assert (queue.get(a.id).state, queue.get(a.id).not_before) == ("failed", clock.now)
    assert queue.get(b.id).state == "dead"
    assert queue.reclaim_expired() == 0
    [again] = queue.claim("w2", ["analyse"])
    assert (again.id, again.attempts) == (a.id, 2)


def test_cancel(queue: JobQueue, sessions: sessionmaker[Session]) -> None:
    for key in ("a", "b", "c"):
        _add(queue, sessions, key)
    assert queue.cancel(1 if queue.get(1) else queue.list()[-1].id)
    running, done = queue.claim("w1", ["analyse"], limit=2)
    assert queue.complete(done.id, "w1")
    assert queue.cancel(running.id)
    assert not queue.complete(running.id, "w1")  # the worker's lease went with the cancel
    assert not queue.cancel(done.id)
    assert not queue.cancel(999_999)
    assert queue.counts()["cancelled"] == 2


def test_purge_removes_only_old_finished_jobs(queue: JobQueue, sessions: sessionmaker[Session], clock: Clock) -> None:
    for key in ("done", "running", "queued"):
        _add(queue, sessions, key)
    done, running = queue.claim("w1", ["analyse"], limit=2)
    queue.complete(done.id, "w1")
    clock.advance(3600)
    assert queue.purge(timedelta(hours=2)) == 0
    clock.advance(3600 * 2)
    assert queue.purge(timedelta(hours=2)) == 1
    assert queue.get(done.id) is None
    assert {job.dedupe_key for job in queue.list()} == {"running", "queued"}


def test_list_and_get(queue: JobQueue, sessions: sessionmaker[Session]) -> None:
    _add(queue, sessions, "a")
    _add(queue, sessions, "b", kind="export", destination="pacs")
    assert [job.dedupe_key for job in queue.list()] == ["b", "a"]
    assert [job.dedupe_key for job in queue.list(kind="export")] == ["b"]
    assert [job.dedupe_key for job in queue.list(state=JobState.QUEUED, limit=1)] == ["b"]
    assert queue.list(state="done") == []
    assert queue.get(424242) is None
    assert [job.dedupe_key for job in queue.for_instance(UID)] == ["a", "b"]


def test_a_done_job_runs_again_on_retry_and_requeue_for(queue: JobQueue, sessions: sessionmaker[Session]) -> None:
    _add(queue, sessions, f"analyse:{UID}")
    _add(queue, sessions, f"export:{UID}:pacs", kind=JobKind.EXPORT, destination="pacs")
    _add(queue, sessions, f"export:{UID}:archive", kind=JobKind.EXPORT, destination="archive")
    for job in queue.claim("w1", [JobKind.ANALYSE, JobKind.EXPORT], limit=3):
        assert queue.complete(job.id, "w1")
    analyse = queue.list(kind=JobKind.ANALYSE)[0]
    assert queue.retry(analyse.id) and queue.get(analyse.id).state == JobState.QUEUED.value
    assert queue.get(analyse.id).attempts == 0
    # only the export to one destination, about these instances; running jobs are left alone
    assert queue.requeue_for(JobKind.EXPORT, [UID], destination="pacs") == 1
    assert {j.destination: j.state for j in queue.list(kind=JobKind.EXPORT)} == {"pacs": "queued", "archive": "done"}
    assert queue.requeue_for(JobKind.EXPORT, []) == 0
    assert [j.destination for j in queue.list(destination="archive")] == ["archive"]
    assert len(queue.list(sop_instance_uids=[UID], limit=2, offset=1)) == 2


def test_destinations_summarise_exports_with_the_newest_error(queue: JobQueue, sessions: sessionmaker[Session],
                                                             clock: Clock) -> None:
    _add(queue, sessions, "export:1:pacs", kind=JobKind.EXPORT, destination="pacs")
    _add(queue, sessions, "export:2:pacs", kind=JobKind.EXPORT, destination="pacs")
    _add(queue, sessions, "export:1:archive", kind=JobKind.EXPORT, destination="archive")
    first, second, third = queue.claim("w1", [JobKind.EXPORT], limit=3)
    queue.fail(first.id, "w1", "old refusal", retryable=False)
    clock.advance(1)
    queue.fail(second.id, "w1", "connection refused")
    queue.complete(third.id, "w1")
    summary = {d["destination"]: d for d in queue.destinations()}
    assert summary["pacs"]["counts"]["dead"] == 1 and summary["pacs"]["counts"]["failed"] == 1
    assert summary["pacs"]["last_error"] == "connection refused"
    assert summary["archive"]["counts"]["done"] == 1 and summary["archive"]["last_error"] is None


def test_enqueue_many_skips_existing_keys_and_complete_in_settles_a_batch_in_one_transaction(
    queue: JobQueue, sessions: sessionmaker[Session], clock: Clock
) -> None:
    from storage.history import deliveries_of

    assert _add(queue, sessions, "export:1.2.3.1:pacs", kind=JobKind.EXPORT, destination="pacs")
    with sessions.begin() as session:
        queue.enqueue_many(session, [dict(kind=JobKind.EXPORT, sop_instance_uid=f"1.2.3.{i}", destination="pacs",
                                          dedupe_key=f"export:1.2.3.{i}:pacs", max_attempts=3) for i in range(1, 5)])
    assert queue.counts()["queued"] == 4  # the existing key is skipped, not doubled, and nothing raised
    claimed = queue.claim("w", [JobKind.EXPORT], limit=4)
    assert len(claimed) == 4
    # another owner took the last one meanwhile: its completion is refused, the others go through
    stolen = claimed[-1]
    with sessions.begin() as session:
        session.execute(Job.__table__.update().where(Job.id == stolen.id).values(lease_owner="other"))
    with sessions.begin() as session:
        records = queue.complete_in(session, [(job.id, {"sent_at": "now"}) for job in claimed], "w")
    assert [r is not None for r in records] == [True, True, True, False]
    assert all(r.state == JobState.DONE.value and r.payload["sent_at"] == "now" for r in records[:3])
    assert queue.get(stolen.id).state == JobState.RUNNING.value
    with sessions() as session:
        delivered = {d.sop_instance_uid: d.delivered_at for d in deliveries_of(session, [j.sop_instance_uid
                                                                                          for j in claimed])}
    assert set(delivered) == {j.sop_instance_uid for j in claimed[:3]} and all(delivered.values())


def test_enqueue_many_refuses_bad_arguments_clearly(queue: JobQueue, sessions: sessionmaker[Session]) -> None:
    with pytest.raises(ValueError, match="max_attempts"), sessions.begin() as session:
        queue.enqueue_many(session, [dict(kind="analyse", sop_instance_uid=UID, dedupe_key="k", max_attempts=0)])
    with pytest.raises(ValueError, match="unknown job kind"), sessions.begin() as session:
        queue.enqueue_many(session, [dict(kind="nonsense", sop_instance_uid=UID, dedupe_key="k")])
    assert queue.counts()["queued"] == 0


def _durability_at_commit(sessions: sessionmaker[Session]) -> list[str]:
    """Records, for every commit on the queue's engine from now on, how durable the database was told to
    make it: SQLite's ``synchronous`` (1 NORMAL: no fsync at commit, 2 FULL) or PostgreSQL's
    ``synchronous_commit``, read in the transaction just before it commits."""
    engine = sessions.kw["bind"].engine
    seen: list[str] = []

    def on_commit(connection) -> None:  # noqa: ANN001 (SQLAlchemy Connection)
        query = "PRAGMA synchronous" if engine.dialect.name == "sqlite" else "SHOW synchronous_commit"
        cursor = connection.connection.dbapi_connection.cursor()
        cursor.execute(query)
        seen.append(str(cursor.fetchone()[0]))
        cursor.close()

    event.listen(engine, "commit", on_commit)
    return seen


def test_a_claim_commits_without_waiting_for_the_disk_and_results_still_do(
        queue: JobQueue, sessions: sessionmaker[Session]) -> None:
    """A claim that a crash of the machine loses costs nothing (the job is due again and claimed again,
    and the commit that records its results makes the claim durable with it), so it does not wait for an
    fsync; every other commit still does, on the same pooled connections."""
    _add(queue, sessions, "a")
    _add(queue, sessions, "b")
    sqlite = sessions.kw["bind"].engine.dialect.name == "sqlite"
    relaxed, durable = ("1", "2") if sqlite else ("off", "on")
    seen = _durability_at_commit(sessions)

    (first,) = queue.claim("w1", [JobKind.ANALYSE])
    assert queue.heartbeat(first.id, "w1")
    assert queue.complete(first.id, "w1", {"results": []})
    with sessions.begin() as session:
        queue.enqueue(session, kind=JobKind.EXPORT, sop_instance_uid=UID, dedupe_key="c")
    assert seen == [relaxed, relaxed, durable, durable]

    # a claim that fails half-way (here: its clock) leaves its connection as durable as the others
    seen.clear()

    def broken_clock() -> datetime:
        raise RuntimeError("clock")

    with pytest.raises(RuntimeError):
        JobQueue(sessions, clock=broken_clock).claim("w2", [JobKind.ANALYSE])
    with sessions.begin() as session:
        queue.enqueue(session, kind=JobKind.EXPORT, sop_instance_uid=UID, dedupe_key="d")
    assert seen == [durable]
