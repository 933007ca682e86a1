"""C-FIND matching over the ``instances`` table in two steps: find the keys of the matching
entities (one DISTINCT query), then fetch their attributes and counts in chunks (one GROUP BY per
chunk). Counts such as NumberOfStudyRelatedInstances therefore cover the whole study, not only the
instances a key like ModalitiesInStudy selected.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from pydicom import Dataset
from sqlalchemy import distinct, func, select
from sqlalchemy.orm import Session

from pacs_node.dicom.qr.matching import ATTRIBUTES, COUNTS, LEVEL_KEY, Level, identifier_conditions
from storage.schema import Instance

_CHUNK = 500


def matching_keys(session: Session, identifier: Dataset, level: Level, limit: int, offset: int = 0) -> list[str]:
    """Keys (patient ID, study/series/SOP instance UID) of the entities that match, in key order
    (``offset`` of them skipped: QIDO-RS pages through the same matches C-FIND returns)."""
    key = LEVEL_KEY[level]
    dialect = session.get_bind().dialect.name
    query = select(key).distinct().where(*identifier_conditions(identifier, level, dialect))
    if level is Level.PATIENT:
        query = query.where(key.is_not(None))
    return [row for row in session.scalars(query.order_by(key).offset(offset).limit(limit))]


def _level_attributes(level: Level) -> list[str]:
    return [k for k, a in ATTRIBUTES.items() if a.level.depth <= level.depth]


def entity_rows(session: Session, level: Level, keys: Sequence[str]) -> Iterator[dict[str, Any]]:
    """Attributes (of the level and above) and counts of each entity, in ``keys`` order."""
    key = LEVEL_KEY[level]
    keywords = _level_attributes(level)
    for start in range(0, len(keys), _CHUNK):
        chunk = list(keys[start:start + _CHUNK])
        columns = [func.min(ATTRIBUTES[k].column).label(k) for k in keywords if ATTRIBUTES[k].column is not key]
        counts = [
            func.count(distinct(Instance.study_instance_uid)).label("studies"),
            func.count(distinct(Instance.series_instance_uid)).label("series"),
            func.count().label("instances"),
        ]
        rows = {
            row.key: row._asdict()
            for row in session.execute(
                select(key.label("key"), *columns, *counts).where(key.in_(chunk)).group_by(key)
            )
        }
        in_study: dict[str, tuple[set[str], set[str]]] = {}
        if level is Level.STUDY:
            for study, modality, sop_class in session.execute(
                select(Instance.study_instance_uid, Instance.modality, Instance.sop_class_uid)
                .where(Instance.study_instance_uid.in_(chunk)).distinct()
            ):
                modalities, classes = in_study.setdefault(study, (set(), set()))
                if modality:
                    modalities.add(modality)
                classes.add(sop_class)
        for k in chunk:
            if k not in rows:
                continue  # deleted between the two queries
            row = rows[k]
            row[next(kw for kw in keywords if ATTRIBUTES[kw].column is key)] = k
            if level is Level.STUDY:
                modalities, classes = in_study.get(k, (set(), set()))
                row["ModalitiesInStudy"] = sorted(modalities)
                row["SOPClassesInStudy"] = sorted(classes)
            yield row


def _count_value(keyword: str, row: dict[str, Any]) -> Any:
    if keyword in ("ModalitiesInStudy", "SOPClassesInStudy"):
        return row[keyword]
    if keyword.endswith("RelatedStudies"):
        return row["studies"]
    if keyword.endswith("RelatedSeries"):
        return row["series"]
    return row["instances"]


def response_identifier(request: Dataset, level: Level, row: dict[str, Any],
                        retrieve_ae_title: str | None) -> Dataset:
    """The pending-response identifier: every key the request asked for, valued where known."""
    out = Dataset()
    out.SpecificCharacterSet = "ISO_IR 192"  # values come from the database as Unicode
    out.QueryRetrieveLevel = level.value
    for element in request:
        keyword = element.keyword
        if keyword in ("QueryRetrieveLevel", "SpecificCharacterSet") or not keyword:
            continue
        value: Any = None
        if keyword in ATTRIBUTES and ATTRIBUTES[keyword].level.depth <= level.depth:
            value = row.get(keyword)
        elif keyword in COUNTS and COUNTS[keyword] is level:
            value = _count_value(keyword, row)
        elif keyword == "RetrieveAETitle":
            value = retrieve_ae_title
        if element.VR == "SQ":
            setattr(out, keyword, [])
        else:
            setattr(out, keyword, value if value not in ("",) else None)
    # Unique keys of the level and above are always returned (PS3.4 C.4.1.2.3).
    for unique_level, keyword in ((Level.STUDY, "StudyInstanceUID"), (Level.SERIES, "SeriesInstanceUID"),
                                  (Level.IMAGE, "SOPInstanceUID")):
        if unique_level.depth <= level.depth and keyword not in out:
            setattr(out, keyword, row.get(keyword))
    if level is Level.PATIENT and "PatientID" not in out:
        out.PatientID = row.get("PatientID")
    return out
