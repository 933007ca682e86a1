"""The database schema: received and produced instances, and the durable job queue.

Timestamps are naive UTC (``utcnow()``) so that SQLite and PostgreSQL compare them the same way.
Changing this module means adding an Alembic revision under ``storage/migrations/versions``.
"""

from __future__ import annotations

import enum
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, Index, Integer, MetaData, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    """Naive UTC now: the one clock every row uses."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


#: Deterministic constraint names, so that later migrations can drop or alter a constraint by name on
#: every database (SQLite's batch mode needs the names; PostgreSQL would otherwise invent its own).
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Origin(str, enum.Enum):
    RECEIVED = "received"  # came in by C-STORE
    RESULT = "result"  # produced by this node (SR, KOS, GSPS)


class Disposition(str, enum.Enum):
    """What the acceptance policy decided for a received instance."""

    QUEUED = "queued"  # a chest radiograph: an analyse job exists
    NOT_PROCESSED = "not_processed"  # kept, but not analysed (``reason`` says why)
    RESULT = "result"  # one of our own result objects


class JobKind(str, enum.Enum):
    ANALYSE = "analyse"  # run the pipeline on one study's set of instances and build its result objects
    EXPORT = "export"  # C-STORE one result object to one destination


class JobState(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"  # last attempt failed; will be retried after ``not_before``
    DEAD = "dead"  # out of attempts or not retryable: needs a person (``queue retry``)
    CANCELLED = "cancelled"


class Instance(Base):
    """One stored SOP instance, received or produced. Holds the attributes C-FIND matches on."""

    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    # patient / study / series / image level attributes for query-retrieve
    patient_id: Mapped[str | None] = mapped_column(String(64), index=True)
    patient_name: Mapped[str | None] = mapped_column(String(324))
    patient_birth_date: Mapped[str | None] = mapped_column(String(8))
    patient_sex: Mapped[str | None] = mapped_column(String(16))
    study_date: Mapped[str | None] = mapped_column(String(8))
    study_time: Mapped[str | None] = mapped_column(String(16))
    accession_number: Mapped[str | None] = mapped_column(String(16))
    study_id: Mapped[str | None] = mapped_column(String(16))
    study_description: Mapped[str | None] = mapped_column(String(64))
    referring_physician_name: Mapped[str | None] = mapped_column(String(324))
    modality: Mapped[str | None] = mapped_column(String(16))
    series_number: Mapped[int | None] = mapped_column(Integer)
    series_description: Mapped[str | None] = mapped_column(String(64))
    body_part_examined: Mapped[str | None] = mapped_column(String(16))
    instance_number: Mapped[int | None] = mapped_column(Integer)
    rows: Mapped[int | None] = mapped_column(Integer)
    columns: Mapped[int | None] = mapped_column(Integer)
    # storage
    path: Mapped[str] = mapped_column(String(512))  # relative to the instance store root
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    origin: Mapped[str] = mapped_column(String(16), default=Origin.RECEIVED.value)
    disposition: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text)  # why not processed, when it was not
    source_sop_instance_uid: Mapped[str | None] = mapped_column(String(64), index=True)  # results only
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    calling_host: Mapped[str | None] = mapped_column(String(64))
    received_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)


class StudyState(str, enum.Enum):
    COLLECTING = "collecting"  # instances arriving; analysed once quiet for the settle time
    ANALYSED = "analysed"  # the last set of instances has results (a new instance re-opens it)


class Study(Base):
    """One study the node collects for analysis. ``settle_due`` is when it will have been quiet long
    enough (the analyse job's ``not_before`` is the same instant: the timer lives in the database and
    survives a restart); ``set_hash`` names the set of instances the pending job will read, and
    ``analysed_set_hash`` the set the current results were made from, so a set is analysed once."""

    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    state: Mapped[str] = mapped_column(String(16), default=StudyState.COLLECTING.value)
    first_received_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    settle_due: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    set_hash: Mapped[str | None] = mapped_column(String(64))
    analysed_set_hash: Mapped[str | None] = mapped_column(String(64))
    #: how many analyses produced results (1 for the first report, 2 once superseded, ...)
    version: Mapped[int] = mapped_column(Integer, default=0)
    analysed_at: Mapped[datetime | None] = mapped_column(DateTime)
    #: what the last analysis read and set aside, why, its gate score, the results it made
    analysis: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class Job(Base):
    """One unit of durable work. ``dedupe_key`` makes enqueueing idempotent: the same instance
    received twice, or the same result exported twice to one destination, is one job."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16), default=JobState.QUEUED.value)
    dedupe_key: Mapped[str] = mapped_column(String(255), unique=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), index=True)  # the subject instance
    destination: Mapped[str | None] = mapped_column(String(64))  # peer name, export jobs only
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=5)
    not_before: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)

    __table_args__ = (
        Index("ix_jobs_claim", "state", "kind", "not_before"),
        Index("ix_jobs_lease", "state", "lease_expires_at"),
        # SQLite reuses the largest rowid after a delete: "job 7 done" must never mean two images.
        {"sqlite_autoincrement": True},
    )


class Analysis(Base):
    """The lasting outcome of analysing one received instance: written with the job's last change, kept
    when the job is purged (the queue is work in flight; this is history)."""

    __tablename__ = "analyses"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    job_id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"))
    state: Mapped[str] = mapped_column(String(16))  # a JobState value: done, failed, dead, cancelled
    attempts: Mapped[int] = mapped_column(Integer)
    results: Mapped[list[str]] = mapped_column(JSON, default=list)  # SOP Instance UIDs produced
    last_error: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)


class Delivery(Base):
    """Each result object's delivery to one destination: attempts, last status, when it arrived. Kept
    when the export job is purged, so "what was sent where" stays answerable."""

    __tablename__ = "deliveries"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), index=True)  # the result object
    destination: Mapped[str] = mapped_column(String(64))
    job_id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"))
    state: Mapped[str] = mapped_column(String(16))  # a JobState value
    attempts: Mapped[int] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    first_attempt_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    last_attempt_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime)
    #: Storage commitment asked of the destination: requested, committed or failed (None: not asked).
    commitment: Mapped[str | None] = mapped_column(String(16))
    commitment_transaction_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    committed_at: Mapped[datetime | None] = mapped_column(DateTime)

    __table_args__ = (UniqueConstraint("sop_instance_uid", "destination", name="uq_deliveries_result_destination"),)


class DestinationState(str, enum.Enum):
    UP = "up"
    DOWN = "down"  # consecutive failures: not sent to until a C-ECHO probe answers


class Destination(Base):
    """What the exporters know about one peer: whether it is up, since when it is down, and why."""

    __tablename__ = "destinations"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    state: Mapped[str] = mapped_column(String(8), default=DestinationState.UP.value)
    consecutive_failures: Mapped[int] = mapped_column(Integer, default=0)
    down_since: Mapped[datetime | None] = mapped_column(DateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    last_probe_at: Mapped[datetime | None] = mapped_column(DateTime)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class NodeProcess(Base):
    """A live worker or exporter, as it reports itself (``seen_at`` renewed every few seconds): how
    ``/healthz`` in one process knows whether another can analyse, and what its pipeline load did."""

    __tablename__ = "node_processes"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)  # its lease owner id
    role: Mapped[str] = mapped_column(String(16))  # worker | exporter
    host: Mapped[str] = mapped_column(String(128))
    pid: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16))  # starting | ready | failed | stopped
    detail: Mapped[str | None] = mapped_column(Text)  # the pipeline loaded, or why it did not load
    started_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    seen_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
