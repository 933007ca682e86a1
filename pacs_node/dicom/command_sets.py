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
C-MOVE or C-GET once per request.
"""

from __future__ import annotations

import struct
from typing import Any

from pydicom import Dataset
from pydicom.charset import default_encoding
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.tag import BaseTag
from pynetdicom import dimse_messages
from pynetdicom.dsutils import encode

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
