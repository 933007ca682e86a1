"""Queries about studies: collecting a study's instances until it settles, and what its analyses made.

Like :mod:`storage.repository`, every function takes the caller's session and never commits. The listener
calls :func:`touch_study` in the transaction that records an instance, *before* it reads the study's set of
instances: the upsert locks the study's row (PostgreSQL) or the database (SQLite's ``BEGIN IMMEDIATE``), so
two associations delivering images of one study at once are serialised and the second one sees the first
one's image in the set it enqueues.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any, cast

from sqlalchemy import Table, bindparam, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from storage.schema import Disposition, Instance, Origin, Study, StudyState, utcnow


def instance_set_hash(sop_instance_uids: Iterable[str]) -> str:
    """A name for a set of instances: the same set, in any order, always gets the same one."""
    digest = hashlib.sha256("\n".join(sorted(set(sop_instance_uids))).encode("ascii", "replace"))
    return digest.hexdigest()[:32]


def touch_study(session: Session, study_instance_uid: str, now: datetime, settle_due: datetime) -> None:
    """Record that an instance of the study arrived ``now``: create its row or push its settle time out,
    and (re-)open it for analysis."""
    connection = session.connection(bind_arguments={"mapper": Study})
    connection.execute(touch_statement(connection.dialect.name), {
        "study_instance_uid": study_instance_uid, "state": StudyState.COLLECTING.value, "first_received_at": now,
        "last_received_at": now, "settle_due": settle_due, "version": 0, "analysis": {},
    })


def set_pending(session: Session, study_instance_uid: str, set_hash: str) -> None:
    """The set of instances the study's pending analysis job will read."""
    session.connection(bind_arguments={"mapper": Study}).execute(
        SET_PENDING, {"study": study_instance_uid, "pending_set_hash": set_hash})


def study_image_uids(session: Session, study_instance_uid: str) -> list[str]:
    """The received instances of the study that the acceptance policy took for analysis, oldest first."""
    rows = session.connection(bind_arguments={"mapper": Instance}).execute(
        STUDY_IMAGE_UIDS, {"study": study_instance_uid})
    return [uid for (uid,) in rows]


# The listener runs the statements above for every instance it receives: they are built once (and so
# compiled once), on the tables rather than the ORM classes, and executed on the session's connection
# (or, compiled for the driver, by ``storage.receiving``).
_STUDIES = cast(Table, Study.__table__)
_INSTANCES = cast(Table, Instance.__table__)
SET_PENDING = (update(_STUDIES).where(_STUDIES.c.study_instance_uid == bindparam("study"))
               .values(set_hash=bindparam("pending_set_hash")))
STUDY_IMAGE_UIDS = (
    select(_INSTANCES.c.sop_instance_uid)
    .where(_INSTANCES.c.study_instance_uid == bindparam("study"),
           _INSTANCES.c.origin == Origin.RECEIVED.value, _INSTANCES.c.disposition == Disposition.QUEUED.value)
    .order_by(_INSTANCES.c.received_at, _INSTANCES.c.id)
)


@lru_cache(maxsize=None)
def touch_statement(dialect: str) -> Any:
    """The study's upsert: a new row, or the arrival time, settle time and state of the existing one."""
    dialect_insert = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}.get(dialect)
    if dialect_insert is None:
        raise NotImplementedError(f"no upsert for the {dialect!r} dialect")
    statement = dialect_insert(_STUDIES)
    return statement.on_conflict_do_update(  # type: ignore[attr-defined]
        index_elements=["study_instance_uid"],
        set_={"last_received_at": statement.excluded.last_received_at,
              "settle_due": statement.excluded.settle_due, "state": statement.excluded.state},
    )


@dataclass(frozen=True)
class StudyImage:
    """What the worker needs of one of a study's images to read it: where it is stored, who sent it, the
    transfer syntax it is stored in (the file's own, recorded from its header when it was filed)."""

    sop_instance_uid: str
    path: str
    calling_ae: str | None
    transfer_syntax_uid: str


def study_images(session: Session, study_instance_uid: str) -> list[StudyImage]:
    """:func:`study_image_uids` with each image's store path, sender and transfer syntax, in one statement (the worker
    loads every study it analyses this way)."""
    rows = session.connection(bind_arguments={"mapper": Instance}).execute(
        _STUDY_IMAGES, {"study": study_instance_uid})
    return [StudyImage(uid, path, calling_ae, syntax) for uid, path, calling_ae, syntax in rows]


@dataclass(frozen=True)
class AnalysedState:
    """What a study's row says of its last analysis: the worker's next one is a new version of it or,
    for the same set of instances run again, the same one."""

    version: int
    analysed_set_hash: str | None
    analysis: dict[str, Any]


def analysed_state(session: Session, study_instance_uid: str) -> AnalysedState | None:
    """The study's last analysis (None when the study has no row)."""
    row = session.connection(bind_arguments={"mapper": Study}).execute(
        _ANALYSED_STATE, {"study": study_instance_uid}).first()
    return None if row is None else AnalysedState(row.version or 0, row.analysed_set_hash, row.analysis or {})


_STUDY_IMAGES = (
    select(_INSTANCES.c.sop_instance_uid, _INSTANCES.c.path, _INSTANCES.c.calling_ae, _INSTANCES.c.transfer_syntax_uid)
    .where(_INSTANCES.c.study_instance_uid == bindparam("study"),
           _INSTANCES.c.origin == Origin.RECEIVED.value, _INSTANCES.c.disposition == Disposition.QUEUED.value)
    .order_by(_INSTANCES.c.received_at, _INSTANCES.c.id)
)
_ANALYSED_STATE = select(_STUDIES.c.version, _STUDIES.c.analysed_set_hash, _STUDIES.c.analysis).where(
    _STUDIES.c.study_instance_uid == bindparam("study"))


def get_study(session: Session, study_instance_uid: str) -> Study | None:
    return session.scalars(select(Study).where(Study.study_instance_uid == study_instance_uid)).one_or_none()


def record_analysis(session: Session, study_instance_uid: str, set_hash: str, analysis: dict[str, Any]) -> int:
    """Mark ``set_hash`` analysed with ``analysis`` (what was read, set aside, made); returns the study's
    new version. A set already recorded keeps its version (a job run again after a crash)."""
    return record_analyses(session, [(study_instance_uid, set_hash, analysis)])[0]


def record_analyses(session: Session, analyses: Sequence[tuple[str, str, dict[str, Any]]]) -> list[int]:
    """:func:`record_analysis` of each ``(study_instance_uid, set_hash, analysis)``, in order, with one
    statement to read and lock the studies' rows and one to write them (a batch's studies); per analysis,
    its study's version."""
    if not analyses:
        return []
    connection = session.connection(bind_arguments={"mapper": Study})
    rows = {row.study_instance_uid: row._asdict() for row in connection.execute(
        _STUDIES_FOR_ANALYSIS.with_for_update(), {"studies": sorted({uid for uid, _, _ in analyses})})}
    now = utcnow()
    versions: list[int] = []
    new: dict[str, dict[str, Any]] = {}
    for study_uid, set_hash, analysis in analyses:
        row = rows.get(study_uid)
        if row is None:  # a job queued before studies were tracked (per-instance analyse job)
            row = rows[study_uid] = new[study_uid] = dict(
                id=None, study_instance_uid=study_uid, state=StudyState.COLLECTING.value, first_received_at=now,
                last_received_at=now, settle_due=now, set_hash=set_hash, analysed_set_hash=None, version=0)
        if row["analysed_set_hash"] != set_hash:
            row["version"] = (row["version"] or 0) + 1
        row["analysed_set_hash"] = set_hash
        row["analysis"] = {**analysis, "version": row["version"]}
        row["analysed_at"] = now
        if row["set_hash"] == set_hash:
            row["state"] = StudyState.ANALYSED.value
        versions.append(row["version"])
    if new:
        connection.execute(insert(_STUDIES), [{k: v for k, v in row.items() if k != "id"} for row in new.values()])
    changed = [row for uid, row in rows.items() if uid not in new and "analysis" in row]
    if changed:
        connection.execute(_RECORD_ANALYSIS, [
            {"study_id": row["id"], "new_state": row["state"], "new_version": row["version"],
             "analysed": row["analysed_set_hash"], "record": row["analysis"], "at": row["analysed_at"]}
            for row in changed])
    return versions


_STUDIES_FOR_ANALYSIS = select(
    _STUDIES.c.id, _STUDIES.c.study_instance_uid, _STUDIES.c.state, _STUDIES.c.set_hash,
    _STUDIES.c.analysed_set_hash, _STUDIES.c.version,
).where(_STUDIES.c.study_instance_uid.in_(bindparam("studies", expanding=True)))
_RECORD_ANALYSIS = (
    update(_STUDIES).where(_STUDIES.c.id == bindparam("study_id"))
    .values(state=bindparam("new_state"), version=bindparam("new_version"), analysed_set_hash=bindparam("analysed"),
            analysis=bindparam("record", type_=_STUDIES.c.analysis.type), analysed_at=bindparam("at"))
)


def studies(session: Session, limit: int = 100) -> Sequence[Study]:
    """The most recently active studies."""
    return session.scalars(select(Study).order_by(Study.last_received_at.desc(), Study.id.desc()).limit(limit)).all()
