"""Small helpers around ``Instance`` rows that the listener, worker, query/retrieve and retention share.

They all take the caller's session and never commit: the caller decides what one transaction is (the
listener commits the row and its job together, after the file is in place).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from storage import history
from storage.db import insert_if_absent
from storage.schema import Instance, Origin, utcnow

_COLUMNS = frozenset(column.key for column in Instance.__table__.columns) - {"id"}
_REQUIRED = frozenset(
    column.key for column in Instance.__table__.columns
    if not column.nullable and column.default is None and not column.primary_key
)


def add_instance(session: Session, **fields: Any) -> bool:
    """Insert an ``Instance`` row; ``False`` (and nothing changed) if its SOP Instance UID is known.

    ``INSERT ... ON CONFLICT DO NOTHING``: a duplicate neither raises nor aborts the caller's transaction,
    and two listeners storing the same instance at once cannot both insert it. Unknown or missing
    fields are refused with their names (a typo must not silently drop query attributes).
    """
    unknown = sorted(set(fields) - _COLUMNS)
    if unknown:
        raise TypeError(f"unknown Instance field(s): {', '.join(unknown)}")
    missing = sorted(_REQUIRED - {key for key, value in fields.items() if value is not None})
    if missing:
        raise TypeError(f"missing required Instance field(s): {', '.join(missing)}")
    for key in ("origin", "disposition"):
        if hasattr(fields.get(key), "value"):
            fields[key] = fields[key].value  # accept the enums as well as their strings
    return insert_if_absent(session, Instance, fields, "sop_instance_uid")


def get_instance(session: Session, sop_instance_uid: str) -> Instance | None:
    return session.scalars(select(Instance).where(Instance.sop_instance_uid == sop_instance_uid)).one_or_none()


def instances_for_study(session: Session, study_instance_uid: str) -> Sequence[Instance]:
    """All instances of a study, received and produced, in series then instance order."""
    return session.scalars(
        select(Instance)
        .where(Instance.study_instance_uid == study_instance_uid)
        .order_by(Instance.series_instance_uid, Instance.instance_number, Instance.id)
    ).all()


def results_for(session: Session, source_sop_instance_uid: str) -> Sequence[Instance]:
    """The result objects (SR, KOS, GSPS) this node produced from one received instance."""
    return session.scalars(
        select(Instance)
        .where(Instance.source_sop_instance_uid == source_sop_instance_uid,
               Instance.origin == Origin.RESULT.value)
        .order_by(Instance.id)
    ).all()


def instances_older_than(
    session: Session,
    age: timedelta | datetime,
    *,
    origin: Origin | str | None = None,
    limit: int | None = 1000,
) -> Sequence[Instance]:
    """Instances received (or produced) before ``age`` ago (or before a naive-UTC ``datetime``), oldest
    first, for retention. ``limit`` keeps one retention pass to a bounded transaction."""
    cutoff = utcnow() - age if isinstance(age, timedelta) else age
    query = select(Instance).where(Instance.received_at < cutoff).order_by(Instance.received_at, Instance.id)
    if origin is not None:
        query = query.where(Instance.origin == Origin(origin).value)
    if limit is not None:
        query = query.limit(limit)
    return session.scalars(query).all()


def delete_instance(session: Session, sop_instance_uid: str) -> str | None:
    """Delete an instance's row; returns its store path for the caller to delete *after* committing
    (row first, then file: a crash in between leaves an orphan file, never a row without a file)."""
    instance = get_instance(session, sop_instance_uid)
    if instance is None:
        return None
    session.execute(delete(Instance).where(Instance.id == instance.id))
    history.forget(session, sop_instance_uid)
    return instance.path
