"""Recording received instances with statements compiled for the driver: the same rows as the ORM and
Core helpers write, on both databases; duplicates change nothing; the driver's errors are SQLAlchemy's."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import bindparam, insert, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from storage.db import DriverStatement, driver_connection, driver_transaction, make_engine
from storage.queue import JobQueue
from storage.receiving import ReceivedInstances, Recorded, StudyAnalysis
from storage.repository import InstanceRecord
from storage.schema import Disposition, Instance, Job, JobState, Origin, Study, StudyState
from storage.studies import instance_set_hash

STUDY = "1.2.826.0.1.3680043.8.498.20"
NOW = datetime(2026, 12, 1, 20, 0, 0, 123456)
DUE = NOW + timedelta(seconds=30)


def _record(n: int) -> InstanceRecord:
    return InstanceRecord(sop_instance_uid=f"{STUDY}.1.{n}", sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
                          study_instance_uid=STUDY, series_instance_uid=f"{STUDY}.1",
                          transfer_syntax_uid="1.2.840.10008.1.2.1", patient_name="Doe^Jane", modality="CR",
                          instance_number=n, rows=64, columns=48)


def _fields(n: int) -> dict:
    return {"path": f"x/{n}.dcm", "size_bytes": 100 + n, "origin": Origin.RECEIVED,
            "disposition": Disposition.QUEUED, "reason": None, "calling_ae": "MODALITY", "calling_host": None}


@pytest.fixture
def received(sessions: sessionmaker[Session]) -> tuple[ReceivedInstances, object]:
    engine = sessions.kw["bind"]
    queue = JobQueue(sessions, clock=lambda: NOW)
    return ReceivedInstances(engine, queue, clock=lambda: NOW), engine


def test_an_image_to_analyse_gets_its_row_its_study_and_its_job(sessions: sessionmaker[Session], received) -> None:
    recorder, engine = received
    analysis = StudyAnalysis("analyse:study:", DUE, 3)
    with driver_transaction(engine) as connection:
        first = recorder.record(connection, _record(1), _fields(1), analysis)
        assert recorder.exists(connection, f"{STUDY}.1.1") and not recorder.exists(connection, f"{STUDY}.1.9")
    with driver_transaction(engine) as connection:
        second = recorder.record(connection, _record(2), _fields(2), analysis)
        assert recorder.record(connection, _record(2), _fields(3), analysis) == Recorded(False)
    assert first.inserted and second.inserted and first.job_id != second.job_id

    with sessions() as session:
        row = session.scalars(select(Instance).where(Instance.sop_instance_uid == f"{STUDY}.1.2")).one()
        assert (row.path, row.size_bytes, row.origin, row.disposition, row.patient_name, row.rows, row.received_at) \
            == ("x/2.dcm", 102, "received", "queued", "Doe^Jane", 64, NOW)
        study = session.scalars(select(Study)).one()
        both = instance_set_hash([f"{STUDY}.1.1", f"{STUDY}.1.2"])
        assert (study.state, study.settle_due, study.set_hash, study.version, study.analysis) == (
            StudyState.COLLECTING.value, DUE, both, 0, {})
        jobs = {job.id: job for job in session.scalars(select(Job))}
        assert jobs[first.job_id].state == JobState.CANCELLED.value  # the set it named is not the study's any more
        job = jobs[second.job_id]
        assert (job.kind, job.state, job.dedupe_key, job.sop_instance_uid, job.payload, job.max_attempts,
                job.not_before, job.created_at, job.attempts) == (
            "analyse", "queued", f"analyse:study:{STUDY}:{both}", f"{STUDY}.1.2",
            {"study_instance_uid": STUDY, "set_hash": both}, 3, DUE, NOW, 0)


def test_an_instance_not_to_analyse_gets_its_row_only(sessions: sessionmaker[Session], received) -> None:
    recorder, engine = received
    fields = _fields(1) | {"disposition": Disposition.NOT_PROCESSED, "reason": "not a chest"}
    with driver_transaction(engine) as connection:
        assert recorder.record(connection, _record(1), fields, None) == Recorded(True)
    with sessions() as session:
        assert session.scalars(select(Instance.reason)).one() == "not a chest"
        assert session.scalars(select(Study)).all() == [] and session.scalars(select(Job)).all() == []


def test_a_statement_refused_by_the_driver_raises_sqlalchemys_error(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'empty.sqlite3'}")  # no schema
    statement = DriverStatement(select(Instance.id).where(Instance.sop_instance_uid == "x"), engine.dialect)
    with driver_connection(engine) as connection, pytest.raises(DBAPIError, match="no such table"):
        statement.execute(connection, {})
    needs_id = DriverStatement(select(Instance.id).where(Instance.id == bindparam("id")), engine.dialect)
    with driver_connection(engine) as connection, pytest.raises(KeyError):  # a parameter not given is never NULL
        needs_id.execute(connection, {})
    engine.dispose()


def test_a_driver_transaction_commits_or_rolls_back(sessions: sessionmaker[Session], received) -> None:
    recorder, engine = received
    with pytest.raises(RuntimeError), driver_transaction(engine) as connection:
        recorder.record(connection, _record(1), _fields(1), None)
        raise RuntimeError("the unit failed")
    with driver_transaction(engine) as connection:
        assert not recorder.exists(connection, f"{STUDY}.1.1")
        recorder.record(connection, _record(2), _fields(2), None)
    with sessions() as session:
        assert session.scalars(select(Instance.sop_instance_uid)).all() == [f"{STUDY}.1.2"]


def _add_jobs(sessions: sessionmaker[Session], keys_and_states: list[tuple[str, str]]) -> None:
    queue = JobQueue(sessions, clock=lambda: NOW)
    with sessions.begin() as session:
        session.execute(insert(Job), [
            queue.job_row(kind="analyse", sop_instance_uid="1.2.3", dedupe_key=key) | {"state": state}
            for key, state in keys_and_states])


def test_only_the_studys_waiting_jobs_of_other_sets_are_cancelled(sessions: sessionmaker[Session], received) -> None:
    recorder, engine = received
    others = {
        f"analyse:study:{STUDY}:queued": ("queued", "cancelled"),
        f"analyse:study:{STUDY}:failed": ("failed", "cancelled"),
        f"analyse:study:{STUDY}:running": ("running", "running"),
        f"analyse:study:{STUDY}:done": ("done", "done"),
        f"analyse:study:{STUDY}1:queued": ("queued", "queued"),  # another study, whose UID starts with this one
        f"analyse:study:{STUDY[:-1]}:queued": ("queued", "queued"),
        f"analyse:study:{STUDY.replace('.', '_')}:queued": ("queued", "queued"),  # LIKE's wildcard
        f"export:{STUDY}:queued": ("queued", "queued"),
    }
    _add_jobs(sessions, [(key, before) for key, (before, _) in others.items()])
    with driver_transaction(engine) as connection:
        recorded = recorder.record(connection, _record(1), _fields(1), StudyAnalysis("analyse:study:", DUE, 3))
    with sessions() as session:
        states = {job.dedupe_key: job.state for job in session.scalars(select(Job))}
        assert states.pop(session.get(Job, recorded.job_id).dedupe_key) == "queued"
    assert states == {key: after for key, (_, after) in others.items()}


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_recording_an_image_costs_the_same_whatever_the_backlog_of_waiting_jobs(sessions: sessionmaker[Session],
                                                                               received) -> None:
    """SQLite ran the cancellation of a study's other sets by walking every waiting job; now by the
    unique index on ``dedupe_key`` (counted in SQLite's virtual machine steps)."""
    recorder, engine = received
    analysis = StudyAnalysis("analyse:study:", DUE, 3)

    def steps(n: int) -> int:
        record = _record(n)
        record = InstanceRecord(**{**vars(record), "study_instance_uid": f"{STUDY}.{n}"})
        calls = 0

        def count() -> int:
            nonlocal calls
            calls += 1
            return 0

        with driver_transaction(engine) as connection:
            connection.set_progress_handler(count, 100)
            recorder.record(connection, record, _fields(n), analysis)
            connection.set_progress_handler(None, 100)
        return calls

    steps(1)  # (statements prepared)
    alone = steps(2)
    _add_jobs(sessions, [(f"analyse:study:1.2.{i}:x", "queued") for i in range(3000)])
    assert steps(3) < alone * 2 + 20
