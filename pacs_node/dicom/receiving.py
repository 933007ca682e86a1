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

The same DUL serves the association's C-STOREs and C-ECHOs in its own thread
(:class:`InlineServingDIMSE`, :func:`serve_inline`) instead of handing each to pynetdicom's reactor
thread and waiting for the response to come back.
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct
import threading
from collections.abc import Callable
from typing import Any

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dul import DULServiceProvider

from pacs_node.dicom.adjustments import ACCEPTED_POLL_S, park_reactors, wake_from_other_threads
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
    file (see the module docstring), and which serves in its own thread the C-STOREs and C-ECHOs its
    :class:`InlineServingDIMSE` sets aside (see there). It adds no state but a receive buffer, made on
    first use, and a flag, so pynetdicom's provider is re-classed
    (:class:`pacs_node.dicom.transport.GuardedRequestHandler`). It rings the wake-ups that let its two
    threads poll at :data:`pacs_node.dicom.adjustments.ACCEPTED_POLL_S` (:func:`serve_inline`): its
    own when it is told to stop, the reactor's when it has stopped."""

    #: While a request set aside is being served here: the reactor's network-timeout check does not
    #: count it as the peer's silence (when the reactor served requests it never looked meanwhile), and
    #: a response it queues needs no wake-up (this thread looks at its queue next).
    serving_inline: bool = False

    def _process_recv_primitive(self) -> bool:
        # The top of the DUL's loop: the PDU that completed the request has been through the state
        # machine (back in Sta6), and whatever the handler queues is sent by the call below, at once.
        dimse = self.assoc.dimse
        if isinstance(dimse, InlineServingDIMSE):
            request = dimse.take_set_aside()
            if request is not None:
                context_id, message = request
                self.serving_inline = True
                try:
                    self.assoc._serve_request(message, context_id)
                finally:
                    self.serving_inline = False
                    self._idle_timer.restart()
        return bool(super()._process_recv_primitive())

    def idle_timer_expired(self) -> bool:
        return not self.serving_inline and bool(super().idle_timer_expired())

    def run_reactor(self) -> None:
        try:
            super().run_reactor()
        finally:
            _ring(getattr(self.assoc, "pacs_wake", None))  # its reactor checks is_alive() at once

    def kill_dul(self) -> None:
        super().kill_dul()
        _ring(getattr(self, "pacs_wake", None))  # the loop sees its kill flag at once

    def stop_dul(self) -> bool:
        if threading.current_thread() is self:
            # A blocking abort() from a request served here (pynetdicom's own, for a message on a context
            # it did not accept) waits for this thread to stop: it stops as soon as it is back in its
            # loop, after sending what the abort queued.
            self._kill_thread = True
            return True
        if self.state_machine.current_state == "Sta1":
            _ring(getattr(self, "pacs_wake", None))  # pynetdicom's stop_dul sets the kill flag, then waits
        return bool(super().stop_dul())

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


class InlineServingDIMSE(DIMSEServiceProvider):
    """The DIMSE provider of an accepted association whose C-STORE and C-ECHO requests are served by
    the DUL thread that received them, not handed to the association's reactor thread.

    pynetdicom's DUL thread decodes a request and queues it; the reactor thread wakes, runs the
    handler and queues the response; the DUL thread wakes again and sends it. On a tiny C-STORE those
    two hand-offs (a wake-up, a context switch and a GIL transfer each; on a loaded machine a scheduler
    tick each) cost as much as pynetdicom's own work on the message. Here a C-STORE or C-ECHO request is
    set aside instead of waking the reactor, when it is alone in the queue and the reactor is not
    serving a message it took (so no request is overtaken, and none runs beside another), and
    :class:`SpoolingDUL` serves it at the top of its next loop: after the state machine has finished
    with the PDU, before it sends what is queued, so the response goes out from the same thread at
    once. Nothing the handler does waits for the DUL: a C-STORE or C-ECHO handler only answers (the
    node's writes its file and row). Every other message (C-FIND, C-MOVE, C-GET, N-ACTION, a response
    to a C-GET's sub-operation that the reactor's handler waits for) goes to the reactor as before.
    Made by :func:`serve_inline`. Worth proposing upstream: serving quick requests in the receiving
    thread."""

    _inline_lock: threading.Lock
    _wake_reactor: Callable[[], None]
    _reactor_serving: bool = False  # the reactor took a message and has not asked for the next one
    _receiving: bool = False  # inside receive_primitive: the wake-up of a queued message waits
    _queued: bool = False  # a message was queued while _receiving
    _set_aside: tuple[int, Any] | None = None

    def get_msg(self, block: bool = False) -> Any:
        if block:  # a handler waiting for a response (a C-GET's sub-operations), not the reactor's poll
            return super().get_msg(block)
        with self._inline_lock:
            self._reactor_serving = False  # the reactor asks again: what it took last is served
            item = super().get_msg(False)
            self._reactor_serving = item[1] is not None
        return item

    def receive_primitive(self, primitive: Any) -> None:
        self._receiving, self._queued = True, False
        try:
            super().receive_primitive(primitive)
        finally:
            self._receiving = False
        if not self._queued:
            return
        with self._inline_lock:
            queued = self.msg_queue.queue
            if (not self._reactor_serving and self._set_aside is None and len(queued) == 1
                    and isinstance(queued[0][1], (C_STORE, C_ECHO))
                    and queued[0][1].MessageIDBeingRespondedTo is None):
                self._set_aside = self.msg_queue.get_nowait()
                return
        self._wake_reactor()

    def message_queued(self) -> None:
        """The message queue's wake-up: the reactor's, decided once the message is whole when it was
        queued by :meth:`receive_primitive`."""
        if self._receiving:
            self._queued = True
        else:
            self._wake_reactor()

    def take_set_aside(self) -> tuple[int, Any] | None:
        """The request set aside for the DUL thread to serve, if any (taken)."""
        with self._inline_lock:
            request, self._set_aside = self._set_aside, None
        return request


class _RingingCheckpoint(threading.Event):
    """An association's ``_reactor_checkpoint`` whose ``clear`` also wakes the reactor: pynetdicom's
    ``send_*`` (and ``release``), called from another thread, clear it and then wait for the reactor to
    report itself paused, which it does only when its polling sleep ends."""

    ring: Callable[[], None]

    def clear(self) -> None:
        super().clear()
        self.ring()


def _ring(wake: Any) -> None:
    if wake is not None:
        wake.set()


def serve_inline(assoc: Association) -> None:
    """Let ``assoc`` (accepted, its DUL a :class:`SpoolingDUL`, given wake-ups by
    :func:`pacs_node.dicom.adjustments.wake_reactors_early`) serve its C-STOREs and C-ECHOs in its DUL thread
    (:class:`InlineServingDIMSE`), and let both its threads poll every
    :data:`~pacs_node.dicom.adjustments.ACCEPTED_POLL_S` instead of every millisecond: every change either loop
    waits for rings its wake-up (a message or a peer's release or abort queued, data arriving, something queued
    for sending, the DUL told to stop or stopped, an event queued by another thread than the DUL's, another
    thread pausing the reactor to send), so the poll is left to pynetdicom's timers (ARTIM, the network
    timeout), which fire at most that much later. Call it before the association starts."""
    dimse, dul = assoc.dimse, assoc.dul
    assert type(dimse) is DIMSEServiceProvider and isinstance(dul, SpoolingDUL)
    dimse.__class__ = InlineServingDIMSE
    assert isinstance(dimse, InlineServingDIMSE)
    dimse._inline_lock = threading.Lock()
    dimse._wake_reactor = assoc.pacs_wake.set  # type: ignore[attr-defined]
    dimse.msg_queue.wake = dimse.message_queued  # type: ignore[attr-defined]
    wake_from_other_threads(dul.event_queue, dul, dul.pacs_wake.set)  # type: ignore[attr-defined]
    checkpoint = assoc._reactor_checkpoint
    assert type(checkpoint) is threading.Event
    checkpoint.__class__ = _RingingCheckpoint
    assert isinstance(checkpoint, _RingingCheckpoint)
    checkpoint.ring = assoc.pacs_wake.set  # type: ignore[attr-defined]
    park_reactors(assoc, ACCEPTED_POLL_S)
