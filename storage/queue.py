"""The durable job queue: ``analyse`` and ``export`` work that survives crashes and restarts.

A job moves ``queued -> running -> done``; a failed attempt goes to ``failed`` (due again after an
exponential backoff with jitter) and, after ``max_attempts`` or a non-retryable error, to ``dead``, where
it waits for a person (``retry``). A worker owns a running job through a *lease* (``lease_owner`` and
``lease_expires_at``) that it renews with ``heartbeat``. When a worker dies its lease runs out and the
job becomes claimable again; a lost lease counts as an attempt, so a job that crashes every worker that
touches it ends up ``dead`` instead of looping forever. ``complete``, ``fail`` and ``heartbeat`` only act
while the caller still owns the lease: a worker that was presumed dead and replaced cannot overwrite the
new owner's result.

Claiming is safe with many workers: on SQLite the claim transaction begins with ``BEGIN IMMEDIATE`` (the
write lock is taken before the candidate rows are read, so claimers are serialised); on PostgreSQL the
candidates are selected ``FOR UPDATE SKIP LOCKED``, so concurrent claimers take disjoint rows without
waiting for each other.

All times are naive UTC from ``clock`` (the machines sharing one PostgreSQL database must keep their clocks
in sync, e.g. with NTP; leases are minutes long, so seconds of skew do not matter).
"""

from __future__ import annotations

import builtins
import logging
import random
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, Select, and_, bindparam, delete, func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.orm.attributes import flag_modified

from storage import history
from storage.db import insert_many_if_absent, insert_returning_id, make_sessionmaker, rowcount
from storage.schema import Job, JobKind, JobState, utcnow

log = logging.getLogger(__name__)

#: States a job can be claimed from (besides ``running`` with an expired lease).
_WAITING = (JobState.QUEUED.value, JobState.FAILED.value)
#: States ``purge`` removes by default: nothing will happen to these jobs any more.
FINISHED_STATES = (JobState.DONE, JobState.CANCELLED, JobState.DEAD)
#: ``last_error`` is kept to this many characters (a traceback can be long; the row should not be).
MAX_ERROR_CHARS = 4000

#: ``cancel_waiting``'s statement, built once (the listener runs it for every instance it receives);
#: parameters ``pattern`` (:func:`prefix_pattern`), ``keep`` and ``now``.
_JOBS = Job.__table__
CANCEL_WAITING = (
    update(_JOBS)
    .where(_JOBS.c.dedupe_key.like(bindparam("pattern"), escape="\\"), _JOBS.c.dedupe_key != bindparam("keep"),
           or_(*(_JOBS.c.state == state for state in _WAITING)))  # (an IN would compile to an expanding parameter)
    .values(state=JobState.CANCELLED.value, finished_at=bindparam("now"), updated_at=bindparam("now"),
            last_error="superseded by a later instance of the study")
)


def prefix_pattern(prefix: str) -> str:
    """The ``LIKE`` pattern (escape character ``\\``) matching every ``dedupe_key`` that starts with
    ``prefix``."""
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a job is retried: ``attempts`` in all, the first retry after
    ``first_delay_s``, each next delay ``growth`` times the previous one, never more than ``max_delay_s``."""

    attempts: int = 5
    first_delay_s: float = 10.0
    growth: float = 2.0
    max_delay_s: float = 3600.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.first_delay_s < 0 or self.growth < 1 or self.max_delay_s < self.first_delay_s:
            raise ValueError(f"need attempts >= 1, growth >= 1 and 0 <= first_delay_s <= max_delay_s: {self}")

    def ceiling(self, attempts: int) -> float:
        """The longest wait after ``attempts`` failed attempts (before jitter)."""
        exponent = max(attempts - 1, 0)
        if self.growth > 1 and exponent > 64:  # beyond any cap; avoids an overflowing power
            return self.max_delay_s
        return min(self.max_delay_s, self.first_delay_s * self.growth ** exponent)

    def patience_s(self) -> float:
        """Seconds from the first failure until the last attempt (without jitter): the outage survived."""
        return sum(self.ceiling(n) for n in range(1, self.attempts))


class JobNotFound(KeyError):
    """No job has this id (it may have been purged)."""


@dataclass(frozen=True)
class ClaimedJob:
    """What a worker needs to do one claimed job: a snapshot taken at claim time.

    ``attempts`` already counts this attempt (1 on the first claim)."""

    id: int
    kind: str
    sop_instance_uid: str
    destination: str | None
    payload: dict[str, Any]
    attempts: int
    max_attempts: int


@dataclass(frozen=True)
class JobRecord:
    """A full, detached snapshot of one job row, for the CLI, metrics and tests."""

    id: int
    kind: str
    state: str
    dedupe_key: str
    sop_instance_uid: str
    destination: str | None
    payload: dict[str, Any] = field(repr=False)
    priority: int
    attempts: int
    max_attempts: int
    not_before: datetime
    lease_owner: str | None
    lease_expires_at: datetime | None
    last_error: str | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def of(cls, job: Job) -> JobRecord:
        return cls(**{name: getattr(job, name) for name in cls.__dataclass_fields__})


#: What a claim reads of each candidate, and what :meth:`JobQueue.complete_in` reads of each job (a whole
#: :class:`JobRecord`). Claims and completions run for every batch of every worker and exporter thread:
#: their statements are built once, on the table, with the varying values as parameters, so they are
#: compiled once and run without the ORM's unit of work (which cost more than the SQL itself).
_CANDIDATE_COLUMNS = [_JOBS.c[name] for name in ("id", "kind", "state", "sop_instance_uid", "destination", "payload",
                                                 "attempts", "max_attempts", "lease_owner")]
_DUE = or_(and_(_JOBS.c.state.in_(_WAITING), _JOBS.c.not_before <= bindparam("now")),
           and_(_JOBS.c.state == JobState.RUNNING.value, _JOBS.c.lease_expires_at < bindparam("now")))
_CANDIDATES = (
    select(*_CANDIDATE_COLUMNS)
    .where(_JOBS.c.kind.in_(bindparam("kinds", expanding=True)), _DUE)
    .order_by(_JOBS.c.priority.desc(), _JOBS.c.created_at, _JOBS.c.id)
    .limit(bindparam("limit"))
)
#: The candidates of a claim that skips the jobs of some destinations (peers known to be down).
_CANDIDATES_SKIPPING = _CANDIDATES.where(or_(_JOBS.c.destination.is_(None),
                                             _JOBS.c.destination.not_in(bindparam("skipped", expanding=True))))
_TAKE = (
    update(_JOBS).where(_JOBS.c.id.in_(bindparam("ids", expanding=True)))
    .values(state=JobState.RUNNING.value, attempts=_JOBS.c.attempts + 1, lease_owner=bindparam("owner"),
            lease_expires_at=bindparam("expires"), started_at=bindparam("now"), updated_at=bindparam("now"))
)
_NOTE_RECLAIMED = (update(_JOBS).where(_JOBS.c.id == bindparam("job_id"))
                   .values(last_error=bindparam("note"), updated_at=bindparam("now")))  # the queue's clock
#: When the earliest waiting job of some kinds becomes due (an idle worker asks before every sleep).
_NEXT_DUE = select(func.min(_JOBS.c.not_before)).where(_JOBS.c.kind.in_(bindparam("kinds", expanding=True)),
                                                      _JOBS.c.state.in_(_WAITING))
_OWNED_COLUMNS = [_JOBS.c[name] for name in JobRecord.__dataclass_fields__]
_OWNED_BATCH = select(*_OWNED_COLUMNS).where(_JOBS.c.id.in_(bindparam("ids", expanding=True)),
                                             _JOBS.c.state == JobState.RUNNING.value,
                                             _JOBS.c.lease_owner == bindparam("owner"))
_DONE = (
    update(_JOBS).where(_JOBS.c.id == bindparam("job_id"))
    .values(state=JobState.DONE.value, lease_owner=None, lease_expires_at=None, last_error=None,
            payload=bindparam("new_payload", type_=_JOBS.c.payload.type), updated_at=bindparam("now"),
            finished_at=bindparam("now"))
)



def _value(enum_or_str: JobKind | JobState | str, enum: type[JobKind] | type[JobState]) -> str:
    """The stored string of a kind or state, refusing unknown ones with a clear error."""
    try:
        return enum(enum_or_str).value
    except ValueError:
        allowed = ", ".join(member.value for member in enum)
        raise ValueError(f"unknown job {enum.__name__[3:].lower()} {enum_or_str!r} (expected one of: {allowed})") \
            from None


class JobQueue:
    """The job queue on one database (see the module docstring for the life of a job).

    ``sessionmaker`` is the node's ordinary session factory; the queue derives a write factory from its
    engine so that its own transactions begin with ``BEGIN IMMEDIATE`` on SQLite. ``clock`` and ``rng``
    exist so tests can move time and pin the jitter.
    """

    def __init__(
        self,
        sessionmaker: sessionmaker[Session],
        *,
        lease_seconds: float = 300,
        backoff_base_s: float = 10,
        backoff_max_s: float = 3600,
        policy: RetryPolicy | None = None,
        clock: Callable[[], datetime] = utcnow,
        rng: random.Random | None = None,
    ) -> None:
        if lease_seconds <= 0:
            raise ValueError(f"lease_seconds must be positive, got {lease_seconds!r}")
        if backoff_base_s < 0 or backoff_max_s < backoff_base_s:
            raise ValueError(f"need 0 <= backoff_base_s <= backoff_max_s, got {backoff_base_s!r}, {backoff_max_s!r}")
        #: Used by ``fail`` when the caller names no policy of its own; ``policy`` wins over ``backoff_*``.
        self.default_policy = policy or RetryPolicy(first_delay_s=backoff_base_s, max_delay_s=backoff_max_s)
        bind = sessionmaker.kw.get("bind")
        if bind is None:
            raise ValueError("the sessionmaker must be bound to an engine (storage.db.make_sessionmaker)")
        self._read = sessionmaker
        self._write = make_sessionmaker(bind, immediate=True)
        self._write_engine: Engine = self._write.kw["bind"]
        self.lease = timedelta(seconds=lease_seconds)
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self._clock = clock
        self._rng = rng or random.Random()

    # -- producing -------------------------------------------------------------------------------

    def enqueue(
        self,
        session: Session,
        *,
        kind: JobKind | str,
        sop_instance_uid: str,
        dedupe_key: str,
        destination: str | None = None,
        payload: Mapping[str, Any] | None = None,
        max_attempts: int = 5,
        priority: int = 0,
        not_before: datetime | None = None,
    ) -> int | None:
        """Add a job inside the caller's transaction: its id (for log lines that follow the image), or
        ``None`` (and no new row) if ``dedupe_key`` exists.

        Uses ``INSERT ... ON CONFLICT DO NOTHING``, so a duplicate neither raises nor aborts the caller's
        transaction (on PostgreSQL an IntegrityError would poison it). Higher ``priority`` runs first;
        ``not_before`` (naive UTC) delays it, e.g. until a study has settled.
        """
        values = self.job_row(kind=kind, sop_instance_uid=sop_instance_uid, dedupe_key=dedupe_key,
                           destination=destination, payload=payload, max_attempts=max_attempts, priority=priority,
                           not_before=not_before)
        return insert_returning_id(session, Job, values, "dedupe_key")

    def enqueue_many(self, session: Session, jobs: builtins.list[Mapping[str, Any]]) -> None:
        """:meth:`enqueue` for many jobs inside the caller's transaction, in one statement executed for all
        (each mapping holds ``enqueue``'s keyword arguments); a ``dedupe_key`` that exists is skipped the
        same way. No ids come back: a batch of export jobs is logged by its results."""
        insert_many_if_absent(session, Job, [self.job_row(**job) for job in jobs], "dedupe_key")

    def job_row(self, *, kind: JobKind | str, sop_instance_uid: str, dedupe_key: str, destination: str | None = None,
             payload: Mapping[str, Any] | None = None, max_attempts: int = 5, priority: int = 0,
             not_before: datetime | None = None) -> dict[str, Any]:
        """A new job's row, as :meth:`enqueue` inserts it (``storage.receiving`` inserts the listener's
        analysis jobs itself, with a statement compiled once)."""
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {max_attempts!r}")
        now = self._clock()
        return dict(
            kind=_value(kind, JobKind),
            state=JobState.QUEUED.value,
            dedupe_key=dedupe_key,
            sop_instance_uid=sop_instance_uid,
            destination=destination,
            payload=dict(payload or {}),
            priority=priority,
            attempts=0,
            max_attempts=max_attempts,
            not_before=not_before or now,
            created_at=now,
            updated_at=now,
        )

    def cancel_waiting(self, session: Session, dedupe_prefix: str, keep: str) -> int:
        """Inside the caller's transaction, cancel the not yet started jobs whose ``dedupe_key`` starts with
        ``dedupe_prefix``, except ``keep``: the analysis of a study's earlier set of instances, made moot
        by a later one. Returns how many were cancelled."""
        now = self._clock()
        result = session.connection(bind_arguments={"mapper": Job}).execute(
            CANCEL_WAITING, {"pattern": prefix_pattern(dedupe_prefix), "keep": keep, "now": now})
        return rowcount(result)

    # -- working ---------------------------------------------------------------------------------

    def claim(self, worker_id: str, kinds: Iterable[JobKind | str], limit: int = 1,
              skip_destinations: Iterable[str] = ()) -> list[ClaimedJob]:
        """Take up to ``limit`` due jobs of ``kinds`` for ``worker_id``: highest priority, then oldest.

        Due means ``queued``/``failed`` whose ``not_before`` has passed, or ``running`` with an expired
        lease (its worker is presumed dead). A job whose lease expired on its last allowed attempt goes
        to ``dead`` instead of being claimed. Jobs for ``skip_destinations`` (peers known to be down) stay
        where they are, spending no attempt, until their peer answers again.
        """
        kinds = [_value(kind, JobKind) for kind in kinds]
        if not kinds or limit < 1:
            return []
        skipped = sorted(set(skip_destinations))
        candidates = _locked(_CANDIDATES_SKIPPING if skipped else _CANDIDATES)
        claimed: list[ClaimedJob] = []
        with self._writing(durable=False) as (session, now):
            connection = session.connection(bind_arguments={"mapper": Job})
            while len(claimed) < limit:
                rows = connection.execute(candidates, {"kinds": kinds, "now": now, "limit": limit - len(claimed),
                                                       "skipped": skipped}).all()
                if not rows:
                    break
                taken, reclaimed, buried = [], [], False
                for row in rows:
                    if row.state == JobState.RUNNING.value:
                        if row.attempts >= row.max_attempts:
                            job = session.get(Job, row.id)
                            assert job is not None  # locked by this transaction
                            self._bury(job, now, f"lease of {row.lease_owner} expired on the last attempt")
                            buried = True
                            continue
                        reclaimed.append({"job_id": row.id, "now": now,
                                          "note": f"lease of {row.lease_owner} expired; reclaimed by {worker_id}"})
                    taken.append(row.id)
                    claimed.append(ClaimedJob(row.id, row.kind, row.sop_instance_uid, row.destination,
                                              dict(row.payload or {}), row.attempts + 1, row.max_attempts))
                if taken:
                    connection.execute(_TAKE, {"ids": taken, "owner": worker_id, "expires": now + self.lease,
                                               "now": now})
                if reclaimed:
                    connection.execute(_NOTE_RECLAIMED, reclaimed)
                if buried:
                    session.flush()  # the next candidates are read without the jobs just buried
        return claimed

    def heartbeat(self, job_id: int, worker_id: str) -> bool:
        """Extend ``worker_id``'s lease on ``job_id``; ``False`` when the lease was lost (stop working).
        Not made durable at commit, as a claim (:meth:`_writing`)."""
        with self._writing(durable=False) as (session, now):
            result = session.execute(
                update(Job)
                .where(Job.id == job_id, Job.state == JobState.RUNNING.value, Job.lease_owner == worker_id)
                .values(lease_expires_at=now + self.lease, updated_at=now)
            )
            return rowcount(result) == 1

    def complete(self, job_id: int, worker_id: str, payload_update: Mapping[str, Any] | None = None) -> bool:
        """Mark ``job_id`` done, merging ``payload_update`` into its payload; ``False`` if the lease was lost."""
        with self._writing() as (session, _now):
            return self.complete_in(session, [(job_id, payload_update)], worker_id) != [None]

    def complete_in(self, session: Session, done: Iterable[tuple[int, Mapping[str, Any] | None]],
                    worker_id: str) -> builtins.list[JobRecord | None]:
        """:meth:`complete` of each ``(job_id, payload_update)`` inside the caller's write transaction, so
        jobs are marked done in the commit that records their results, and a batch of them costs one
        commit and a few statements instead of a commit and four statements each; per job, the job as it
        is now, or ``None`` if its lease was lost."""
        done = builtins.list(done)
        if not done:
            return []
        now = self._clock()
        connection = session.connection(bind_arguments={"mapper": Job})
        owned = {row.id: row._asdict() for row in connection.execute(
            _locked(_OWNED_BATCH, skip_locked=False), {"ids": [job_id for job_id, _ in done], "owner": worker_id})}
        records: builtins.list[JobRecord | None] = []
        finished: builtins.list[JobRecord] = []
        for job_id, payload_update in done:
            row = owned.get(job_id)
            if row is None:  # its lease was lost
                records.append(None)
                continue
            if payload_update:
                row["payload"] = {**(row["payload"] or {}), **payload_update}
            row.update(state=JobState.DONE.value, lease_owner=None, lease_expires_at=None, last_error=None,
                       updated_at=now, finished_at=now)
            record = JobRecord(**row)
            records.append(record)
            finished.append(record)
        if finished:
            connection.execute(_DONE, [{"job_id": record.id, "new_payload": record.payload, "now": now}
                                       for record in finished])
            history.record_jobs(session, finished, now)
        return records

    def fail(self, job_id: int, worker_id: str, error: str, retryable: bool = True,
             policy: RetryPolicy | None = None) -> JobState:
        """Record a failed attempt: ``failed`` (due again after ``policy``'s delay, the queue's default
        policy if none) or ``dead`` when out of attempts or not retryable. Returns the job's state
        afterwards; if the lease was lost the job is left alone and its current state (another owner's)
        is returned.
        """
        with self._writing() as (session, now):
            job = self._owned(session, job_id, worker_id)
            if job is None:
                current = session.get(Job, job_id)
                if current is None:
                    raise JobNotFound(job_id)
                log.warning("job %s: %s lost its lease before failing it; failure not recorded", job_id, worker_id)
                return JobState(current.state)
            error = error[:MAX_ERROR_CHARS]
            if not retryable or job.attempts >= job.max_attempts:
                self._bury(job, now, error)
            else:
                _end_attempt(job, JobState.FAILED, now, error)
                job.not_before = now + timedelta(seconds=self.backoff_delay(job.attempts, policy))
                history.record_job(session, job, now)
            return JobState(job.state)

    def backoff_delay(self, attempts: int, policy: RetryPolicy | None = None) -> float:
        """Seconds to wait after ``attempts`` failed attempts: ``first * growth**(attempts-1)``, capped,
        with "equal jitter" (a uniform draw in the upper half) so that jobs which failed together
        (a destination down) do not all retry in the same second."""
        ceiling = (policy or self.default_policy).ceiling(attempts)
        return ceiling / 2 + self._rng.uniform(0, ceiling / 2)

    # -- housekeeping ----------------------------------------------------------------------------

    def reclaim_expired(self) -> int:
        """Return jobs whose lease expired to the queue (``failed``, due now) or bury them (``dead``) if
        that was their last attempt. ``claim`` does this on the fly; housekeeping calls it so that counts
        and the doctor show the truth. Returns how many jobs were reclaimed or buried."""
        with self._writing() as (session, now):
            jobs = session.scalars(_locked(select(Job).where(self._expired(now)))).all()
            for job in jobs:
                self._hand_back(session, job, now, f"lease of {job.lease_owner} expired")
            return len(jobs)

    def release_owner(self, owner: str) -> int:
        """Hand back at once every job leased by ``owner`` or its threads (``owner/...``), which is known
        to be dead (the supervisor saw its process exit): due now, the lost attempt counted, buried if it
        was the last. Returns how many jobs were released."""
        with self._writing() as (session, now):
            jobs = session.scalars(_locked(select(Job).where(
                Job.state == JobState.RUNNING.value,
                or_(Job.lease_owner == owner, Job.lease_owner.startswith(f"{owner}/", autoescape=True))))).all()
            for job in jobs:
                self._hand_back(session, job, now, f"{job.lease_owner} died while holding the lease")
            return len(jobs)

    def release_destination(self, destination: str) -> int:
        """Make every waiting export job for ``destination`` due now (its peer answers again after an
        outage: no reason to wait out each job's backoff). Returns how many."""
        with self._writing() as (session, now):
            result = session.execute(
                update(Job)
                .where(Job.kind == JobKind.EXPORT.value, Job.destination == destination,
                       Job.state.in_(_WAITING), Job.not_before > now)
                .values(not_before=now, updated_at=now)
                .execution_options(synchronize_session=False)
            )
            return rowcount(result)

    def oldest_waiting_age_s(self) -> dict[str, float]:
        """Per kind, how long the oldest queued or failed job has waited since it was created (seconds)."""
        with self._read() as session:
            rows = session.execute(select(Job.kind, func.min(Job.created_at))
                                   .where(Job.state.in_(_WAITING)).group_by(Job.kind)).all()
        now = self._clock()
        return {kind: max((now - oldest).total_seconds(), 0.0) for kind, oldest in rows if oldest is not None}

    def retry(self, job_id: int) -> bool:
        """Put a ``failed``, ``dead``, ``cancelled`` or ``done`` job back in the queue with a fresh set of
        attempts (a done job runs again: an image analysed anew, a result sent again)."""
        return self._requeue(Job.id == job_id, also_done=True) == 1

    def requeue_for(self, kind: JobKind | str, sop_instance_uids: Iterable[str],
                    destination: str | None = None) -> int:
        """Run again every job of ``kind`` about these instances (only those to ``destination`` when
        given), done ones included; a running job is left to finish. Returns how many were queued."""
        uids = list(sop_instance_uids)
        if not uids:
            return 0
        condition = and_(Job.kind == _value(kind, JobKind), Job.sop_instance_uid.in_(uids))
        if destination is not None:
            condition = and_(condition, Job.destination == destination)
        return self._requeue(condition, also_done=True)

    def retry_all_failed(self) -> int:
        """Put every ``failed`` and ``dead`` job back in the queue with fresh attempts; returns how many."""
        return self._requeue(Job.state.in_([JobState.FAILED.value, JobState.DEAD.value]))

    def cancel(self, job_id: int) -> bool:
        """Cancel a job that is not finished. A running job's worker loses its lease, so its
        ``complete``/``fail`` will be refused (work it already did, such as a sent C-STORE, stays done)."""
        with self._writing() as (session, now):
            result = session.execute(
                update(Job)
                .where(Job.id == job_id, Job.state.in_([*_WAITING, JobState.RUNNING.value, JobState.DEAD.value]))
                .values(state=JobState.CANCELLED.value, lease_owner=None, lease_expires_at=None,
                        finished_at=now, updated_at=now)
            )
            return rowcount(result) == 1

    def purge(self, older_than: timedelta, states: Iterable[JobState | str] = FINISHED_STATES) -> int:
        """Delete jobs in ``states`` last changed more than ``older_than`` ago; returns how many."""
        values = [_value(state, JobState) for state in states]
        if not values:
            return 0
        with self._writing() as (session, now):
            cutoff = now - older_than
            result = session.execute(delete(Job).where(Job.state.in_(values), Job.updated_at < cutoff))
            return rowcount(result)

    # -- looking ---------------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Number of jobs in every state (all states present, zeros included)."""
        with self._read() as session:
            rows = session.execute(select(Job.state, func.count()).group_by(Job.state)).all()
        counts = {state.value: 0 for state in JobState}
        counts.update({state: number for state, number in rows})
        return counts

    def depth(self) -> builtins.list[tuple[str, str, int]]:
        """(kind, state, count) for every kind and state present: the ``pacs_node_queue_jobs`` gauge."""
        with self._read() as session:
            rows = session.execute(select(Job.kind, Job.state, func.count()).group_by(Job.kind, Job.state))
            return [(kind, state, int(n)) for kind, state, n in rows]

    def list(
        self, state: JobState | str | None = None, kind: JobKind | str | None = None, limit: int = 100,
        *, destination: str | None = None, sop_instance_uids: Iterable[str] | None = None, offset: int = 0,
    ) -> builtins.list[JobRecord]:
        """The newest ``limit`` jobs (after skipping ``offset``), optionally only those in ``state``, of
        ``kind``, to ``destination`` and/or about ``sop_instance_uids``."""
        query = select(Job).order_by(Job.id.desc()).offset(offset).limit(limit)
        if state is not None:
            query = query.where(Job.state == _value(state, JobState))
        if kind is not None:
            query = query.where(Job.kind == _value(kind, JobKind))
        if destination is not None:
            query = query.where(Job.destination == destination)
        if sop_instance_uids is not None:
            query = query.where(Job.sop_instance_uid.in_(builtins.list(sop_instance_uids)))
        with self._read() as session:
            return [JobRecord.of(job) for job in session.scalars(query)]

    def next_due(self, kinds: Iterable[JobKind | str]) -> datetime | None:
        """When the earliest waiting job of ``kinds`` becomes due (a study settling): an idle worker
        sleeps until then rather than until its next poll."""
        values = [_value(kind, JobKind) for kind in kinds]
        with self._read() as session:
            return session.connection(bind_arguments={"mapper": Job}).execute(_NEXT_DUE, {"kinds": values}).scalar()

    def destinations(self) -> builtins.list[dict[str, Any]]:
        """Per export destination: jobs in each state, and the newest error of a failed or dead job —
        what an operator looks at to see which peer is failing."""
        with self._read() as session:
            rows = session.execute(
                select(Job.destination, Job.state, func.count())
                .where(Job.kind == JobKind.EXPORT.value).group_by(Job.destination, Job.state)
            ).all()
            summary: dict[str, dict[str, Any]] = {}
            for destination, state, number in rows:
                entry = summary.setdefault(destination or "", {"destination": destination or "",
                                                               "counts": {s.value: 0 for s in JobState},
                                                               "last_error": None})
                entry["counts"][state] = number
            for entry in summary.values():
                failing = [JobState.FAILED.value, JobState.DEAD.value]
                if any(entry["counts"][state] for state in failing):
                    entry["last_error"] = session.scalars(
                        select(Job.last_error)
                        .where(Job.kind == JobKind.EXPORT.value, Job.destination == entry["destination"],
                               Job.state.in_(failing))
                        .order_by(Job.updated_at.desc()).limit(1)
                    ).first()
        return sorted(summary.values(), key=lambda entry: entry["destination"])

    def get(self, job_id: int) -> JobRecord | None:
        with self._read() as session:
            job = session.get(Job, job_id)
            return None if job is None else JobRecord.of(job)

    def for_instance(self, sop_instance_uid: str) -> builtins.list[JobRecord]:
        """Every job about one SOP instance, oldest first (``queue show``, tests, the doctor)."""
        with self._read() as session:
            jobs = session.scalars(select(Job).where(Job.sop_instance_uid == sop_instance_uid).order_by(Job.id))
            return [JobRecord.of(job) for job in jobs]

    # -- internals -------------------------------------------------------------------------------

    @contextmanager
    def _writing(self, *, durable: bool = True) -> Iterator[tuple[Session, datetime]]:
        """A write transaction and its "now", read only once the transaction holds the write lock (on
        SQLite a claimer may wait for it), so leases and due times are measured from when it acts.

        ``durable=False`` is for what only takes or renews a lease (a claim, a heartbeat): its commit does
        not wait for the disk (SQLite ``synchronous=NORMAL``, PostgreSQL ``synchronous_commit = off``).
        Both databases keep the order of commits across a crash of the machine, so what such a crash can
        lose is the latest leases, never a result recorded after them: the commit that records a job's
        results waits for the disk, and with it for every commit before it. A lost lease costs one
        attempt's work, done again (an analysis is at least once anyway), and not one attempt of the job's
        count. Every other transaction stays durable at commit (a C-STORE is acknowledged after its own)."""
        if durable:
            with self._write.begin() as session:
                session.connection()  # emits BEGIN (IMMEDIATE on SQLite), waiting for the lock if need be
                yield session, self._clock()
            return
        with self._write_engine.connect() as connection:
            if connection.dialect.name == "sqlite":
                with _sqlite_commits_unsynced(connection), Session(connection, expire_on_commit=False) as session, \
                        session.begin():
                    session.connection()  # BEGIN IMMEDIATE
                    yield session, self._clock()
                return
            with Session(connection, expire_on_commit=False) as session, session.begin():
                session.connection().exec_driver_sql("SET LOCAL synchronous_commit TO OFF")  # this transaction only
                yield session, self._clock()

    def _due(self, now: datetime):  # noqa: ANN202 (SQL expression)
        return or_(and_(Job.state.in_(_WAITING), Job.not_before <= now), self._expired(now))

    @staticmethod
    def _expired(now: datetime):  # noqa: ANN205 (SQL expression)
        return and_(Job.state == JobState.RUNNING.value, Job.lease_expires_at < now)

    @staticmethod
    def _owned(session: Session, job_id: int, worker_id: str) -> Job | None:
        job = session.scalars(
            _locked(select(Job).where(Job.id == job_id, Job.state == JobState.RUNNING.value,
                                      Job.lease_owner == worker_id), skip_locked=False)
        ).one_or_none()
        return job

    def _hand_back(self, session: Session, job: Job, now: datetime, message: str) -> None:
        """A running job whose owner is gone: due again now, or dead if that was its last attempt."""
        if job.attempts >= job.max_attempts:
            self._bury(job, now, message + " on the last attempt")
        else:
            _end_attempt(job, JobState.FAILED, now, message)
            job.not_before = now
            history.record_job(session, job, now)

    @staticmethod
    def _bury(job: Job, now: datetime, error: str) -> None:
        _end_attempt(job, JobState.DEAD, now, error)
        job.finished_at = now
        history.record_job(Session.object_session(job), job, now)
        log.warning("job %s (%s) is dead after %s attempt(s)", job.id, job.kind, job.attempts)

    def _requeue(self, condition, *, also_done: bool = False) -> int:  # noqa: ANN001 (SQL expression)
        states = [*_WAITING, JobState.DEAD.value, JobState.CANCELLED.value]
        if also_done:
            states.append(JobState.DONE.value)
        with self._writing() as (session, now):
            result = session.execute(
                update(Job)
                .where(condition, Job.state.in_(states))
                .values(state=JobState.QUEUED.value, attempts=0, not_before=now, lease_owner=None,
                        lease_expires_at=None, finished_at=None, updated_at=now)
                .execution_options(synchronize_session=False)
            )
            return rowcount(result)


@contextmanager
def _sqlite_commits_unsynced(connection: Connection) -> Iterator[None]:
    """The SQLite ``connection``'s commits until the block ends without an fsync (``synchronous=NORMAL``,
    which may only change outside a transaction: set on the driver's connection before ``BEGIN``, ``FULL``
    again after the transaction ended). A connection that cannot be set back is discarded, never pooled."""
    driver = connection.connection.dbapi_connection
    assert driver is not None  # checked out by ``connection``
    driver.execute("PRAGMA synchronous=NORMAL")
    try:
        yield
    finally:
        try:
            driver.execute("PRAGMA synchronous=FULL")
        except BaseException:
            connection.invalidate()
            raise


def _locked(query: Select, *, skip_locked: bool = True) -> Select:
    """Row-lock the selected jobs on PostgreSQL (``FOR UPDATE [SKIP LOCKED]``); SQLite ignores the
    clause and relies on the ``BEGIN IMMEDIATE`` write lock the queue's sessions hold instead."""
    return query.with_for_update(skip_locked=skip_locked)


def _end_attempt(job: Job, state: JobState, now: datetime, error: str | None) -> None:
    """Close the running attempt of ``job``: its new state, the lease released, the attempt's error."""
    job.state = state.value
    job.lease_owner = None
    job.lease_expires_at = None
    job.last_error = error
    job.updated_at = now
    # Written even when it equals the value already there (a claim stamped it with the same clock): else
    # the column's onupdate would put the wall clock in its place.
    flag_modified(job, "updated_at")
