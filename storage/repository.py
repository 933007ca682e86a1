"""Small helpers around ``Instance`` rows that the listener, worker, query/retrieve and retention share.

They all take the caller's session and never commit: the caller decides what one transaction is (the
listener commits the row and its job together, after the file is in place).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, delete, func, select
from sqlalchemy.orm import Session

from storage import history
from storage.db import insert_if_absent, insert_many_if_absent
from storage.schema import Instance, Origin, utcnow

_COLUMNS = frozenset(column.key for column in Instance.__table__.columns) - {"id"}
_REQUIRED = frozenset(
    column.key for column in Instance.__table__.columns
    if not column.nullable and column.default is None and not column.primary_key
)


@dataclass(frozen=True)
class InstanceRecord:
    """What an ``Instance`` row records of a dataset's header: its UIDs and the attributes C-FIND matches
    on, clipped to the columns (:func:`pacs_node.work.instance_record.instance_record` reads one from a
    dataset). Where and how it is stored is said when it is added (:func:`add_instance`)."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    patient_id: str | None = None
    patient_name: str | None = None
    patient_birth_date: str | None = None
    patient_sex: str | None = None
    study_date: str | None = None
    study_time: str | None = None
    accession_number: str | None = None
    study_id: str | None = None
    study_description: str | None = None
    referring_physician_name: str | None = None
    modality: str | None = None
    series_description: str | None = None
    body_part_examined: str | None = None
    series_number: int | None = None
    instance_number: int | None = None
    rows: int | None = None
    columns: int | None = None


def add_instance(session: Session, record: InstanceRecord | None = None, /, **fields: Any) -> bool:
    """Insert an ``Instance`` row from ``record`` and the storage ``fields`` (``path``, ``size_bytes``,
    ``origin``, ``disposition``, ...), or from ``fields`` alone; ``False`` (and nothing changed) if its SOP
    Instance UID is known.

    ``INSERT ... ON CONFLICT DO NOTHING``: a duplicate neither raises nor aborts the caller's transaction,
    and two listeners storing the same instance at once cannot both insert it. Unknown or missing
    fields are refused with their names (a typo must not silently drop query attributes).
    """
    return insert_if_absent(session, Instance, instance_values(record, fields), "sop_instance_uid")


def add_instances(session: Session, rows: Iterable[tuple[InstanceRecord, dict[str, Any]]]) -> None:
    """:func:`add_instance` for many ``(record, fields)`` at once, in one statement executed for all of
    them (a batch's result objects: one statement to compile instead of one per object)."""
    insert_many_if_absent(session, Instance, [instance_values(record, fields) for record, fields in rows],
                          "sop_instance_uid")


def instance_values(record: InstanceRecord | None, fields: dict[str, Any]) -> dict[str, Any]:
    """The row of ``record`` and ``fields``, refusing unknown or missing fields with their names."""
    if record is not None:
        fields = vars(record) | fields  # (not ``asdict``: its deep copy of str and int values is ~20 us)
    unknown = sorted(set(fields) - _COLUMNS)
    if unknown:
        raise TypeError(f"unknown Instance field(s): {', '.join(unknown)}")
    missing = sorted(_REQUIRED - {key for key, value in fields.items() if value is not None})
    if missing:
        raise TypeError(f"missing required Instance field(s): {', '.join(missing)}")
    for key in ("origin", "disposition"):
        if hasattr(fields.get(key), "value"):
            fields[key] = fields[key].value  # accept the enums as well as their strings
    return fields


def get_instance(session: Session, sop_instance_uid: str) -> Instance | None:
    return session.scalars(select(Instance).where(Instance.sop_instance_uid == sop_instance_uid)).one_or_none()


def instance_exists(session: Session, sop_instance_uid: str) -> bool:
    """Whether an instance with this SOP Instance UID is recorded (the listener's duplicate check)."""
    found = session.connection(bind_arguments={"mapper": Instance}).execute(
        _INSTANCE_BY_UID, {"uid": sop_instance_uid}).first()
    return found is not None


# Built once (compiled once): the listener asks for every instance it receives.
_INSTANCE_BY_UID = (select(Instance.__table__.c.id)
                    .where(Instance.__table__.c.sop_instance_uid == bindparam("uid")).limit(1))


@dataclass(frozen=True)
class StoredFileRecord:
    """Where an instance's file is in the store and what sending it as it is needs to negotiate: its SOP
    class and the transfer syntax it is stored in (both as the ``Instance`` row recorded them)."""

    path: str
    sop_class_uid: str
    transfer_syntax_uid: str


def stored_files(session: Session, sop_instance_uids: Iterable[str]) -> dict[str, StoredFileRecord]:
    """The stored file of each of these instances that is recorded with one (what export sends), in one
    query for a whole batch."""
    rows = session.execute(
        select(Instance.sop_instance_uid, Instance.path, Instance.sop_class_uid, Instance.transfer_syntax_uid)
        .where(Instance.sop_instance_uid.in_(set(sop_instance_uids)))
        .where(Instance.path.is_not(None))
    ).all()
    return {uid: StoredFileRecord(path, sop_class, syntax) for uid, path, sop_class, syntax in rows}


def instance_counts(session: Session) -> list[tuple[str, str, int, int]]:
    """(origin, disposition, instances, bytes) for every pair present: what ``pacs-node stats`` shows."""
    rows = session.execute(
        select(Instance.origin, Instance.disposition, func.count(), func.coalesce(func.sum(Instance.size_bytes), 0))
        .group_by(Instance.origin, Instance.disposition)
    ).all()
    return [(origin, disposition, int(n), int(size)) for origin, disposition, n, size in rows]


def instances_for_study(session: Session, study_instance_uid: str, series_instance_uid: str | None = None,
                        sop_instance_uid: str | None = None) -> Sequence[Instance]:
    """All instances of a study (of one of its series, or the one instance), received and produced, in
    series then instance order."""
    query = select(Instance).where(Instance.study_instance_uid == study_instance_uid)
    if series_instance_uid is not None:
        query = query.where(Instance.series_instance_uid == series_instance_uid)
    if sop_instance_uid is not None:
        query = query.where(Instance.sop_instance_uid == sop_instance_uid)
    return session.scalars(
        query.order_by(Instance.series_instance_uid, Instance.instance_number, Instance.id)
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


def find_studies(session: Session, *, study_instance_uid: str | None = None, accession_number: str | None = None,
                 patient_id: str | None = None, limit: int = 50, offset: int = 0) -> list[dict[str, Any]]:
    """Studies (newest received first) by exact StudyInstanceUID, AccessionNumber and/or PatientID: the
    admin's look-up, with the counts of received and produced instances."""
    query = select(
        Instance.study_instance_uid,
        func.min(Instance.accession_number), func.min(Instance.patient_id), func.min(Instance.study_date),
        func.min(Instance.study_description), func.max(Instance.received_at),
        func.count().filter(Instance.origin == Origin.RECEIVED.value),
        func.count().filter(Instance.origin == Origin.RESULT.value),
    ).group_by(Instance.study_instance_uid)
    if study_instance_uid is not None:
        query = query.where(Instance.study_instance_uid == study_instance_uid)
    if accession_number is not None:
        query = query.where(Instance.study_instance_uid.in_(
            select(Instance.study_instance_uid).where(Instance.accession_number == accession_number)))
    if patient_id is not None:
        query = query.where(Instance.study_instance_uid.in_(
            select(Instance.study_instance_uid).where(Instance.patient_id == patient_id)))
    rows = session.execute(query.order_by(func.max(Instance.received_at).desc(), Instance.study_instance_uid)
                           .offset(offset).limit(limit)).all()
    return [{"study_instance_uid": uid, "accession_number": accession, "patient_id": patient, "study_date": date,
             "study_description": description, "last_received_at": last, "received": received,
             "results": results}
            for uid, accession, patient, date, description, last, received, results in rows]

