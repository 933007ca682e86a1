"""DIMSE command sets encoded without pydicom's general-purpose writer.

pynetdicom encodes every message's command set twice with pydicom's ``write_dataset`` (once to learn
its length for Command Group Length, once to send it), about a tenth of a millisecond each on this
machine: a third of the CPU a C-FIND answer of 1,000 matches or a C-MOVE of 1,000 small instances costs
(two messages per sub-operation), since the data sets themselves are pre-encoded or streamed
(:mod:`pacs_node.dicom.qr`). A command set is always Implicit VR Little Endian (PS3.7 6.3.1) and, for
the messages that come in bulk, holds only US, UL, UI and AE elements of one value each: those are
written here with ``struct``; a command set with anything else (an Error Comment, an Offending Element
list) goes to pynetdicom's own encoder. :mod:`pacs_node.dicom.adjustments` installs
:func:`encode_command_set` as ``pynetdicom.dimse_messages.encode``, where pynetdicom encodes command sets
and nothing else; the bytes are the same (tested against pydicom's encoding of every message type).

:func:`reuse_pending_command_sets` builds the command set of the pending responses of a C-FIND,
C-MOVE or C-GET once per request; :func:`store_response_init` and :func:`store_response_to_message`
build a C-STORE-RSP's directly.

The receive side: :func:`decode_command_set`, installed as ``pynetdicom.dimse_messages.decode`` (where
pynetdicom decodes received command sets and nothing else), reads a command set of the same kinds of
element with ``struct`` into a dataset of already converted elements, instead of pydicom's reader and
its lazy conversion of each element when pynetdicom reads it (about 0.3 ms of every received message on
this machine, a C-STORE-RQ included). The elements, their VRs and values (types included) are what
pydicom's own decoding gives; anything else (another VR, an empty or multi-valued element, a length that
does not fit) is decoded by pynetdicom's ``decode``, whole.
"""

from __future__ import annotations

import struct
from io import BytesIO
from typing import Any

from pydicom import DataElement, Dataset
from pydicom.charset import default_encoding
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.tag import BaseTag
from pydicom.uid import UID
from pynetdicom import dimse_messages
from pynetdicom.dsutils import decode, encode

#: pynetdicom's own, for the messages :func:`reuse_pending_command_sets` does not reuse.
_stock_primitive_to_message = dimse_messages.DIMSEMessage.primitive_to_message
_HEADER = struct.Struct("<HHL")  # implicit VR: group, element, value length
_US = struct.Struct("<H")
_UL = struct.Struct("<L")


def encode_command_set(ds: Dataset, is_implicit_vr: bool, is_little_endian: bool,
                       deflated: bool = False) -> bytes | None:
    """``ds`` encoded as pynetdicom's ``dsutils.encode`` would encode it (same signature)."""
    if not (is_implicit_vr and is_little_endian) or deflated:
        return encode(ds, is_implicit_vr, is_little_endian, deflated)
    parts = []
    for tag in sorted(ds.keys()):
        elem = ds.get_item(tag)
        if tag >> 16 or elem.is_raw:
            return encode(ds, is_implicit_vr, is_little_endian, deflated)
        vr, value = elem.VR, elem.value
        if value is None or value == "":
            data = b""
        elif vr == "US" and type(value) is int:
            data = _US.pack(value)
        elif vr == "UL" and type(value) is int:
            data = _UL.pack(value)
        elif vr in ("UI", "AE") and isinstance(value, str):
            data = value.encode(default_encoding)
            if len(data) % 2:
                data += b"\0" if vr == "UI" else b" "
        else:
            return encode(ds, is_implicit_vr, is_little_endian, deflated)
        parts.append(_HEADER.pack(tag >> 16, tag & 0xFFFF, len(data)))
        parts.append(data)
    return b"".join(parts)


#: VRs of the command elements :func:`decode_command_set` decodes itself; a tag not known here or of
#: another VR goes to pynetdicom's decoder.
_DECODED_VRS = ("US", "UL", "UI", "AE")
_command_vrs: dict[int, str | None] = {}


def _command_vr(tag: int) -> str | None:
    vr = _command_vrs.get(tag, "")
    if vr == "":
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            vr = None
        if vr not in _DECODED_VRS:
            vr = None
        _command_vrs[tag] = vr
    return vr


def decode_command_set(bytestring: BytesIO, is_implicit_vr: bool, is_little_endian: bool,
                       deflated: bool = False) -> Dataset:
    """``bytestring`` decoded as pynetdicom's ``dsutils.decode`` would decode it (same signature), its
    elements already converted."""
    if not (is_implicit_vr and is_little_endian) or deflated:
        return decode(bytestring, is_implicit_vr, is_little_endian, deflated)
    data = bytestring.getvalue()
    end = len(data)
    elements = []
    offset = 0
    header = _HEADER.unpack_from
    while offset < end:
        if end - offset < 8:
            return decode(bytestring, is_implicit_vr, is_little_endian, deflated)
        group, element, length = header(data, offset)
        offset += 8
        tag = group << 16 | element
        vr = _command_vr(tag) if group == 0 else None
        if vr is None or length == 0 or offset + length > end:
            return decode(bytestring, is_implicit_vr, is_little_endian, deflated)
        raw = data[offset:offset + length]
        offset += length
        value: int | str
        if vr == "US" and length == 2:
            value = _US.unpack(raw)[0]
        elif vr == "UL" and length == 4:
            value = _UL.unpack(raw)[0]
        elif vr == "UI" or vr == "AE":
            try:
                text = raw.decode(default_encoding)
            except UnicodeDecodeError:
                return decode(bytestring, is_implicit_vr, is_little_endian, deflated)
            if "\\" in text:
                return decode(bytestring, is_implicit_vr, is_little_endian, deflated)
            value = UID(text.rstrip("\0 ")) if vr == "UI" else text.strip()
        else:
            return decode(bytestring, is_implicit_vr, is_little_endian, deflated)
        elements.append(DataElement(tag, vr, value, already_converted=True))  # as pydicom converts: unvalidated
    ds = Dataset()
    for elem in elements:
        ds.add(elem)
    ds.set_original_encoding(True, True, default_encoding)
    return ds


#: Command sets of pending responses built so far: (message class, SOP class, message ID, status) -> command set.
_PENDING_COMMAND_SETS: dict[tuple[str, str, int, int], Dataset] = {}
_PENDING_KEPT = 64
_STATUS_PENDING = (0xFF00, 0xFF01)
#: The elements of a pending C-MOVE/C-GET response that change from one response to the next (all US).
_COUNTERS = tuple((BaseTag(tag_for_keyword(keyword)), keyword) for keyword in (
    "NumberOfRemainingSuboperations", "NumberOfCompletedSuboperations", "NumberOfFailedSuboperations",
    "NumberOfWarningSuboperations"))


def reuse_pending_command_sets(message: dimse_messages.DIMSEMessage, primitive: Any) -> None:
    """``primitive_to_message`` of C-FIND, C-MOVE and C-GET responses that builds the command set of a
    pending response once per (SOP class, message ID, status) and reuses it for the next responses of
    that request: shared as it is by C-FIND's, copied with the four sub-operation counters set by
    C-MOVE's and C-GET's (US values: Command Group Length does not change).

    A C-FIND of 1,000 matches answers with 1,000 pending responses whose command sets are the same; a
    C-MOVE of 1,000 instances with 1,000 that differ only in their counters. pynetdicom builds each one
    element by element with validated values, then encodes it to learn Command Group Length: about half
    of what a pending C-FIND response costs once its identifier is pre-encoded. The command set of a
    message is only read once it is built (encoded, and described by pynetdicom's narration), so sharing
    it is safe. Anything but a plain pending response (an error comment, an offending element, a
    counter missing) is built by pynetdicom as usual. Installed while a listener runs
    (:mod:`pacs_node.dicom.adjustments`)."""
    counted = not isinstance(message, dimse_messages.C_FIND_RSP)
    if (primitive.Status not in _STATUS_PENDING or primitive.ErrorComment is not None
            or primitive.OffendingElement is not None or getattr(primitive, "_dataset_path", None) is not None
            or (counted and any(type(getattr(primitive, keyword)) is not int for _, keyword in _COUNTERS))):
        _stock_primitive_to_message(message, primitive)
        return
    key = (type(message).__name__, str(primitive.AffectedSOPClassUID), primitive.MessageIDBeingRespondedTo,
           primitive.Status, primitive.Identifier is None)
    command_set = _PENDING_COMMAND_SETS.get(key)
    if command_set is None:
        _stock_primitive_to_message(message, primitive)
        if len(_PENDING_COMMAND_SETS) >= _PENDING_KEPT:
            _PENDING_COMMAND_SETS.clear()
        _PENDING_COMMAND_SETS[key] = message.command_set
        return
    if counted:
        elements = {tag: command_set.get_item(tag) for tag in command_set.keys()}
        for tag, keyword in _COUNTERS:
            elements[tag] = DataElement(tag, "US", getattr(primitive, keyword))
        command_set = Dataset(elements)
    message.command_set = command_set
    message.data_set = primitive.Identifier
    message._data_set_path = None


#: The command elements of a C-STORE-RSP that :func:`store_response_to_message` fills from its primitive;
#: CommandField, CommandDataSetType and CommandGroupLength are the message's own.
_STORE_RESPONSE_ELEMENTS = (
    (0x00000002, "UI", "AffectedSOPClassUID"),
    (0x00000120, "US", "MessageIDBeingRespondedTo"),
    (0x00000900, "US", "Status"),
    (0x00001000, "UI", "AffectedSOPInstanceUID"),
)
_C_STORE_RSP = 0x8001
_NO_DATA_SET = 0x0101
_stock_message_init = dimse_messages.DIMSEMessage.__init__


def store_response_init(message: dimse_messages.DIMSEMessage) -> None:
    """``C_STORE_RSP.__init__`` that leaves the command set empty for :func:`store_response_to_message`.

    pynetdicom's ``__init__`` first creates every element a C-STORE-RSP may carry with an empty value
    (a validated pydicom assignment each), and ``primitive_to_message`` then sets the four a plain
    response has and deletes the rest: about half a millisecond of CPU per received C-STORE on this
    machine, more than the rest of the response. The other attributes are pynetdicom's (its ``__init__``
    as for the base class, which sets no elements)."""
    cls = message.__class__
    message.__class__ = dimse_messages.DIMSEMessage
    try:
        _stock_message_init(message)
    finally:
        message.__class__ = cls


def store_response_to_message(message: dimse_messages.DIMSEMessage, primitive: Any) -> None:
    """``C_STORE_RSP.primitive_to_message`` for a message made by :func:`store_response_init`: the
    command set pynetdicom's would build (same elements and values, each value assigned as pydicom
    assigns it), built directly. A response with an Error Comment or an Offending Element (or a data
    set path), or a message made by pynetdicom's ``__init__``, gets pynetdicom's empty elements (those
    missing) and is built by pynetdicom's own method. Installed,
    with :func:`store_response_init`, while a listener runs (:mod:`pacs_node.dicom.adjustments`)."""
    if (len(message.command_set) or primitive.ErrorComment is not None or primitive.OffendingElement is not None
            or getattr(primitive, "_dataset_path", None) is not None):
        for keyword in dimse_messages._COMMAND_SET_KEYWORDS["C-STORE-RSP"]:
            if keyword not in message.command_set:
                setattr(message.command_set, keyword, None)
        _stock_primitive_to_message(message, primitive)
        return
    command_set = message.command_set
    for tag, vr, keyword in _STORE_RESPONSE_ELEMENTS:
        value = getattr(primitive, keyword)
        if value is not None:
            command_set.add(DataElement(tag, vr, value))
    command_set.add(DataElement(0x00000100, "US", _C_STORE_RSP))
    command_set.add(DataElement(0x00000800, "US", _NO_DATA_SET))
    command_set.add(DataElement(0x00000000, "UL", None))
    message.data_set = BytesIO()
    message._data_set_path = None
    message._set_command_group_length()
