"""C-FIND identifiers as SQL: which attribute lives in which column at which level, and how each
DICOM matching type (PS3.4 C.2.2.2) becomes a condition on the ``instances`` table.

Supported: universal matching (empty value), single value matching, wildcard matching (``*`` and
``?``; case-insensitive for person names, case-sensitive otherwise, on SQLite and PostgreSQL alike),
list of UID matching, date and time range matching, and multi-valued ModalitiesInStudy / SOPClassesInStudy.
Sequence matching is not supported: a sequence key is returned empty and does not restrict.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

from pydicom import Dataset
from sqlalchemy import ColumnElement, and_, false, func, or_, select
from sqlalchemy.orm import InstrumentedAttribute

from storage.schema import Instance


class Level(str, Enum):
    PATIENT = "PATIENT"
    STUDY = "STUDY"
    SERIES = "SERIES"
    IMAGE = "IMAGE"

    @property
    def depth(self) -> int:
        return list(Level).index(self)


class QueryError(ValueError):
    """The identifier cannot be processed (a C-FIND/MOVE/GET failure status goes back)."""


@dataclass(frozen=True)
class Attribute:
    keyword: str
    column: InstrumentedAttribute
    level: Level
    vr: str


ATTRIBUTES: dict[str, Attribute] = {
    a.keyword: a
    for a in (
        Attribute("PatientID", Instance.patient_id, Level.PATIENT, "LO"),
        Attribute("PatientName", Instance.patient_name, Level.PATIENT, "PN"),
        Attribute("PatientBirthDate", Instance.patient_birth_date, Level.PATIENT, "DA"),
        Attribute("PatientSex", Instance.patient_sex, Level.PATIENT, "CS"),
        Attribute("StudyInstanceUID", Instance.study_instance_uid, Level.STUDY, "UI"),
        Attribute("StudyDate", Instance.study_date, Level.STUDY, "DA"),
        Attribute("StudyTime", Instance.study_time, Level.STUDY, "TM"),
        Attribute("AccessionNumber", Instance.accession_number, Level.STUDY, "SH"),
        Attribute("StudyID", Instance.study_id, Level.STUDY, "SH"),
        Attribute("StudyDescription", Instance.study_description, Level.STUDY, "LO"),
        Attribute("ReferringPhysicianName", Instance.referring_physician_name, Level.STUDY, "PN"),
        Attribute("SeriesInstanceUID", Instance.series_instance_uid, Level.SERIES, "UI"),
        Attribute("Modality", Instance.modality, Level.SERIES, "CS"),
        Attribute("SeriesNumber", Instance.series_number, Level.SERIES, "IS"),
        Attribute("SeriesDescription", Instance.series_description, Level.SERIES, "LO"),
        Attribute("BodyPartExamined", Instance.body_part_examined, Level.SERIES, "CS"),
        Attribute("SOPInstanceUID", Instance.sop_instance_uid, Level.IMAGE, "UI"),
        Attribute("SOPClassUID", Instance.sop_class_uid, Level.IMAGE, "UI"),
        Attribute("InstanceNumber", Instance.instance_number, Level.IMAGE, "IS"),
        Attribute("Rows", Instance.rows, Level.IMAGE, "US"),
        Attribute("Columns", Instance.columns, Level.IMAGE, "US"),
    )
}

#: The column that identifies one entity of each level.
LEVEL_KEY: dict[Level, InstrumentedAttribute] = {
    Level.PATIENT: Instance.patient_id,
    Level.STUDY: Instance.study_instance_uid,
    Level.SERIES: Instance.series_instance_uid,
    Level.IMAGE: Instance.sop_instance_uid,
}

#: Attributes computed over an entity's instances ("where cheap": one GROUP BY per chunk of matches).
COUNTS: dict[str, Level] = {
    "NumberOfPatientRelatedStudies": Level.PATIENT,
    "NumberOfPatientRelatedSeries": Level.PATIENT,
    "NumberOfPatientRelatedInstances": Level.PATIENT,
    "NumberOfStudyRelatedSeries": Level.STUDY,
    "NumberOfStudyRelatedInstances": Level.STUDY,
    "ModalitiesInStudy": Level.STUDY,
    "SOPClassesInStudy": Level.STUDY,
    "NumberOfSeriesRelatedInstances": Level.SERIES,
}

_INT_VRS = ("IS", "US")


def query_level(identifier: Dataset, allowed: Iterable[Level]) -> Level:
    raw = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    try:
        level = Level(raw)
    except ValueError:
        raise QueryError(f"Query/Retrieve Level {raw!r} is not PATIENT, STUDY, SERIES or IMAGE") from None
    if level not in allowed:
        raise QueryError(f"Query/Retrieve Level {level.value} is not valid for this information model")
    return level


def _text(value: object) -> str:
    """An element value as the string a peer typed (multi-values joined with backslash)."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value)


def _wildcard_condition(column: InstrumentedAttribute, pattern: str, *, case_insensitive: bool,
                        dialect: str) -> ColumnElement[bool]:
    if case_insensitive:
        escaped = pattern.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        like = escaped.replace("*", "%").replace("?", "_")
        return func.lower(column).like(like.lower(), escape="\\")
    if dialect == "sqlite":
        # SQLite's LIKE ignores case; GLOB is its case-sensitive matcher (only [ needs escaping).
        return column.op("GLOB")(pattern.replace("[", "[[]"))
    escaped = pattern.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return column.like(escaped.replace("*", "%").replace("?", "_"), escape="\\")


#: PS3.5 6.2: a DA is YYYYMMDD; a TM is HH, HHMM, HHMMSS or HHMMSS.F{1,6}.
_DATE_OR_TIME = {"DA": re.compile(r"^\d{8}$"), "TM": re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")}


def _checked(value: str, vr: str, keyword: str) -> str:
    """``value`` if it is a valid DA/TM (an empty bound of a range is fine), else :class:`QueryError`:
    a malformed date must fail the query, not silently match nothing."""
    if value and not _DATE_OR_TIME[vr].match(value):
        form = "YYYYMMDD" if vr == "DA" else "HHMMSS[.FFFFFF]"
        raise QueryError(f"{keyword} {value!r} is not a valid {vr} ({form}, or a range of them)")
    return value


def _range_condition(column: InstrumentedAttribute, value: str, vr: str, keyword: str) -> ColumnElement[bool]:
    low, _, high = (part.strip() for part in value.partition("-"))
    low, high = _checked(low, vr, keyword), _checked(high, vr, keyword)
    if vr == "TM":
        # Stored times are HHMMSS[.ffffff]; comparing as text works once the bounds are aligned.
        high = high.ljust(6, "9") + ".999999" if high and "." not in high else high
    conditions = []
    if low:
        conditions.append(column >= low)
    if high:
        conditions.append(column <= high)
    return and_(column.is_not(None), column != "", *conditions)


def attribute_condition(attribute: Attribute, value: str, dialect: str) -> ColumnElement[bool] | None:
    """The condition for one non-empty matching key, or None for universal matching."""
    value = value.strip() if attribute.vr != "PN" else value.strip().rstrip("^= ")
    if value in ("", "*"):
        return None
    column = attribute.column
    if attribute.vr == "UI":
        return column.in_([uid.strip() for uid in value.split("\\") if uid.strip()])
    if attribute.vr in _INT_VRS:
        try:
            return column == int(value)
        except ValueError:
            return false()
    if attribute.vr in ("DA", "TM"):
        if "-" in value:
            return _range_condition(column, value, attribute.vr, attribute.keyword)
        if "*" not in value and "?" not in value:
            _checked(value, attribute.vr, attribute.keyword)
    values = value.split("\\") if attribute.vr == "CS" else [value]
    conditions = []
    for one in values:
        if "*" in one or "?" in one:
            conditions.append(_wildcard_condition(column, one, case_insensitive=attribute.vr == "PN",
                                                  dialect=dialect))
        elif attribute.vr == "PN":
            conditions.append(func.lower(column) == one.lower())
        else:
            conditions.append(column == one)
    return or_(*conditions)


def _in_study_condition(keyword: str, value: str, dialect: str) -> ColumnElement[bool] | None:
    """ModalitiesInStudy / SOPClassesInStudy: studies with at least one instance matching any value."""
    attribute = ATTRIBUTES["Modality" if keyword == "ModalitiesInStudy" else "SOPClassUID"]
    inner = attribute_condition(attribute, value, dialect)
    if inner is None:
        return None
    return Instance.study_instance_uid.in_(select(Instance.study_instance_uid).where(inner))


def identifier_conditions(identifier: Dataset, level: Level, dialect: str) -> list[ColumnElement[bool]]:
    """Conditions for every matching key at or above ``level`` (relational-lenient: keys of higher
    levels restrict too, unique keys are not required)."""
    conditions = []
    for element in identifier:
        keyword = element.keyword
        if element.VR == "SQ":
            continue
        if keyword in ("ModalitiesInStudy", "SOPClassesInStudy") and level.depth >= Level.STUDY.depth:
            condition = _in_study_condition(keyword, _text(element.value), dialect)
        elif keyword in ATTRIBUTES and ATTRIBUTES[keyword].level.depth <= level.depth:
            condition = attribute_condition(ATTRIBUTES[keyword], _text(element.value), dialect)
        else:
            continue
        if condition is not None:
            conditions.append(condition)
    return conditions


def selective(identifier: Dataset, level: Level) -> bool:
    """Whether some matching key at or above ``level`` has a value that is more than wildcards and
    range dashes: ``PatientID=?*`` matches every patient, and must not pass for a key."""
    for element in identifier:
        keyword = element.keyword
        if element.VR == "SQ" or keyword not in ATTRIBUTES or ATTRIBUTES[keyword].level.depth > level.depth:
            continue
        if _text(element.value).strip(" *?-^=\\"):
            return True
    return False
