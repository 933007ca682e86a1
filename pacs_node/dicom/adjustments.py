"""The changes to pynetdicom's process-wide behaviour that the association server needs.

pynetdicom keeps some choices in module globals (``pynetdicom._config``, the temp file class of
``pynetdicom.dimse_messages``). Importing this package changes none of them: the server applies them
when it starts (:func:`apply_pynetdicom_adjustments`) and the last server to stop puts pynetdicom back as
it was (:func:`undo_pynetdicom_adjustments`), so an SCU in a process without a running server (``pacs-node
send``, a test's requestor) sees stock pynetdicom.
"""

from __future__ import annotations

import threading
from typing import Any

from pynetdicom import _config, dimse_messages, service_class

from pacs_node.dicom.command_sets import encode_command_set, reuse_pending_command_sets
from pacs_node.dicom.qr.find import encode_pre_encoded
from pacs_node.dicom.spooling import open_receive_file

#: The adjustments: (module, attribute, value while a server runs).
_ADJUSTMENTS: tuple[tuple[Any, str, Any], ...] = (
    # Receive C-STORE datasets straight to a file instead of into memory: a 30 MB radiograph never has
    # to fit in RAM, and the file is created inside the store (see pacs_node.dicom.spooling).
    (_config, "STORE_RECV_CHUNKED_DATASET", True),
    # pynetdicom logs C-FIND/C-MOVE identifiers, asked and answered (patient names and IDs), unless told not to.
    (_config, "LOG_REQUEST_IDENTIFIERS", False),
    (_config, "LOG_RESPONSE_IDENTIFIERS", False),
    # A write error while spooling (disk full) becomes a 0xA700 answer instead of a dead association.
    (dimse_messages, "NamedTemporaryFile", open_receive_file),
    # A C-STORE given a file's path (C-MOVE/C-GET sub-operations, pacs_node.dicom.qr.sending) streams
    # the stored data set from disk instead of decoding and re-encoding it.
    (_config, "STORE_SEND_CHUNKED_DATASET", True),
    # Command sets written with struct instead of pydicom's writer, byte for byte the same: a third of
    # the CPU of a C-FIND answer or a C-MOVE sub-operation (see pacs_node.dicom.command_sets).
    (dimse_messages, "encode", encode_command_set),
    # C-FIND response identifiers the Q/R SCP encoded itself go out as they are (pacs_node.dicom.qr.find).
    (service_class, "encode", encode_pre_encoded),
    # The pending responses of a C-FIND, C-MOVE or C-GET reuse one command set (pacs_node.dicom.command_sets).
    (dimse_messages.C_FIND_RSP, "primitive_to_message", reuse_pending_command_sets),
    (dimse_messages.C_MOVE_RSP, "primitive_to_message", reuse_pending_command_sets),
    (dimse_messages.C_GET_RSP, "primitive_to_message", reuse_pending_command_sets),
)

_lock = threading.Lock()
_servers = 0
_saved: list[Any] = []


def apply_pynetdicom_adjustments() -> None:
    """Apply the adjustments for one more running server (counted; see :func:`undo_pynetdicom_adjustments`)."""
    global _servers
    with _lock:
        if _servers == 0:
            _saved[:] = [getattr(module, name) for module, name, _ in _ADJUSTMENTS]
            for module, name, value in _ADJUSTMENTS:
                setattr(module, name, value)
        _servers += 1


def undo_pynetdicom_adjustments() -> None:
    """One server fewer; when none is left, pynetdicom's own values come back."""
    global _servers
    with _lock:
        if _servers == 0:
            return
        _servers -= 1
        if _servers == 0:
            for (module, name, _), value in zip(_ADJUSTMENTS, _saved, strict=True):
                setattr(module, name, value)
