"""C-FIND over the ``instances`` table: the identifier's matching keys become conditions
(:mod:`pacs_node.dicom.qr.matching`), :mod:`storage.query` runs the two queries (the keys of the matching
entities, then their attributes and counts), and each entity becomes a pending response identifier.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from pydicom import Dataset
from sqlalchemy.orm import Session

from pacs_node.dicom.qr.matching import ATTRIBUTES, COUNTS, LEVEL_KEY, Level, identifier_conditions
from storage import query


def matching_keys(session: Session, identifier: Dataset, level: Level, limit: int, offset: int = 0) -> list[str]:
    """Keys (patient ID, study/series/SOP instance UID) of the entities that match, in key order
    (``offset`` of them skipped: QIDO-RS pages through the same matches C-FIND returns)."""
    conditions = identifier_conditions(identifier, level, query.dialect_name(session))
    return query.matching_keys(session, LEVEL_KEY[level], conditions, limit, offset)


def _level_attributes(level: Level) -> list[str]:
    return [k for k, a in ATTRIBUTES.items() if a.level.depth <= level.depth]


def entity_rows(session: Session, level: Level, keys: Sequence[str]) -> Iterator[dict[str, Any]]:
    """Attributes (of the level and above, by keyword) and counts of each entity, in ``keys`` order."""
    key = LEVEL_KEY[level]
    keywords = _level_attributes(level)
    key_keyword = next(kw for kw in keywords if ATTRIBUTES[kw].column is key)
    columns = {kw: ATTRIBUTES[kw].column for kw in keywords if kw != key_keyword}
    study = level is Level.STUDY
    for k, row in query.entity_summaries(session, key, columns, keys, study_contents=study):
        row[key_keyword] = k
        if study:
            row["ModalitiesInStudy"] = row.pop("modalities")
            row["SOPClassesInStudy"] = row.pop("sop_classes")
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
