"""C-MOVE and C-GET sub-operations that send a stored file as it is, instead of decoding it into a
pydicom dataset and encoding it again.

pynetdicom's C-MOVE/C-GET service takes a :class:`~pydicom.dataset.Dataset` per sub-operation from the
handler and gives it to ``send_c_store``. Reading a stored instance with ``dcmread`` and encoding it
again costs more CPU than all of pynetdicom's messaging for a small instance, and buys nothing when the
receiver accepted the syntax the file is stored in: the bytes it gets are the stored ones either way.
``send_c_store`` also takes a *path* and, with ``pynetdicom._config.STORE_SEND_CHUNKED_DATASET`` on
(:mod:`pacs_node.dicom.adjustments` turns it on while a listener runs), streams the file's data set from
disk without decoding it; with it off it reads the file with ``dcmread``, which is still correct.

So the handler yields a :class:`StoredFile` (a dataset that holds only the SOP Class and Instance UIDs,
which pynetdicom needs to list a failed sub-operation) and :func:`send_stored_files_as_they_are` makes
the sending association send it by its path (the exporter's :class:`pacs_node.dicom.scu.StoreAssociation`
sends its files the same way).

:func:`send_stored_file` writes such a C-STORE request itself, from the sending thread: pynetdicom's
way builds a primitive, a command set :class:`~pydicom.dataset.Dataset` element by validated element,
reads the file meta with pydicom, then queues a P-DATA primitive per fragment for the DUL thread to
wake, encode and send: two thirds of the sending thread's CPU per tiny result and a thread hand-off per
fragment. The request it writes is byte for byte pynetdicom's (the same command set, fragments and
PDUs); the response is still received and checked by pynetdicom.

:func:`skip_unlogged_narration` takes pynetdicom's narrating handlers off an association whose lines
nobody would see: they describe every message and PDU, a tenth of a C-MOVE sub-operation's CPU.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import ssl
import struct
import time
from pathlib import Path
from typing import Any, BinaryIO

from pydicom import Dataset
from pynetdicom import _config, evt
from pynetdicom._handlers import (
    standard_dimse_recv_handler,
    standard_dimse_sent_handler,
    standard_pdu_recv_handler,
    standard_pdu_sent_handler,
)
from pynetdicom.association import Association

log = logging.getLogger(__name__)


class StoredFile(Dataset):
    """One sub-operation's instance, sent as the stored file at ``path``: only an association prepared by
    :func:`send_stored_files_as_they_are` can send it (on any other its two elements are all there is)."""

    def __init__(self, sop_class_uid: str, sop_instance_uid: str, path: Path) -> None:
        super().__init__()
        self.SOPClassUID = sop_class_uid
        self.SOPInstanceUID = sop_instance_uid
        self.__dict__["stored_path"] = path  # not a data element


def send_stored_files_as_they_are(assoc: Association) -> None:
    """Make ``assoc.send_c_store`` send a :class:`StoredFile` by its path (see the module docstring);
    everything else goes to pynetdicom's ``send_c_store`` unchanged. Only this association is changed;
    calling it twice changes nothing more. A file that cannot be sent (gone, unreadable) is logged here
    and raises, which pynetdicom counts as a failed sub-operation (its UID in the Failed SOP Instance UID
    List)."""
    if "send_c_store" in vars(assoc):
        return
    send = assoc.send_c_store

    def send_c_store(dataset: Any, msg_id: int = 1, priority: int = 2, originator_aet: str | None = None,
                     originator_id: int | None = None) -> Dataset:
        if not isinstance(dataset, StoredFile):
            return send(dataset, msg_id, priority, originator_aet, originator_id)
        try:
            status = send_stored_file(assoc, dataset.stored_path, msg_id, priority, originator_aet, originator_id)
            if status is None:
                status = send(dataset.stored_path, msg_id, priority, originator_aet, originator_id)
            return status
        except Exception as exc:
            if assoc.is_established:  # else the association is gone, which pynetdicom reports itself
                log.error("cannot send stored instance %s (%s): %s", dataset.SOPInstanceUID,
                          dataset.stored_path, exc)
            raise

    assoc.send_c_store = send_c_store  # type: ignore[method-assign]


_ELEMENT = struct.Struct("<HHL")  # an implicit VR little endian element's tag and value length
_US = struct.Struct("<HHLH")  # a whole US element
_UL = struct.Struct("<HHLL")  # a whole UL element
_PDU = struct.Struct(">BBLLBB")  # a P-DATA-TF of one PDV: type, reserved, length; PDV length, context, control
_META_ELEMENT = struct.Struct("<HH2sH")  # an explicit VR little endian element with a 2-byte length
_LONG_VRS = frozenset((b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT"))
#: How much of a file is read at first: the File Meta Information and, for a result, all of it.
_HEAD = 64 * 1024
#: The notification events pynetdicom triggers for a request it sends and this way does not: with a
#: handler bound to either (pynetdicom's narration at DEBUG, a test's), pynetdicom sends.
_SENT_EVENTS = (evt.EVT_DIMSE_SENT, evt.EVT_PDU_SENT)
#: A UID as this way sends it; any other pynetdicom validates by its own rules.
_PLAIN_UID = re.compile(r"[0-9.]{1,64}")
#: The Command Field of a C-STORE-RQ, and pynetdicom's Command Data Set Type when a data set follows.
_C_STORE_RQ, _DATA_SET_PRESENT = 0x0001, 0x0001


def _text(tag: int, value: str, pad: bytes) -> bytes:
    raw = value.encode("ascii")
    if len(raw) % 2:
        raw += pad
    return _ELEMENT.pack(0, tag, len(raw)) + raw


def store_request_command_set(sop_class_uid: str, sop_instance_uid: str, msg_id: int, priority: int,
                              originator_aet: str | None, originator_id: int | None) -> bytes:
    """The C-STORE-RQ command set (implicit VR little endian) that pynetdicom encodes for these values,
    written with struct: the Affected SOP Class and Instance UIDs (padded with NUL), Command Field,
    Message ID, Priority, Command Data Set Type (a data set follows), the Move Originator's AE title
    (padded with a space) and Message ID when given, preceded by Command Group Length."""
    body = b"".join((
        _text(0x0002, sop_class_uid, b"\0"),
        _US.pack(0, 0x0100, 2, _C_STORE_RQ), _US.pack(0, 0x0110, 2, msg_id), _US.pack(0, 0x0700, 2, priority),
        _US.pack(0, 0x0800, 2, _DATA_SET_PRESENT),
        _text(0x1000, sop_instance_uid, b"\0"),
        b"" if originator_aet is None else _text(0x1030, originator_aet, b" "),
        b"" if originator_id is None else _US.pack(0, 0x1031, 2, originator_id),
    ))
    return _UL.pack(0, 0, 4, len(body)) + body


def _pdu(context_id: int, control: int, fragment: bytes | memoryview) -> bytes:
    return _PDU.pack(0x04, 0, 6 + len(fragment), 2 + len(fragment), context_id, control) + fragment


def file_meta_uids(head: bytes) -> tuple[dict[int, str], int] | None:
    """The text values of the File Meta Information at the start of ``head`` (a file's first bytes) by
    element number, and the offset of the data set after it; None when ``head`` does not start with a
    preamble, ``DICM`` and a group 2 that ends within it (pynetdicom then reads the file itself)."""
    if head[128:132] != b"DICM":
        return None
    offset, values = 132, {}
    while offset + _META_ELEMENT.size <= len(head):
        group, element, vr, length = _META_ELEMENT.unpack_from(head, offset)
        if group != 2:
            return values, offset
        start = offset + 8
        if vr in _LONG_VRS:
            if start + 4 > len(head):
                return None
            (length,) = struct.unpack_from("<L", head, start)
            start += 4
        if vr == b"UI":
            values[element] = head[start:start + length].rstrip(b"\0 ").decode("ascii", "replace")
        offset = start + length
    return None


def _valid_originator(aet: str | None) -> bool:
    """Whether pynetdicom would send ``aet`` as it is (printable ASCII, 1 to 16 characters, no leading
    or trailing space, no backslash): anything else goes through pynetdicom's own validation."""
    return aet is None or (0 < len(aet) <= 16 and aet.isascii() and aet.isprintable() and aet == aet.strip()
                           and "\\" not in aet)


def send_stored_file(assoc: Association, path: Path, msg_id: int = 1, priority: int = 2,
                     originator_aet: str | None = None, originator_id: int | None = None) -> Dataset | None:
    """C-STORE the data set of the stored file at ``path`` as it is, the request written by this thread
    on ``assoc``'s socket (see the module docstring): the response status as pynetdicom's
    ``send_c_store`` gives it (an empty dataset when none came), or None when this way does not apply and
    pynetdicom's ``send_c_store`` should send it instead: pynetdicom's chunked sending off, a socket
    without :class:`~pacs_node.dicom.transport.SendLockedSocket`'s lock or with TLS (OpenSSL's state is
    the DUL thread's), the association not in Sta6 or not established, a handler bound to a sent-message
    event, a file meta pydicom would have to read (or reject), UIDs or values pynetdicom would validate
    differently, or a command set longer than a fragment. A file it cannot open raises ``OSError``, and
    a presentation context missing for its class and syntax pynetdicom's ``ValueError``, as pynetdicom's
    own sending does."""
    sock = assoc.dul.socket
    lock = getattr(sock, "send_lock", None)
    if (not _config.STORE_SEND_CHUNKED_DATASET or lock is None or sock is None
            or isinstance(sock.socket, ssl.SSLSocket) or not assoc.is_established
            or assoc.dul.state_machine.current_state != "Sta6" or any(assoc.get_handlers(e) for e in _SENT_EVENTS)
            or not _valid_originator(originator_aet) or not 0 <= msg_id <= 0xFFFF or priority not in (0, 1, 2)
            or not (originator_id is None or 0 <= originator_id <= 0xFFFF)):
        return None
    with open(path, "rb") as f:
        head = f.read(_HEAD)
        meta = file_meta_uids(head)
        if meta is None or not {0x0002, 0x0003, 0x0010} <= meta[0].keys():
            return None
        uids, offset = meta
        if not (_PLAIN_UID.fullmatch(uids[0x0002]) and _PLAIN_UID.fullmatch(uids[0x0003])):
            return None  # pynetdicom validates (and may refuse) it
        context = assoc._get_valid_context(uids[0x0002], uids[0x0010], "scu", allow_conversion=False)
        context_id = int(context.context_id)
        command = store_request_command_set(uids[0x0002], uids[0x0003], msg_id, priority, originator_aet,
                                            originator_id)
        limit = assoc.dimse.maximum_pdu_size
        step = limit - 6 if limit else None
        if step is not None and len(command) > step:
            return None
        # pynetdicom's own pause: the reactor does not take the response meanwhile
        assoc._reactor_checkpoint.clear()
        while not assoc._is_paused:
            time.sleep(0.0001)
        cut_short: BaseException | None = None
        response = None
        try:
            with lock:
                write_store_request(sock, f, head, offset, context_id, command, step,
                                    assoc.dimse_timeout if assoc.dimse_timeout is not None else assoc.network_timeout)
        except BaseException as exc:  # noqa: BLE001 (re-raised below, once the association has ended)
            cut_short = exc
        else:
            _, response = assoc.dimse.get_msg(block=True)
        finally:
            assoc._reactor_checkpoint.set()
    if cut_short is not None:
        end_cut_short(assoc, sock)
        if isinstance(cut_short, ConnectionError):
            return Dataset()  # no response, as pynetdicom's sending gives it when the connection is gone
        raise cut_short
    if response is None:
        assoc._handle_no_response()
        return Dataset()
    return assoc._check_received_status(response)


def end_cut_short(assoc: Association, sock: Any) -> None:
    """End ``assoc`` after a C-STORE request it could not write whole (its file unreadable midway, the
    peer gone or not reading): the peer is inside a message, and no other may follow on this association
    (PS3.8 9.3.1). Its connection is shut first, so that the A-ABORT the DUL then tries cannot block on a
    peer that reads nothing."""
    raw = sock.socket
    if raw is not None:
        try:
            raw.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already gone
    assoc.abort()


def write_store_request(sock: Any, f: BinaryIO, head: bytes, offset: int, context_id: int, command: bytes,
                        step: int | None, timeout: float | None = None) -> None:
    """Write the command set's PDU, then the data set's (from ``offset`` of the file ``f``, whose first
    bytes are ``head``) in fragments of ``step`` bytes (None: one fragment) as pynetdicom fragments them:
    a file read whole at first goes in one write, a larger one a fragment at a time, as it is read.
    ``sock.write`` (:meth:`~pacs_node.dicom.transport.SendLockedSocket.write`) raises ``ConnectionError``
    when the connection fails or the peer takes nothing for ``timeout`` seconds; a file that cannot be
    read raises ``OSError``: either way the request is cut short and the caller ends the association."""
    command_pdu = _pdu(context_id, 0x03, command)
    if len(head) < _HEAD:
        data = memoryview(head)[offset:]
        size = len(data) if step is None else step
        count = max(1, -(-len(data) // size)) if size else 1
        sock.write(b"".join([command_pdu, *(_pdu(context_id, 0x02 if n == count - 1 else 0x00,
                                                 data[n * size:(n + 1) * size]) for n in range(count))]), timeout)
        return
    sock.write(command_pdu, timeout)
    remaining = os.fstat(f.fileno()).st_size - offset
    f.seek(offset)
    while True:
        fragment = f.read(remaining if step is None else min(step, remaining))
        remaining -= len(fragment)
        last = remaining <= 0 or not fragment
        sock.write(_pdu(context_id, 0x02 if last else 0x00, fragment), timeout)
        if last:
            return


_NARRATION = ((evt.EVT_DIMSE_RECV, standard_dimse_recv_handler), (evt.EVT_DIMSE_SENT, standard_dimse_sent_handler),
              (evt.EVT_PDU_RECV, standard_pdu_recv_handler), (evt.EVT_PDU_SENT, standard_pdu_sent_handler))


def skip_unlogged_narration(assoc: Association) -> None:
    """Unbind pynetdicom's standard message and PDU handlers from ``assoc`` when their INFO and DEBUG
    lines would be dropped anyway (the node holds pynetdicom at WARNING unless ``logging.level`` is
    DEBUG, :mod:`pacs_node.ops.logs`): each formats its lines for every message and PDU first, a tenth
    of the CPU of a C-MOVE sub-operation. With DEBUG logging everything stays as pynetdicom has it."""
    if logging.getLogger(standard_dimse_sent_handler.__module__).isEnabledFor(logging.INFO):
        return
    for event, handler in _NARRATION:
        assoc.unbind(event, handler)
