"""Recording a received instance: its row and, for an image to analyse, its study (re-)opened and the
study's analysis job, in the caller's transaction; and the duplicate check before it.

The listener runs these for every C-STORE it answers, so they are what a tiny instance costs in
statements: each one is compiled once per dialect and run on the driver's cursor
(:class:`storage.db.DriverStatement`), not through SQLAlchemy's execution of a statement or an ORM
session. The statements are the ones :mod:`storage.repository`, :mod:`storage.studies` and
:class:`storage.queue.JobQueue` run for the same purpose, in the same order, so the rows are the same:

1. ``INSERT`` the instance ``ON CONFLICT DO NOTHING`` (nothing else happens for a known one);
2. for an image to analyse: upsert the study (first: on PostgreSQL it locks the study's row, so two
   associations delivering one study are serialised; SQLite's ``BEGIN IMMEDIATE`` already is), read the
   study's images, cancel the study's waiting jobs of other sets, insert the job of this set, and record
   the set as the study's pending one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Engine, Table, bindparam, select

from storage.db import DriverStatement, driver_connection, idempotent_insert
from storage.queue import _WAITING, CANCEL_WAITING, JobQueue, prefix_pattern
from storage.repository import InstanceRecord, instance_values
from storage.schema import Instance, Job, JobKind, StudyState
from storage.studies import SET_PENDING, STUDY_IMAGE_UIDS, touch_statement, instance_set_hash

_INSTANCES = cast(Table, Instance.__table__)
_INSTANCE_BY_UID = select(_INSTANCES.c.id).where(_INSTANCES.c.sop_instance_uid == bindparam("uid")).limit(1)
_JOBS = cast(Table, Job.__table__)
#: The jobs whose ``dedupe_key`` lies in a range, by the unique index on it: on SQLite, the study's jobs
#: of other sets are found this way and cancelled one by one (``CANCEL_WAITING`` and the job's id), as
#: its planner runs ``CANCEL_WAITING``'s ``LIKE`` by walking every waiting job (the state index), a cost
#: per C-STORE that grew with the backlog (0.2 ms at 1,000 waiting jobs).
_JOBS_IN_RANGE = select(_JOBS.c.id, _JOBS.c.state).where(_JOBS.c.dedupe_key >= bindparam("low"),
                                                         _JOBS.c.dedupe_key < bindparam("high"))
_CANCEL_ONE = CANCEL_WAITING.where(_JOBS.c.id == bindparam("id"))
_STUDY_COLUMNS = ["study_instance_uid", "state", "first_received_at", "last_received_at", "settle_due", "version",
                  "analysis"]


@dataclass(frozen=True)
class StudyAnalysis:
    """The analysis a received image asks for: its study's job, due when the study has been quiet until
    ``due``, named ``<job_prefix><Study Instance UID>:<set hash>``."""

    job_prefix: str
    due: datetime
    max_attempts: int


@dataclass(frozen=True)
class Recorded:
    """What :meth:`ReceivedInstances.record` did: whether the row is new, and the analysis job's id (``None``
    when none was inserted: not an image to analyse, or the same set's job exists)."""

    inserted: bool
    job_id: int | None = None


class ReceivedInstances:
    """The receiving statements of one database, compiled for its dialect when first run."""

    def __init__(self, engine: Engine, queue: JobQueue, clock: Callable[[], datetime]) -> None:
        self._engine = engine
        self._dialect = engine.dialect
        self._queue = queue
        self._clock = clock
        self._statements: dict[object, DriverStatement] = {}

    def _statement(self, key: object, build: Callable[[], Any],
                   column_keys: list[str] | None = None) -> DriverStatement:
        statement = self._statements.get(key)
        if statement is None:
            statement = self._statements[key] = DriverStatement(build(), self._dialect, column_keys)
        return statement

    def exists(self, connection: Any, sop_instance_uid: str) -> bool:
        """Whether an instance with this SOP Instance UID is recorded (the check before its file is filed);
        ``connection`` is a pooled DBAPI connection (``Engine.raw_connection()``)."""
        cursor = self._statement("exists", lambda: _INSTANCE_BY_UID).execute(connection, {"uid": sop_instance_uid})
        return cursor.fetchone() is not None

    def known(self, sop_instance_uid: str) -> bool:
        """:meth:`exists`, on a pooled connection of its own."""
        with driver_connection(self._engine) as connection:
            return self.exists(connection, sop_instance_uid)

    def record(self, connection: Any, record: InstanceRecord, fields: dict[str, Any],
               analysis: StudyAnalysis | None) -> Recorded:
        """Insert the instance's row (``record`` and the storage ``fields``, as
        :func:`storage.repository.add_instance` takes them) and, with ``analysis``, (re-)open its study
        and enqueue the analysis of the study's new set of instances, inside ``connection``'s transaction
        (a pooled DBAPI connection, :func:`storage.db.driver_transaction`)."""
        now = self._clock()
        row = instance_values(record, {"received_at": now, **fields})
        if not self._insert(connection, Instance, row, "sop_instance_uid"):
            return Recorded(False)
        if analysis is None:
            return Recorded(True)
        study = record.study_instance_uid
        dialect = self._dialect.name
        self._statement("touch", lambda: touch_statement(dialect), _STUDY_COLUMNS).execute(connection, {
            "study_instance_uid": study, "state": StudyState.COLLECTING.value, "first_received_at": now,
            "last_received_at": now, "settle_due": analysis.due, "version": 0, "analysis": {}})
        uids = self._statement("images", lambda: STUDY_IMAGE_UIDS).execute(connection, {"study": study}).fetchall()
        set_hash = instance_set_hash(uid for (uid,) in uids)
        key = f"{analysis.job_prefix}{study}:{set_hash}"
        self._cancel_other_sets(connection, f"{analysis.job_prefix}{study}:", key, now)
        job = self._queue.job_row(kind=JobKind.ANALYSE, sop_instance_uid=record.sop_instance_uid, dedupe_key=key,
                                  payload={"study_instance_uid": study, "set_hash": set_hash},
                                  max_attempts=analysis.max_attempts, not_before=analysis.due)
        job_id = self._insert(connection, Job, job, "dedupe_key")
        self._statement("pending", lambda: SET_PENDING).execute(connection, {"study": study,
                                                                             "pending_set_hash": set_hash})
        return Recorded(True, job_id)

    def _cancel_other_sets(self, connection: Any, prefix: str, keep: str, now: datetime) -> None:
        """Cancel the waiting jobs whose ``dedupe_key`` starts with ``prefix``, but ``keep``
        (:meth:`storage.queue.JobQueue.cancel_waiting`'s statement); on SQLite each found by the unique
        index first (SQLite compares text by its bytes, so the range holds exactly the keys that start
        with ``prefix``, which ends with ``:``)."""
        params = {"pattern": prefix_pattern(prefix), "keep": keep, "now": now}
        if self._dialect.name != "sqlite":
            self._statement("cancel", lambda: CANCEL_WAITING).execute(connection, params)
            return
        found = self._statement("jobs in range", lambda: _JOBS_IN_RANGE).execute(
            connection, {"low": prefix, "high": prefix[:-1] + chr(ord(prefix[-1]) + 1)}).fetchall()
        for job_id, state in found:
            if state in _WAITING:
                self._statement("cancel one", lambda: _CANCEL_ONE).execute(connection, {**params, "id": job_id})

    def _insert(self, connection: Any, model: type[Any], row: dict[str, Any], key: str) -> Any | None:
        """``INSERT ... ON CONFLICT (key) DO NOTHING``: the new row's id, ``None`` when ``key`` existed."""
        table = cast(Table, model.__table__)
        columns = tuple(row)
        returning = bool(self._dialect.insert_returning)
        statement = self._statement(("insert", table.name, columns), lambda: idempotent_insert(
            table, self._dialect.name, key, returning), list(columns))
        cursor = statement.execute(connection, row)
        if returning:  # rowcount of an INSERT is not reliable on every driver
            found = cursor.fetchone()
            return None if found is None else found[0]
        return cursor.lastrowid if cursor.rowcount == 1 else None  # SQLite before 3.35
