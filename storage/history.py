"""The lasting record of what happened to each instance: its analysis outcome and each result's delivery
to each destination.

Jobs are work in flight and are purged (``queue purge``, ``retention.job_days``); these rows are written in
the same transaction as the job's change and are never purged with it, so ``results`` can say what was
analysed and what was sent where months later. Retention of instances removes their history with them.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from storage.db import rowcount, upsert_many
from storage.schema import Analysis, Delivery, Job, JobKind, JobState


class JobSnapshot(Protocol):
    """What the history reads of a job: a ``Job`` row, or the queue's snapshot of one (``JobRecord``)."""

    id: int
    kind: str
    state: str
    sop_instance_uid: str
    destination: str | None
    payload: dict[str, Any]
    attempts: int
    last_error: str | None


def record_job(session: Session, job: Job, now: datetime) -> None:
    """Bring the history in line with ``job``'s state at the end of an attempt (or its cancellation)."""
    record_jobs(session, [job], now)


def record_jobs(session: Session, jobs: Sequence[Job] | Sequence[JobSnapshot], now: datetime) -> None:
    """:func:`record_job` for many jobs, one statement per kind of row (a batch completed at once)."""
    analyses, deliveries = [], []
    for job in jobs:
        if job.kind == JobKind.ANALYSE.value:
            finished = now if job.state in (JobState.DONE.value, JobState.DEAD.value, JobState.CANCELLED.value) \
                else None
            results = list((job.payload or {}).get("results", []))
            analyses.append(dict(sop_instance_uid=job.sop_instance_uid, job_id=job.id, state=job.state,
                                 attempts=job.attempts, results=results, last_error=job.last_error, updated_at=now,
                                 finished_at=finished))
        elif job.kind == JobKind.EXPORT.value and job.destination:
            delivered = now if job.state == JobState.DONE.value else None
            deliveries.append(dict(sop_instance_uid=job.sop_instance_uid, destination=job.destination, job_id=job.id,
                                   state=job.state, attempts=job.attempts, last_error=job.last_error,
                                   first_attempt_at=now, last_attempt_at=now, delivered_at=delivered))
    if analyses:
        upsert_many(session, Analysis, analyses, ["sop_instance_uid"],
                    [k for k in analyses[0] if k != "sop_instance_uid"])
    kept = ("sop_instance_uid", "destination", "first_attempt_at", "delivered_at")
    for was_delivered in (True, False):
        rows = [row for row in deliveries if (row["delivered_at"] is not None) == was_delivered]
        if rows:  # a delivery's time is set when it is delivered and never cleared by a later attempt
            changed = [k for k in rows[0] if k not in kept] + (["delivered_at"] if was_delivered else [])
            upsert_many(session, Delivery, rows, ["sop_instance_uid", "destination"], changed)


def analysis_of(session: Session, sop_instance_uid: str) -> Analysis | None:
    return session.scalars(select(Analysis).where(Analysis.sop_instance_uid == sop_instance_uid)).one_or_none()


def deliveries_of(session: Session, sop_instance_uids: Sequence[str]) -> Sequence[Delivery]:
    """Every delivery of these result objects, by result then destination."""
    return session.scalars(select(Delivery).where(Delivery.sop_instance_uid.in_(list(sop_instance_uids)))
                           .order_by(Delivery.sop_instance_uid, Delivery.destination)).all()


def analysis_counts(session: Session) -> dict[str, int]:
    """Analyses by outcome (done, failed, dead, cancelled): ``stats``."""
    return {state: int(n) for state, n in
            session.execute(select(Analysis.state, func.count()).group_by(Analysis.state))}


def commitment_requested(session: Session, destination: str, sop_instance_uids: Sequence[str],
                         transaction_uid: str | None) -> None:
    """Storage commitment of these delivered results is asked of ``destination`` in ``transaction_uid``
    (recorded *before* the request goes out: the answer may come back first); None: the request failed,
    they are unasked again."""
    session.execute(update(Delivery)
                    .where(Delivery.destination == destination, Delivery.sop_instance_uid.in_(list(sop_instance_uids)))
                    .values(commitment="requested" if transaction_uid else None,
                            commitment_transaction_uid=transaction_uid, committed_at=None))


def commitment_answered(session: Session, transaction_uid: str, committed: Sequence[str], failed: Sequence[str],
                        now: datetime) -> int:
    """The destination's N-EVENT-REPORT for ``transaction_uid``: which results it holds; returns how many
    deliveries it settled."""
    n = 0
    for uids, state, at in ((committed, "committed", now), (failed, "failed", None)):
        if uids:
            n += rowcount(session.execute(
                update(Delivery)
                .where(Delivery.commitment_transaction_uid == transaction_uid, Delivery.sop_instance_uid.in_(list(uids)))
                .values(commitment=state, committed_at=at)))
    return n


def forget(session: Session, sop_instance_uid: str) -> None:
    """Remove an instance's history (retention deleting the instance itself)."""
    session.execute(delete(Analysis).where(Analysis.sop_instance_uid == sop_instance_uid))
    session.execute(delete(Delivery).where(Delivery.sop_instance_uid == sop_instance_uid))
