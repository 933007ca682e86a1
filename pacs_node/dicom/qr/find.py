"""C-FIND over the ``instances`` table: the identifier's matching keys become conditions
(:mod:`pacs_node.dicom.qr.matching`), :mod:`storage.query` runs the two queries (the keys of the matching
entities, then their attributes and counts), and each entity becomes a pending response identifier.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from pydicom import Dataset
from pydicom.charset import convert_encodings, default_encoding
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.tag import BaseTag
from pydicom.valuerep import CUSTOMIZABLE_CHARSET_VR
from pynetdicom.dsutils import encode
from sqlalchemy.orm import Session

from pacs_node.dicom.qr.matching import ATTRIBUTES, COUNTS, LEVEL_KEY, Level, identifier_conditions
from storage import query

#: The character set of every response identifier: values come from the database as Unicode.
RESPONSE_CHARACTER_SET = "ISO_IR 192"
_RESPONSE_ENCODINGS = convert_encodings(RESPONSE_CHARACTER_SET)


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
    out.SpecificCharacterSet = RESPONSE_CHARACTER_SET
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


_UNIQUE_KEYS = ((Level.STUDY, "StudyInstanceUID"), (Level.SERIES, "SeriesInstanceUID"),
                (Level.IMAGE, "SOPInstanceUID"))
#: VRs whose values this encoder writes as text (all a C-FIND key of ours can have, but US).
_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC",
                       "UI", "UR", "UT"})


def _encoded_text(value: Any, vr: str) -> bytes:
    if value is None or value == "":
        return b""
    if isinstance(value, (list, tuple)):
        text = "\\".join(str(v) for v in value)
    else:
        text = str(value)
    data = text.encode("utf-8" if vr in CUSTOMIZABLE_CHARSET_VR else default_encoding)
    if len(data) % 2:
        data += b"\0" if vr == "UI" else b" "
    return data


def _encoded_us(value: Any, vr: str) -> bytes:
    return b"" if value is None or value == "" else struct.pack("<H", int(value))


_IMPLICIT_HEADER = struct.Struct("<HHL")  # group, element, length
_EXPLICIT_HEADER = struct.Struct("<HH2sH")  # group, element, VR, length
_EXPLICIT_LONG_HEADER = struct.Struct("<HH2s2xL")  # group, element, VR, reserved, length
#: The VRs of ours with a 4-byte length in explicit VR (PS3.5 7.1.2).
_LONG_VRS = frozenset({"SQ", "UC", "UR", "UT"})


class EncodedIdentifier(Dataset):
    """A response identifier that also carries its own encoding (``encoded``, in the syntax
    ``encoded_as`` = (implicit VR, little endian)): :func:`encode_pre_encoded` hands those bytes to
    pynetdicom instead of having pydicom write the dataset again."""

    encoded: bytes
    encoded_as: tuple[bool, bool]


def encode_pre_encoded(ds: Dataset, is_implicit_vr: bool, is_little_endian: bool,
                       deflated: bool = False) -> bytes | None:
    """pynetdicom's ``dsutils.encode`` (same signature), except that an :class:`EncodedIdentifier`
    asked for in the syntax it was encoded in is answered with its bytes. Installed as
    ``pynetdicom.service_class.encode`` while a listener runs (:mod:`pacs_node.dicom.adjustments`): the
    name pynetdicom's service classes encode response identifiers with."""
    if isinstance(ds, EncodedIdentifier) and not deflated and ds.encoded_as == (is_implicit_vr, is_little_endian):
        return ds.encoded
    return encode(ds, is_implicit_vr, is_little_endian, deflated)


class IdentifierEncoder:
    """The pending-response identifiers of one C-FIND, encoded cheaply: which keys to return, with
    which VR and from where, is worked out once per request; each match then becomes a dataset of
    already-encoded elements, which pydicom writes as they are, and which also carries the bytes they
    encode to (:class:`EncodedIdentifier`, for :func:`encode_pre_encoded`). Element for element and byte for byte
    the same as :func:`response_identifier` written in the negotiated (little endian) syntax, which
    stays the reference (and QIDO-RS's builder); a ``pydicom`` ``Dataset`` built key by key, validated
    and then encoded costs several times as much per match, and C-FIND answers with one per match.

    :meth:`for_request` gives ``None`` where this encoder does not apply (a big endian syntax, a key
    whose VR depends on other elements): the caller uses :func:`response_identifier` then."""

    def __init__(self, fields: list[tuple[BaseTag, str, Callable[[dict[str, Any]], Any]]], implicit_vr: bool) -> None:
        self._fields = fields
        self._implicit_vr = implicit_vr

    @classmethod
    def for_request(cls, request: Dataset, level: Level, retrieve_ae_title: str | None, *,
                    implicit_vr: bool, little_endian: bool) -> IdentifierEncoder | None:
        if not little_endian:
            return None
        fixed: dict[str, Any] = {"SpecificCharacterSet": RESPONSE_CHARACTER_SET,
                                 "QueryRetrieveLevel": level.value}
        wanted: dict[str, Callable[[dict[str, Any]], Any]] = {
            keyword: (lambda row, value=value: value) for keyword, value in fixed.items()}
        for element in request:
            keyword = element.keyword
            if keyword in fixed or not keyword:
                continue
            if element.VR == "SQ":
                wanted[keyword] = lambda row: None
            elif keyword in ATTRIBUTES and ATTRIBUTES[keyword].level.depth <= level.depth:
                wanted[keyword] = lambda row, keyword=keyword: row.get(keyword)
            elif keyword in COUNTS and COUNTS[keyword] is level:
                wanted[keyword] = lambda row, keyword=keyword: _count_value(keyword, row)
            elif keyword == "RetrieveAETitle":
                wanted[keyword] = lambda row: retrieve_ae_title
            else:
                wanted[keyword] = lambda row: None
        for unique_level, keyword in _UNIQUE_KEYS:
            if unique_level.depth <= level.depth and keyword not in wanted:
                wanted[keyword] = lambda row, keyword=keyword: row.get(keyword)
        if level is Level.PATIENT and "PatientID" not in wanted:
            wanted["PatientID"] = lambda row: row.get("PatientID")
        fields = []
        for keyword, value in wanted.items():
            tag = BaseTag(tag_for_keyword(keyword))
            vr = dictionary_VR(tag)
            if vr != "SQ" and vr != "US" and vr not in _TEXT_VRS:
                return None  # e.g. "US or SS": pydicom decides from other elements
            fields.append((tag, vr, value))
        fields.sort(key=lambda field: field[0])
        return cls(fields, implicit_vr)

    def identifier(self, row: dict[str, Any]) -> EncodedIdentifier:
        """The identifier for one match (``row`` as :func:`entity_rows` gives it)."""
        implicit = self._implicit_vr
        elements = {}
        parts = []
        for tag, vr, value in self._fields:
            data = b"" if vr == "SQ" else (_encoded_us if vr == "US" else _encoded_text)(value(row), vr)
            elements[tag] = RawDataElement(tag, None if implicit else vr, len(data), data, 0, implicit, True)
            group, element = tag >> 16, tag & 0xFFFF
            if implicit:
                parts.append(_IMPLICIT_HEADER.pack(group, element, len(data)))
            elif vr in _LONG_VRS:
                parts.append(_EXPLICIT_LONG_HEADER.pack(group, element, vr.encode(), len(data)))
            else:
                parts.append(_EXPLICIT_HEADER.pack(group, element, vr.encode(), len(data)))
            parts.append(data)
        out = EncodedIdentifier(elements)
        out.set_original_encoding(implicit, True, _RESPONSE_ENCODINGS)
        out.__dict__["encoded"] = b"".join(parts)
        out.__dict__["encoded_as"] = (implicit, True)
        return out
