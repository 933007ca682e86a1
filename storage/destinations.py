"""Queries of the ``destinations`` table: which peers the exporters consider down, and since when.

Several exporters (threads, hosts) share one row per peer, so every change is one upsert or one
conditional update: two exporters failing at once count two failures, and only one of them marks the
peer down.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from storage.db import rowcount, upsert
from storage.schema import Destination, DestinationState


def down_destinations(session: Session) -> set[str]:
    return set(session.scalars(select(Destination.name).where(Destination.state == DestinationState.DOWN.value)))


def all_destinations(session: Session) -> Sequence[Destination]:
    return session.scalars(select(Destination).order_by(Destination.name)).all()


def record_failure(session: Session, name: str, error: str, now: datetime, down_after: int) -> bool:
    """Count one failed send to ``name``; True when this failure is the one that marks it down."""
    upsert(session, Destination,
           dict(name=name, state=DestinationState.UP.value, consecutive_failures=1, last_error=error, updated_at=now),
           ["name"],
           dict(consecutive_failures=Destination.consecutive_failures + 1, last_error=error, updated_at=now))
    if down_after <= 0:
        return False
    result = session.execute(
        update(Destination)
        .where(Destination.name == name, Destination.state == DestinationState.UP.value,
               Destination.consecutive_failures >= down_after)
        .values(state=DestinationState.DOWN.value, down_since=now, updated_at=now)
    )
    return rowcount(result) == 1


def record_success(session: Session, name: str, now: datetime) -> datetime | None:
    """``name`` answered (a send or a probe): up, no failures counted. Returns when it had gone down, if
    it was down (so the caller releases its waiting jobs), else None."""
    row = session.get(Destination, name)
    if row is None:
        upsert(session, Destination, dict(name=name, state=DestinationState.UP.value, consecutive_failures=0,
                                          updated_at=now), ["name"], dict(updated_at=now))
        return None
    was_down = row.down_since if row.state == DestinationState.DOWN.value else None
    if row.state != DestinationState.UP.value or row.consecutive_failures:
        row.state, row.consecutive_failures, row.down_since, row.updated_at = DestinationState.UP.value, 0, None, now
    return was_down


def record_probe(session: Session, name: str, error: str, now: datetime) -> None:
    """A C-ECHO probe of a down destination got no answer."""
    session.execute(update(Destination).where(Destination.name == name)
                    .values(last_probe_at=now, last_error=error, updated_at=now))
