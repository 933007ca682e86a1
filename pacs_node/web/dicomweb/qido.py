"""QIDO-RS (PS3.18 10.6): ``GET /dicom-web/studies``, ``.../series``, ``.../instances`` as DICOM JSON.

The query parameters become a C-FIND identifier and go through the very matching C-FIND uses
(:mod:`pacs_node.dicom.qr.matching` and :mod:`~pacs_node.dicom.qr.find`): the same attributes, wildcards,
date ranges, UID lists and ModalitiesInStudy, so a study a PACS finds by C-FIND is the study a DICOMweb
client finds. Fuzzy matching is not offered (``fuzzymatching=true`` is answered with exact matching,
as the standard allows).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydicom import Dataset
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from sqlalchemy.orm import Session

from pacs_node.dicom.qr.find import entity_rows, matching_keys, response_identifier
from pacs_node.dicom.qr.matching import Level, QueryError

#: Attributes every match carries (PS3.18 Tables 10.6.3-3 to -5, as far as the node stores them).
DEFAULT_FIELDS: dict[Level, tuple[str, ...]] = {
    Level.STUDY: ("StudyDate", "StudyTime", "AccessionNumber", "ModalitiesInStudy", "ReferringPhysicianName",
                  "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyID",
                  "StudyDescription", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"),
    Level.SERIES: ("Modality", "SeriesDescription", "SeriesNumber", "SeriesInstanceUID", "BodyPartExamined",
                   "NumberOfSeriesRelatedInstances"),
    Level.IMAGE: ("SOPClassUID", "SOPInstanceUID", "InstanceNumber", "Rows", "Columns"),
}
#: The study attributes a series or instance query returns when it is not scoped to one study.
_STUDY_CONTEXT = ("StudyInstanceUID", "StudyDate", "AccessionNumber", "PatientID", "PatientName")
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
_LIST_VRS = ("UI", "CS")


def _keyword(name: str) -> str:
    """An attribute keyword from a keyword or an 8-digit hex tag; QueryError for anything else."""
    if len(name) == 8 and all(c in "0123456789abcdefABCDEF" for c in name):
        keyword = keyword_for_tag(int(name, 16))
        if keyword:
            return keyword
    elif tag_for_keyword(name) is not None:
        return name
    raise QueryError(f"{name!r} is not a DICOM attribute keyword or tag")


def _int(name: str, value: str, ceiling: int) -> int:
    try:
        number = int(value)
    except ValueError:
        raise QueryError(f"{name}={value!r} is not a number") from None
    if number < 0:
        raise QueryError(f"{name} must not be negative")
    return min(number, ceiling)


def build_query(params: Iterable[tuple[str, str]], level: Level,
                scope: dict[str, str]) -> tuple[Dataset, int, int]:
    """(identifier, limit, offset) from the query string and the UIDs in the path (``scope``)."""
    identifier = Dataset()
    limit, offset = DEFAULT_LIMIT, 0
    include: list[str] = list(DEFAULT_FIELDS[level])
    if level is not Level.STUDY:
        include += [k for k in DEFAULT_FIELDS[Level.SERIES] if level is Level.IMAGE] + list(_STUDY_CONTEXT)
    for name, value in params:
        if name == "limit":
            limit = _int(name, value, MAX_LIMIT)
        elif name == "offset":
            offset = _int(name, value, 10**9)
        elif name == "fuzzymatching":
            continue
        elif name == "includefield":
            include += [] if value == "all" else [_keyword(v.strip()) for v in value.split(",") if v.strip()]
        else:
            keyword = _keyword(name)
            vr = dictionary_VR(keyword)
            if vr == "SQ":
                raise QueryError(f"sequence matching ({keyword}) is not supported")
            if vr in _LIST_VRS:
                value = value.replace(",", "\\")
            setattr(identifier, keyword, value)
    for keyword, uid in scope.items():
        setattr(identifier, keyword, uid)
    for keyword in include:
        if keyword not in identifier:
            vr = dictionary_VR(keyword)
            setattr(identifier, keyword, [] if vr == "SQ" else None)
    identifier.QueryRetrieveLevel = level.value
    return identifier, limit, offset


def search(session: Session, identifier: Dataset, level: Level, limit: int, offset: int,
           base_url: str) -> list[dict[str, Any]]:
    """The matches as DICOM JSON objects, each with its RetrieveURL."""
    keys = matching_keys(session, identifier, level, limit, offset)
    answers = []
    for row in entity_rows(session, level, keys):
        ds = response_identifier(identifier, level, row, None)
        del ds.QueryRetrieveLevel
        del ds.SpecificCharacterSet
        url = f"{base_url}/studies/{row['StudyInstanceUID']}"
        if level.depth >= Level.SERIES.depth:
            url += f"/series/{row['SeriesInstanceUID']}"
        if level is Level.IMAGE:
            url += f"/instances/{row['SOPInstanceUID']}"
        ds.RetrieveURL = url
        answers.append(ds.to_json_dict())
    return answers
