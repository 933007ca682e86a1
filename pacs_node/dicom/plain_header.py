"""The receive path's header reader for the datasets modalities send every day, without pydicom's
element machinery: little endian, not deflated, nothing unusual in it.

pydicom reading a small header and converting each of its elements (so that an undecodable one is
refused at once, :func:`pacs_node.dicom.datasets.decode_every_element`) costs ~0.8 ms of CPU per
instance: a third of what the listener spends on a tiny C-STORE. This reader walks the same bytes with
``struct`` and keeps, for the few attributes the row and the acceptance policy read, the value pydicom
would give them. It answers only where it can be sure it agrees with pydicom: every element's VR is
known and its value is one pydicom converts without raising (a number of the right length, a text
without ISO 2022 escapes, a DS or IS that is a plain number, a sequence whose items are well formed), the
attributes it keeps are single values in ASCII, the encoding is the transfer syntax's, the character set
is one whose ASCII is ASCII. Anything else, including everything pydicom would refuse, is ``None``:
the caller reads the file with pydicom, which then decides (and words the refusal) as before.
``tests/pacs_node/dicom/test_plain_header.py`` runs both over many datasets and their corruptions.
"""

from __future__ import annotations

import math
import os
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.datadict import dictionary_VR, private_dictionary_VR, tag_for_keyword
from pydicom.uid import UID

#: Bytes read at once (as :func:`pacs_node.dicom.datasets.read_header` reads them from memory).
PROBE_BYTES = 64 * 1024

#: Attributes whose values are kept (what :mod:`pacs_node.work.instance_record`, the acceptance policy,
#: routing and the pixel size check read).
KEYWORDS = (
    "SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID", "PatientID", "PatientName",
    "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "AccessionNumber", "StudyID",
    "StudyDescription", "ReferringPhysicianName", "Modality", "SeriesDescription", "BodyPartExamined",
    "SeriesNumber", "InstanceNumber", "Rows", "Columns", "ProtocolName", "StationName", "SamplesPerPixel",
    "BitsAllocated", "PhotometricInterpretation", "NumberOfFrames",
)
#: The kept attributes by tag, with the VR the dictionary gives them (an element of another VR is left to
#: pydicom).
_KEPT: dict[int, tuple[str, str]] = {
    tag: (keyword, dictionary_VR(tag)) for keyword in KEYWORDS if (tag := tag_for_keyword(keyword)) is not None}

_EXPLICIT_LE = "1.2.840.10008.1.2.1"
_IMPLICIT_LE = "1.2.840.10008.1.2"
_LONG_LENGTH = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})
_BYTES = frozenset({"OB", "OD", "OF", "OL", "OV", "OW"})
_NUMBERS = {"US": 2, "SS": 2, "UL": 4, "SL": 4, "FL": 4, "FD": 8, "SV": 8, "UV": 8, "AT": 4}
#: Decoded as ISO 8859-1 whatever the character set (pydicom's ``default_encoding``): cannot fail.
_LATIN = frozenset({"AE", "AS", "CS", "DA", "DT", "TM", "UI", "UR"})
#: Decoded with the character set: cannot fail while there is no ISO 2022 escape in them.
_CHARSET_TEXT = frozenset({"SH", "LO", "ST", "LT", "UC", "UT"})
_KNOWN_VRS = _LONG_LENGTH | _BYTES | frozenset(_NUMBERS) | _LATIN | _CHARSET_TEXT | {"PN", "DS", "IS"}
#: Specific Character Set values read here, with the codec pydicom decodes their text with (the default,
#: ISO 8859-1, where there is none).
_CHARSETS = {b"": "latin-1", b"ISO_IR 6": "latin-1", b"ISO_IR 100": "latin-1", b"ISO_IR 192": "utf-8"}
_CHARSET_VRS = _CHARSET_TEXT | {"PN"}
_IS = re.compile(rb" *[+-]?[0-9]{1,10} *")
_DS = re.compile(rb" *[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]{1,3})? *")
_KEPT_INTEGER = re.compile(rb"[0-9]{1,9}")
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00009, 0x7FE00008})
_CHARSET_TAG = 0x00080005
_HEAD = struct.Struct("<HH2sH")
_IMPLICIT_HEAD = struct.Struct("<HHL")
_LONG = struct.Struct("<L")
_US = struct.Struct("<H")


class _Unsure(Exception):
    """Something pydicom might read otherwise than this reader: pydicom reads the file."""


@dataclass(frozen=True)
class PlainHeader:
    """What the receive path needs of a header read by :func:`read_plain_header`: the kept attributes'
    values (as pydicom converts them), the Transfer Syntax UID, the dataset's size and where its Pixel
    Data element is."""

    values: dict[str, Any]
    transfer_syntax_uid: str
    #: Bytes of the dataset after the file meta.
    dataset_bytes: int
    #: File offset of the Pixel Data element, ``None`` when there is none.
    pixel_offset: int | None
    #: Whether the transfer syntax is an encapsulated (compressed) one.
    encapsulated: bool

    def get(self, keyword: str) -> Any:
        """The attribute's value as pydicom gives it (``None`` when absent). Only :data:`KEYWORDS` are
        kept: any other raises ``KeyError``, so that a new reader of the header cannot be given ``None``
        for an attribute the dataset has."""
        if keyword not in _KEPT_KEYWORDS:
            raise KeyError(f"{keyword} is not kept by the plain header reader")
        return self.values.get(keyword)


_KEPT_KEYWORDS = frozenset(KEYWORDS)


def read_plain_header(path: Path) -> PlainHeader | None:
    """The header of the file at ``path``, or ``None`` when pydicom must read it (see the module)."""
    with open(path, "rb", buffering=0) as fp:
        data = fp.read(PROBE_BYTES)
        end = os.fstat(fp.fileno()).st_size
    try:
        return _read(data, end)
    except (_Unsure, struct.error, IndexError, KeyError, UnicodeDecodeError, ValueError):
        return None


def _read(data: bytes, end: int) -> PlainHeader:
    """:func:`read_plain_header` of the file's first bytes ``data`` (``end``: its size); raises where
    pydicom must read it."""
    if len(data) < 144 or data[128:132] != b"DICM":
        raise _Unsure
    meta_end, syntax = _file_meta(data)
    if syntax == _EXPLICIT_LE:
        implicit, encapsulated = False, False
    elif syntax == _IMPLICIT_LE:
        implicit, encapsulated = True, False
    else:
        uid = UID(syntax)
        if not (uid.is_transfer_syntax and uid.is_encapsulated and uid.is_little_endian and not uid.is_deflated):
            raise _Unsure
        implicit, encapsulated = False, True
    if len(data) >= meta_end + 6:
        head = data[meta_end + 4:meta_end + 6]
        if implicit == (0x40 < head[0] < 0x5B and 0x40 < head[1] < 0x5B):
            raise _Unsure  # pydicom would switch encodings (the listener then refuses the dataset)
        if data[meta_end + 1] == 0 and data[meta_end] == 0:
            raise _Unsure  # a command set after the file meta
    values: dict[str, Any] = {}
    position, pixel_offset = _top_level(data, meta_end, implicit, values)
    if pixel_offset is None and len(data) < end:
        raise _Unsure  # the header goes on beyond the probe
    if pixel_offset is None and position != end:
        raise _Unsure  # a few bytes pydicom would ignore
    return PlainHeader(values, syntax, end - meta_end, pixel_offset if pixel_offset is None or pixel_offset < end
                       else None, encapsulated)


def _file_meta(data: bytes) -> tuple[int, str]:
    """The end of the file meta and the Transfer Syntax UID: group 0002 in explicit VR little endian,
    its group length first and exact."""
    group, element, vr, length = _HEAD.unpack_from(data, 132)
    if (group, element, vr, length) != (2, 0, b"UL", 4):
        raise _Unsure
    meta_end = 144 + _LONG.unpack_from(data, 140)[0]
    position, syntax = 144, None
    previous = 0x00020000
    while position < meta_end:
        tag, vr_name, length, value_at = _explicit_element(data, position)
        if tag >> 16 != 2 or tag <= previous or length == _UNDEFINED or vr_name in ("SQ", "UN"):
            raise _Unsure
        if vr_name != dictionary_VR(tag):
            raise _Unsure  # pydicom keeps a file meta value of another VR as it is (a str, not a UID)
        value = data[value_at:value_at + length]
        _check_value(vr_name, value, tag)
        if tag == 0x00020010:
            syntax = _ascii(value).rstrip("\x00 ")
            if syntax != syntax.strip():
                raise _Unsure  # pydicom's UID strips all whitespace; the row must record what it records
        previous, position = tag, value_at + length
    if position != meta_end or syntax is None or "\\" in syntax:
        raise _Unsure
    if len(data) >= meta_end + 2 and data[meta_end + 1] == 0 and data[meta_end] == 2:
        raise _Unsure  # group 0002 goes on past its length
    return meta_end, syntax


def _explicit_element(data: bytes, position: int) -> tuple[int, str, int, int]:
    group, element, raw_vr, length = _HEAD.unpack_from(data, position)
    vr = raw_vr.decode("latin-1")
    if vr not in _KNOWN_VRS:
        raise _Unsure
    if vr in _LONG_LENGTH:
        if length != 0:
            raise _Unsure  # the reserved bytes
        return group << 16 | element, vr, _LONG.unpack_from(data, position + 8)[0], position + 12
    return group << 16 | element, vr, length, position + 8


def _implicit_element(data: bytes, position: int) -> tuple[int, str | None, int, int]:
    group, element, length = _IMPLICIT_HEAD.unpack_from(data, position)
    return group << 16 | element, None, length, position + 8


def _implicit_vr(tag: int, creators: dict[int, bytes] | None, codec: str) -> str:
    """The VR pydicom gives an implicit VR element: its dictionary's (never an ambiguous one), or for a
    private element (with ``creators``, the private creator elements seen so far) LO for a creator, the
    private dictionary's VR under its creator, else UN (bytes, as :data:`_BYTES`). A tag it does not know
    makes this reader unsure."""
    if tag >> 16 & 1:
        element = tag & 0xFFFF
        if 0x10 <= element <= 0xFF:
            return "LO"  # a private creator
        if creators is None:
            raise _Unsure
        creator = creators.get(tag & 0xFFFF0000 | element >> 8) if element & 0xFF00 else None
        if not creator:
            return "OB"  # (UN)
        if b"\\" in creator or b"\x1b" in creator:
            raise _Unsure
        name = creator.decode(codec, errors="replace").rstrip("\x00 ")
        if not name:
            return "OB"
        try:
            vr = private_dictionary_VR(tag, name)
        except KeyError:
            return "OB"
    else:
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            raise _Unsure from None
    if vr not in _KNOWN_VRS or vr == "UN":
        raise _Unsure
    return vr


def _top_level(data: bytes, position: int, implicit: bool, values: dict[str, Any]) -> tuple[int, int | None]:
    """Walk the dataset's top-level elements up to Pixel Data: each checked to convert, the kept ones'
    values into ``values``; the position reached and the Pixel Data element's offset."""
    previous = -1
    size = len(data)
    codec = "latin-1"
    creators: dict[int, bytes] = {}
    while position < size:
        if size - position < 8:
            raise _Unsure
        if implicit:
            tag, vr, length, value_at = _implicit_element(data, position)
        else:
            tag, vr, length, value_at = _explicit_element(data, position)
        if tag in _PIXEL_TAGS:
            return position, position
        if tag <= previous or tag >> 16 <= 2 or tag >> 16 == 0xFFFE:
            raise _Unsure
        if implicit:
            vr = _implicit_vr(tag, creators, codec)
        assert vr is not None
        if vr == "SQ":
            position = _sequence(data, value_at, length, implicit)
            previous = tag
            continue
        if length == _UNDEFINED or value_at + length > size:
            raise _Unsure
        value = data[value_at:value_at + length]
        if tag >> 16 & 1 and 0x10 <= (tag & 0xFFFF) <= 0xFF:
            creators[tag] = value
        if tag == _CHARSET_TAG:
            codec = _CHARSETS.get(value.rstrip(b" \x00"), "")
            if vr != "CS" or not codec:
                raise _Unsure
        _check_value(vr, value, tag)
        kept = _KEPT.get(tag)
        if kept is not None:
            keyword, expected_vr = kept
            if vr != expected_vr:
                raise _Unsure
            values[keyword] = _kept_value(vr, value, codec if vr in _CHARSET_VRS else "latin-1")
        previous, position = tag, value_at + length
    return position, None


def _check_value(vr: str, value: bytes, tag: int) -> None:
    """Raise :class:`_Unsure` unless pydicom converts ``value`` as ``vr`` without raising."""
    if vr in _LATIN or vr in _BYTES:
        return
    if vr in _CHARSET_TEXT:
        if b"\x1b" in value:
            raise _Unsure
        return
    size = _NUMBERS.get(vr)
    if size is not None:
        if len(value) % size:
            raise _Unsure
        return
    if vr == "PN":
        if b"\x1b" in value:
            raise _Unsure
        return
    if vr in ("IS", "DS"):
        if not value:
            return
        parts = value.rstrip(b" \x00").split(b"\\")
        for part in parts:
            if vr == "IS":
                if not _IS.fullmatch(part) or not -2**31 <= int(part) < 2**31:
                    raise _Unsure
            elif len(part) > 16 or not _DS.fullmatch(part) or not math.isfinite(float(part)):
                raise _Unsure
        return
    raise _Unsure  # UN, and anything not listed


def _ascii(value: bytes) -> str:
    if not value.isascii():
        raise _Unsure
    return value.decode("ascii")


def _kept_value(vr: str, value: bytes, codec: str) -> Any:
    """A kept attribute's value as pydicom converts it (a single value; text decoded with ``codec``, an
    undecodable byte replaced, as pydicom does after its warning)."""
    if vr in ("US", "IS") and not value:
        return None  # pydicom's empty value of a number
    if vr == "US":
        if len(value) != 2:
            raise _Unsure
        return _US.unpack(value)[0]
    if not value:
        return ""
    if b"\\" in value or b"\x1b" in value:
        raise _Unsure
    if vr == "PN":
        if b"=" in value:
            raise _Unsure  # pydicom drops a name's empty trailing component groups
        return value.rstrip(b"\x00 ").decode(codec, errors="replace")
    text = value.decode(codec, errors="replace").rstrip("\x00 ")
    if vr == "IS":
        if not _KEPT_INTEGER.fullmatch(text.encode()):
            raise _Unsure
        return int(text)
    return text.strip() if vr == "UI" else text  # (pydicom's UID strips)


def _sequence(data: bytes, start: int, length: int, implicit: bool) -> int:
    """Walk a sequence value starting at ``start`` as pydicom's ``read_sequence`` reads it, accepting only
    well-formed items; the position after it."""
    return _walk(data, start, length, _SEQUENCE_END, lambda position: _item(data, position, implicit))


def _item(data: bytes, position: int, implicit: bool) -> int:
    """One item (tag, length, its elements, the delimiter of an undefined-length one); the position
    after it."""
    if position + 8 > len(data):
        raise _Unsure
    tag, _, length, _ = _implicit_element(data, position)
    if tag != _ITEM:
        raise _Unsure
    return _walk(data, position + 8, length, _ITEM_END, lambda at: _nested_element(data, at, implicit))


def _walk(data: bytes, start: int, length: int, delimiter: int, step: Callable[[int], int]) -> int:
    """Take ``step`` (a position -> the position after what starts there) from ``start`` to the end of a
    value of ``length`` bytes, or, for an undefined length, to its ``delimiter`` (of length 0); the
    position after it. A value that does not end exactly there makes this reader unsure."""
    if length != _UNDEFINED:
        end = start + length
        if end > len(data):
            raise _Unsure
        position = start
        while position < end:
            position = step(position)
        if position != end:
            raise _Unsure
        return end
    position = start
    while True:
        if position + 8 > len(data):
            raise _Unsure
        tag, _, delimiter_length, _ = _implicit_element(data, position)
        if tag == delimiter:
            if delimiter_length != 0:
                raise _Unsure
            return position + 8
        position = step(position)


def _nested_element(data: bytes, position: int, implicit: bool) -> int:
    """An element inside an item: only its structure matters now (pydicom converts nested values when
    they are read); a nested sequence is walked. The position after it."""
    if position + 8 > len(data):
        raise _Unsure
    if implicit:
        tag, vr, length, value_at = _implicit_element(data, position)
    else:
        tag, vr, length, value_at = _explicit_element(data, position)
    if tag >> 16 == 0xFFFE:
        raise _Unsure
    if length == _UNDEFINED:
        if (vr if vr is not None else _implicit_vr(tag, None, "latin-1")) != "SQ":
            raise _Unsure
        return _sequence(data, value_at, length, implicit)
    if value_at + length > len(data):
        raise _Unsure
    return value_at + length
