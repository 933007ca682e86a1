"""Queries of ``node_processes``: the workers and exporters as they report themselves.

Each process renews its own row (``seen_at``) every few seconds, so any process sharing the database can
tell which of them are alive, and whether a worker's pipeline loaded, without signalling them.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from storage.db import upsert
from storage.schema import NodeProcess


def report(session: Session, *, name: str, role: str, host: str, pid: int, state: str, detail: str | None,
           now: datetime) -> None:
    """Create or replace ``name``'s row: what it is and what state it is in now."""
    values = dict(name=name, role=role, host=host, pid=pid, state=state, detail=detail, started_at=now, seen_at=now)
    changed = dict(values)
    del changed["name"]
    if state != "starting":
        del changed["started_at"]
    upsert(session, NodeProcess, values, ["name"], changed)


def seen(session: Session, name: str, now: datetime) -> None:
    session.execute(update(NodeProcess).where(NodeProcess.name == name).values(seen_at=now))


def processes(session: Session) -> Sequence[NodeProcess]:
    return session.scalars(select(NodeProcess).order_by(NodeProcess.role, NodeProcess.name)).all()


def forget_older_than(session: Session, age: timedelta, now: datetime) -> int:
    """Drop rows of processes not seen for ``age`` (long gone: restarted workers' old pids)."""
    result = session.execute(delete(NodeProcess).where(NodeProcess.seen_at < now - age))
    return int(getattr(result, "rowcount", 0) or 0)
