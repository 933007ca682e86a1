"""The :class:`storage.repository.InstanceRecord` of a dataset: the header attributes Q/R matches on,
clipped to the columns and sanitised (control characters, NUL above all, become U+FFFD) so that every
database holds them.

Used for received images (from their header only) and for the result objects the worker produces, so
both kinds are found by the same C-FIND queries.
"""

from __future__ import annotations

import functools
import re
from typing import Any

from pydicom import Dataset

from pacs_node.dicom.datasets import header_value
from pacs_node.dicom.plain_header import PlainHeader
from storage.repository import InstanceRecord
from storage.schema import Instance

_UID_COLUMNS = {
    "sop_instance_uid": "SOPInstanceUID",
    "sop_class_uid": "SOPClassUID",
    "study_instance_uid": "StudyInstanceUID",
    "series_instance_uid": "SeriesInstanceUID",
}
_TEXT_COLUMNS = {
    "patient_id": "PatientID",
    "patient_name": "PatientName",
    "patient_birth_date": "PatientBirthDate",
    "patient_sex": "PatientSex",
    "study_date": "StudyDate",
    "study_time": "StudyTime",
    "accession_number": "AccessionNumber",
    "study_id": "StudyID",
    "study_description": "StudyDescription",
    "referring_physician_name": "ReferringPhysicianName",
    "modality": "Modality",
    "series_description": "SeriesDescription",
    "body_part_examined": "BodyPartExamined",
}
_INT_COLUMNS = {
    "series_number": "SeriesNumber",
    "instance_number": "InstanceNumber",
    "rows": "Rows",
    "columns": "Columns",
}
#: Every column of a row that records a header attribute, with the attribute's keyword (the UIDs first:
#: the first one missing is the one reported).
COLUMNS = {**_UID_COLUMNS, **_TEXT_COLUMNS, **_INT_COLUMNS}
#: What a row records of a dataset without a Transfer Syntax UID.
DEFAULT_TRANSFER_SYNTAX = "1.2.840.10008.1.2.1"


class MissingAttribute(ValueError):
    """The dataset lacks an attribute every stored instance needs (a UID)."""


@functools.cache
def _column_length(name: str) -> int | None:
    return getattr(Instance.__table__.c[name].type, "length", None)


def _clip(name: str, value: str) -> str:
    # A modality that sends a 70-character description must not make the insert fail (PostgreSQL
    # enforces VARCHAR lengths); the file keeps the full value.
    limit = _column_length(name)
    return value[:limit] if limit else value


#: Characters no text column may hold: C0 controls and DEL (PostgreSQL refuses NUL outright, and none
#: of them belongs in a DICOM text value of these attributes; ESC is kept for ISO 2022 character sets
#: only in the file, which is never changed).
_CONTROL = re.compile("[\x00-\x1f\x7f]")
#: What stands in for each of them in the row.
REPLACEMENT = "\ufffd"


def sanitised(value: str) -> str:
    """``value`` as a database row can hold it on SQLite and PostgreSQL alike: control characters
    (NUL above all) and anything that is not a Unicode scalar value (a lone surrogate) become U+FFFD.
    Only the row is sanitised; the stored file keeps the bytes the sender sent."""
    value = value.encode("utf-8", "replace").decode("utf-8") if not value.isascii() else value
    return _CONTROL.sub(REPLACEMENT, value)


def _required_uid(value: Any, keyword: str) -> str:
    value = str(value or "").strip().rstrip("\x00").strip()
    if not value:
        raise MissingAttribute(f"{keyword} is missing or empty")
    if sanitised(value) != value:
        raise MissingAttribute(f"{keyword} contains control characters")
    if len(value) > 64:
        raise MissingAttribute(f"{keyword} is longer than 64 characters")
    return value


def instance_record(ds: Dataset | PlainHeader) -> InstanceRecord:
    """What the ``Instance`` row of ``ds`` records of its header (storage and disposition are added by
    whoever stores it). Values are read with :func:`pacs_node.dicom.datasets.header_value`: those a
    previous dataset held in the same bytes are not converted again.

    Raises :class:`MissingAttribute` when a UID needed to file the instance is absent."""
    fields = {column: column_value(column, header_value(ds, keyword)) for column, keyword in COLUMNS.items()}
    if isinstance(ds, PlainHeader):
        tsyntax = ds.transfer_syntax_uid
    else:
        meta = getattr(ds, "file_meta", None)
        tsyntax = str(getattr(meta, "TransferSyntaxUID", "") or "") if meta is not None else ""
    return InstanceRecord(transfer_syntax_uid=tsyntax or DEFAULT_TRANSFER_SYNTAX, **fields)


def column_value(column: str, value: Any) -> Any:
    """What ``column`` (of :data:`COLUMNS`) records of its attribute's ``value`` (None where the dataset
    has no such attribute): one column at a time, for the result templates, which hold the values of a
    result object's attributes without a dataset. Raises :class:`MissingAttribute` for a UID column."""
    if column in _UID_COLUMNS:
        return _required_uid(value, _UID_COLUMNS[column])
    if column in _TEXT_COLUMNS:
        text = sanitised(str(value)).strip() if value is not None else ""
        return _clip(column, text) if text else None
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def declared_pixels(ds: Dataset) -> int:
    """Rows x Columns x Number of Frames as the header declares them (0 where there are none), for the
    checks made before any pixel is decoded. Raises ``ValueError`` when they are not numbers."""
    try:
        return int(ds.get("Rows", 0) or 0) * int(ds.get("Columns", 0) or 0) * int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"image dimensions are not numbers: {exc}") from None
