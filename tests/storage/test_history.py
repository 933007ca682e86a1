"""What outlasts the job queue: analysis and delivery history, ids never reused, leases of the dead
handed back at once, down destinations skipped without spending attempts; on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import pytest
from sqlalchemy.orm import Session, sessionmaker

from storage.destinations import down_destinations, record_failure, record_success
from storage.doctor import Doctor
from storage.history import analysis_of, deliveries_of
from storage.queue import JobQueue, RetryPolicy
from storage.schema import JobKind, JobState, utcnow
from storage.store import InstanceStore


@pytest.fixture
def queue(sessions: sessionmaker[Session]) -> JobQueue:
    return JobQueue(sessions)


def _add(queue: JobQueue, sessions: sessionmaker[Session], key: str, **kwargs) -> None:
    with sessions.begin() as session:
        queue.enqueue(session, dedupe_key=key, **kwargs)


def test_history_survives_a_purge_and_ids_are_never_reused(queue: JobQueue, sessions: sessionmaker[Session]) -> None:
    _add(queue, sessions, "analyse:1", kind="analyse", sop_instance_uid="1.1")
    (job,) = queue.claim("w", [JobKind.ANALYSE])
    assert queue.complete(job.id, "w", {"results": ["1.1.9"]})
    _add(queue, sessions, "export:1.1.9:pacs", kind="export", sop_instance_uid="1.1.9", destination="pacs",
         max_attempts=3)
    (export,) = queue.claim("w", [JobKind.EXPORT])
    queue.fail(export.id, "w", "no association", policy=RetryPolicy(attempts=3, first_delay_s=0, max_delay_s=0))
    (export,) = queue.claim("w", [JobKind.EXPORT])
    assert queue.complete(export.id, "w")
    assert queue.purge(timedelta(0)) == 2 and queue.list() == []
    with sessions() as session:
        analysis = analysis_of(session, "1.1")
        (delivery,) = deliveries_of(session, ["1.1.9"])
    assert (analysis.state, analysis.attempts, analysis.results) == ("done", 1, ["1.1.9"])
    assert (delivery.destination, delivery.state, delivery.attempts) == ("pacs", "done", 2)
    assert delivery.delivered_at is not None and delivery.first_attempt_at <= delivery.delivered_at
    _add(queue, sessions, "analyse:2", kind="analyse", sop_instance_uid="1.2")
    (again,) = queue.list()
    assert again.id > export.id  # not 1 again after the purge


def test_retry_policy_shape() -> None:
    policy = RetryPolicy(attempts=80, first_delay_s=10, growth=2, max_delay_s=1800)
    assert [policy.ceiling(n) for n in (1, 2, 3, 9, 200)] == [10, 20, 40, 1800, 1800]
    assert policy.patience_s() > 24 * 3600  # the default export policy outlasts a day-long outage
    with pytest.raises(ValueError):
        RetryPolicy(first_delay_s=10, max_delay_s=1)


def test_a_dead_owners_jobs_are_released_at_once(queue: JobQueue, sessions: sessionmaker[Session]) -> None:
    for key in ("a", "b", "c"):
        _add(queue, sessions, key, kind="export", sop_instance_uid=key, destination="pacs")
    queue.claim("host:12", [JobKind.EXPORT], limit=1)
    queue.claim("host:12/export0", [JobKind.EXPORT], limit=1)
    queue.claim("host:123", [JobKind.EXPORT], limit=1)  # a different process: not released
    assert queue.release_owner("host:12") == 2
    states = sorted((job.lease_owner or "", job.state) for job in queue.list())
    assert states == [("", "failed"), ("", "failed"), ("host:123", "running")]
    assert len(queue.claim("w", [JobKind.EXPORT], limit=5)) == 2  # due now, not after a lease


def test_a_down_destination_is_skipped_then_released(queue: JobQueue, sessions: sessionmaker[Session]) -> None:
    for key, destination in (("a", "pacs"), ("b", "pacs"), ("c", "viewer")):
        _add(queue, sessions, key, kind="export", sop_instance_uid=key, destination=destination)
    now = utcnow()
    with sessions.begin() as session:
        assert record_failure(session, "pacs", "refused", now, down_after=2) is False
        assert record_failure(session, "pacs", "refused", now, down_after=2) is True
        assert record_failure(session, "pacs", "refused", now, down_after=2) is False  # already down
    with sessions() as session:
        assert down_destinations(session) == {"pacs"}
    claimed = queue.claim("w", [JobKind.EXPORT], limit=5, skip_destinations={"pacs"})
    assert [job.destination for job in claimed] == ["viewer"]
    (a,) = [job for job in queue.list() if job.sop_instance_uid == "a"]
    assert a.state == JobState.QUEUED.value and a.attempts == 0  # waited without spending an attempt
    with sessions.begin() as session:
        assert record_success(session, "pacs", utcnow()) is not None
        assert down_destinations(session) == set()
    assert queue.release_destination("pacs") == 0  # queued jobs were due already


def test_doctor_reports_jobs_whose_lease_holder_is_gone(queue: JobQueue, sessions: sessionmaker[Session],
                                                        tmp_path) -> None:
    here = socket.gethostname()
    _add(queue, sessions, "a", kind="analyse", sop_instance_uid="a")
    _add(queue, sessions, "b", kind="analyse", sop_instance_uid="b")
    queue.claim(f"{here}:{2**22 + 7}", [JobKind.ANALYSE])  # no such pid on this host
    queue.claim(f"{here}:{os.getpid()}", [JobKind.ANALYSE])  # alive: this test
    doctor = Doctor(sessions, InstanceStore(tmp_path / "store"), queue)
    report = doctor.check()
    assert list(report.orphaned_leases) == [f"{here}:{2**22 + 7}"] and not report.ok
    repaired = doctor.repair()
    assert any("released 1 job(s)" in action for action in repaired.actions)
    assert doctor.check().orphaned_leases == {}
