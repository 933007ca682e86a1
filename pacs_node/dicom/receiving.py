"""The data set fragments of a C-STORE, written to its spool file straight from the socket.

pynetdicom handles every P-DATA-TF PDU the same way: read it into a ``bytearray``, copy it to ``bytes``,
slice it into PDU, PDV item and fragment (a copy each), raise an FSM event, build a P-DATA primitive and
hand it to the DIMSE provider, which finally writes the fragment to the spool file. For a radiograph
that is 15-30 MB copied five times while holding the GIL, and a hundred or more PDUs each paying a few
hundred microseconds of Python (DCMTK sends 128 KiB PDUs, many modalities 16 KiB). With several
associations receiving at once their DUL threads queue for the GIL behind each other's copies and the
listener receives more slowly with four senders than with one.

:class:`SpoolingDUL` reads a P-DATA-TF PDU itself when it can see, from its first 12 bytes (``MSG_PEEK``,
nothing consumed), that it is one PDV holding a *middle* fragment of the data set of the C-STORE whose
spool file is open: type 0x04, a single PDV item filling the PDU, its message control header saying
"data set, not the last fragment". Such a PDU changes nothing in pynetdicom's state but the file (state
Sta6 stays Sta6, DT-2 only passes the fragment on to ``DIMSEMessage.decode_msg``, which writes it and
flushes), so its body is received with ``recv_into`` into one reused buffer and written from there:
no copy under the GIL, a few system calls per PDU. Everything else (the command set, the last fragment,
any other PDU, a PDU whose header has not fully arrived, TLS, an association with handlers bound to
``EVT_DATA_RECV`` or ``EVT_PDU_RECV``, which would see the PDU) takes pynetdicom's path as before.
Every byte still goes through the socket's PDU size limit and deadline
(:class:`pacs_node.dicom.transport.ServerAssociationSocket`), and writes still go through the
:class:`pacs_node.dicom.spooling.SpoolFile` (write errors recorded, writeback hints). Worth proposing
upstream as a chunked receive of P-DATA.
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct

from pynetdicom import evt
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dul import DULServiceProvider

from pacs_node.dicom.spooling import SpoolFile

log = logging.getLogger(__name__)

#: PDU type (1), reserved (1), PDU length (4), PDV item length (4), presentation context ID (1),
#: message control header (1).
_PDATA_HEAD = struct.Struct(">BBLLBB")
_P_DATA_TF = 0x04
#: Message control header bits (PS3.8 E.2): 1 = command (else data set), 2 = last fragment.
_COMMAND, _LAST = 0x01, 0x02
#: Largest piece of a fragment received before it is written (the reused buffer's size).
CHUNK = 1024 * 1024
#: Most fragment bytes taken in one call before the DUL's loop runs again (its timers, kill flag, sends).
BYTES_PER_CALL = 8 * 1024 * 1024


class SpoolingDUL(DULServiceProvider):
    """The DUL of an accepted association whose C-STORE data set fragments go straight to the spool
    file (see the module docstring). It adds no state but a receive buffer, made on first use, so
    pynetdicom's provider is re-classed (:class:`pacs_node.dicom.transport.GuardedRequestHandler`)."""

    def _read_pdu_data(self) -> None:
        taken = 0
        while taken < BYTES_PER_CALL:
            size = self._middle_fragment_size()
            if size is None:
                break
            if not self._spool_fragment(size):
                return
            taken += size
            if not self.socket or not self.socket.ready:
                return
        if not taken:
            super()._read_pdu_data()

    def _middle_fragment_size(self) -> int | None:
        """The fragment's byte count if the next PDU is a middle data set fragment of the C-STORE being
        spooled (looked at, not consumed); ``None`` when pynetdicom should read it."""
        message = self.assoc.dimse.message
        if (not isinstance(message, C_STORE_RQ) or not isinstance(message._data_set_file, SpoolFile)
                or self.state_machine.current_state != "Sta6"
                or self.assoc.get_handlers(evt.EVT_DATA_RECV) or self.assoc.get_handlers(evt.EVT_PDU_RECV)):
            return None
        raw = getattr(self.socket, "socket", None)
        if (raw is None or isinstance(raw, ssl.SSLSocket) or getattr(raw, "pushback", b"")
                or raw.family not in (socket.AF_INET, socket.AF_INET6)):
            return None
        try:
            head = socket.socket.recv(raw, _PDATA_HEAD.size, socket.MSG_PEEK)
        except OSError:
            return None  # pynetdicom's read meets the same error and reports it
        if len(head) < _PDATA_HEAD.size:
            return None
        pdu_type, _, pdu_length, item_length, _, control = _PDATA_HEAD.unpack(head)
        if pdu_type != _P_DATA_TF or item_length != pdu_length - 4 or item_length < 2 or control & (_COMMAND | _LAST):
            return None
        return item_length - 2

    def _spool_fragment(self, size: int) -> bool:
        """Receive the PDU whose header was peeked and write its ``size`` bytes of fragment to the spool
        file; ``False`` (and Evt17 queued, as pynetdicom does) when the connection failed meanwhile."""
        sock = self.socket
        assert sock is not None
        spool_file = self.assoc.dimse.message._data_set_file
        buffer = self.__dict__.get("_fragment_buffer")
        if buffer is None:
            buffer = self.__dict__["_fragment_buffer"] = memoryview(bytearray(_PDATA_HEAD.size + CHUNK))
        try:
            # the header (already looked at) and the first piece of the fragment in one read
            skip, left = _PDATA_HEAD.size, size
            while skip or left:
                view = buffer[:skip + min(left, CHUNK)]
                if sock.recv_into(view) != len(view):
                    raise ConnectionError("the connection closed inside a PDU")
                spool_file.write(view[skip:])
                left -= len(view) - skip
                skip = 0
            spool_file.file.flush()
        except (OSError, TimeoutError) as exc:
            log.error("connection closed before the entire PDU was received: %s", exc)
            self.event_queue.put("Evt17")
            return False
        return True
