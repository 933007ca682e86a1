"""The queries of Query/Retrieve over the ``instances`` table, given the conditions to match.

Which DICOM key maps to which column, and how a matching type (wildcards, ranges, UID lists) becomes a
condition, is the node's business (``pacs_node.dicom.qr.matching``); running the queries is this
module's. C-FIND runs in two steps: the keys of the matching entities (one DISTINCT query), then their
attributes and counts in chunks (one GROUP BY per chunk), so counts such as
NumberOfStudyRelatedInstances cover the whole study, not only the instances a condition selected.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, distinct, func, select
from sqlalchemy.orm import InstrumentedAttribute, Session

from storage.schema import Instance

#: Entities summarised per GROUP BY query.
CHUNK = 500


def dialect_name(session: Session) -> str:
    """``sqlite`` or ``postgresql``: wildcard matching is spelt differently on each."""
    return session.get_bind().dialect.name


def matching_keys(session: Session, key: InstrumentedAttribute, conditions: Sequence[ColumnElement[bool]],
                  limit: int, offset: int = 0) -> list[str]:
    """Distinct non-null values of ``key`` (patient ID, study/series/SOP instance UID) of the instances
    that meet ``conditions``, in key order, at most ``limit`` after skipping ``offset``."""
    query = select(key).distinct().where(*conditions, key.is_not(None))
    return list(session.scalars(query.order_by(key).offset(offset).limit(limit)))


def entity_summaries(session: Session, key: InstrumentedAttribute, columns: Mapping[str, InstrumentedAttribute],
                     keys: Sequence[str], *, study_contents: bool = False) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(key, row)`` for each of ``keys`` still present, in ``keys`` order. ``row`` has each of
    ``columns`` by its name (one value of the entity's instances), ``studies``, ``series`` and
    ``instances`` (counts) and, with ``study_contents`` (``key`` is the study UID), the sorted
    ``modalities`` and ``sop_classes`` of the study."""
    for start in range(0, len(keys), CHUNK):
        chunk = list(keys[start:start + CHUNK])
        selected = [func.min(column).label(name) for name, column in columns.items()]
        counts = [
            func.count(distinct(Instance.study_instance_uid)).label("studies"),
            func.count(distinct(Instance.series_instance_uid)).label("series"),
            func.count().label("instances"),
        ]
        rows = {
            row.key: row._asdict()
            for row in session.execute(select(key.label("key"), *selected, *counts).where(key.in_(chunk)).group_by(key))
        }
        contents: dict[str, tuple[set[str], set[str]]] = {}
        if study_contents:
            for study, modality, sop_class in session.execute(
                select(Instance.study_instance_uid, Instance.modality, Instance.sop_class_uid)
                .where(Instance.study_instance_uid.in_(chunk)).distinct()
            ):
                modalities, classes = contents.setdefault(study, (set(), set()))
                if modality:
                    modalities.add(modality)
                classes.add(sop_class)
        for k in chunk:
            if k not in rows:
                continue  # deleted between the two queries
            row = rows[k]
            del row["key"]
            if study_contents:
                modalities, classes = contents.get(k, (set(), set()))
                row["modalities"], row["sop_classes"] = sorted(modalities), sorted(classes)
            yield k, row


@dataclass(frozen=True)
class StoredInstance:
    """One instance to retrieve, as stored."""

    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    path: str


def instances_to_retrieve(session: Session, conditions: Sequence[ColumnElement[bool]]) -> list[StoredInstance]:
    """The instances that meet ``conditions``, in study, series and instance order (C-MOVE, C-GET)."""
    rows = session.execute(
        select(Instance.sop_instance_uid, Instance.sop_class_uid, Instance.transfer_syntax_uid, Instance.path)
        .where(*conditions)
        .order_by(Instance.study_instance_uid, Instance.series_instance_uid, Instance.instance_number, Instance.id)
    ).all()
    return [StoredInstance(*row) for row in rows]
