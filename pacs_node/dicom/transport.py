"""The listener's accept loop, hardened against callers that are slow, hostile or broken.

pynetdicom's stock server has three weak spots for a node that faces a hospital network:

* With TLS it performs the handshake *inside the accept loop*, so one client that connects and stays
  silent stops every other association from being accepted. Here the socket is wrapped with the
  handshake deferred: OpenSSL performs it on the first read, in that association's own thread.
* It reads a PDU by trusting the 32-bit length in its header: a peer announcing a 4 GiB P-DATA-TF makes
  the reader buffer whatever arrives. Here every accepted socket counts PDU framing as bytes go past and
  drops the connection as soon as a header announces more than the limit (our advertised maximum PDU plus
  slack), before the body is read. pynetdicom sees an ordinary transport error (Evt17).
* An accepted socket has no timeout, so a peer that stops half-way through a PDU holds its thread for
  ever; and a timeout per ``recv`` is no bound at all against a peer that sends one byte just before each
  timeout. Here each PDU has a deadline from its first byte to its last (``pdu_deadline_s``), whatever
  the reads; an association idling *between* PDUs is not affected (pynetdicom reads only when ``select``
  says data is waiting).
* Every accepted connection becomes an association thread that counts against ``max_associations``
  before it has said a word: 17 sockets trickling an A-ASSOCIATE-RQ a byte at a time lock every sender
  out. Here a connection is first held by the :class:`Doorman`, one thread multiplexing every connection
  that has not yet sent a whole A-ASSOCIATE-RQ (TLS handshake included) within ``request_deadline_s``,
  with no thread and no association slot of its own; at most ``max_pending`` are held, the oldest
  closed for a newcomer (a real peer sends its request within milliseconds of connecting, so the oldest
  is the one that is stalling). Only a complete request is handed to pynetdicom, with the bytes already
  read given back to its reader.
"""

from __future__ import annotations

import copy
import heapq
import logging
import selectors
import socket
import socketserver
import ssl
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dul import DULServiceProvider
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import AddressInformation, AssociationSocket, RequestHandler, ThreadedAssociationServer

from pacs_node.dicom.adjustments import wake_reactors_early
from pacs_node.dicom.receiving import SpoolingDUL, serve_inline
from pacs_node.dicom.spooling import ReceiveSpool

log = logging.getLogger(__name__)

_HEADER = struct.Struct(">BBL")  # PDU type, reserved, length of what follows
#: Room above the negotiated maximum for the PDU's own items (PDV headers, A-ASSOCIATE user items).
PDU_SLACK = 64 * 1024
#: The cap when ``node.max_pdu`` is 0 ("unlimited" in DICOM terms) — nothing legitimate comes near it.
UNLIMITED_PDU_CAP = 64 * 1024 * 1024


#: Largest single read of a PDU body (see :class:`ServerAssociationSocket`).
RECV_CHUNK = 1024 * 1024


class ServerAssociationSocket(AssociationSocket):
    """The :class:`AssociationSocket` of an association this node's server accepted.

    Its ``recv`` takes whatever the kernel has, up to ``nr_bytes``, per call. pynetdicom's own reads 4 KiB
    per system call: for a 30 MB radiograph that is thousands of calls, each releasing and retaking the
    GIL, which is what makes concurrent associations collapse (and doubles the listener's CPU time per
    image). The contract is unchanged: block until ``nr_bytes`` have arrived, return fewer only when the
    peer closed the connection. It never asks for more than ``nr_bytes``, so nothing is read past the PDU
    pynetdicom is reading, and the PDU size limit below still sees every byte. Outgoing associations
    (export, ``pacs-node send``, C-MOVE sub-associations) keep pynetdicom's own socket."""

    def recv(self, nr_bytes: int) -> bytearray:
        sock = self.socket
        assert sock is not None
        data = bytearray()
        while len(data) < nr_bytes:
            chunk = sock.recv(min(nr_bytes - len(data), RECV_CHUNK))
            if not chunk:
                break
            data += chunk
        return data

    def recv_into(self, buffer: memoryview) -> int:
        """Fill ``buffer`` from the socket, the kernel copying straight into it (the GIL released);
        blocks until it is full, returns fewer bytes only when the peer closed the connection
        (:mod:`pacs_node.dicom.receiving` receives data set fragments so)."""
        sock = self.socket
        assert sock is not None
        got = 0
        while got < len(buffer):
            count = sock.recv_into(buffer[got:got + RECV_CHUNK])
            if not count:
                break
            got += count
        return got

    @property
    def ready(self) -> bool:
        """pynetdicom's ``ready`` (data waiting in the kernel), or bytes the doorman read and gave back."""
        if self.socket is not None and getattr(self.socket, "pushback", b""):
            return True
        return bool(super().ready)


class GuardedRequestHandler(RequestHandler):
    """pynetdicom's request handler, with the accepted association reading through a
    :class:`ServerAssociationSocket`, spooling C-STORE data sets through a
    :class:`pacs_node.dicom.receiving.SpoolingDUL` and serving its C-STOREs and C-ECHOs in that DUL's
    thread (:func:`pacs_node.dicom.receiving.serve_inline`); the socket, DUL and DIMSE provider
    pynetdicom built are re-classed."""

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        sock = assoc.dul.socket
        assert sock is not None and type(sock) is AssociationSocket
        sock.__class__ = ServerAssociationSocket
        assert type(assoc.dul) is DULServiceProvider
        assoc.dul.__class__ = SpoolingDUL
        wake_reactors_early(assoc)
        serve_inline(assoc)
        self.association = assoc
        return assoc

    def handle(self) -> None:
        """Start the association, then wait in this (otherwise finished) thread for it to end: only then
        is it certain that no message of it is still arriving, and its unfinished spool files go."""
        super().handle()
        self.association.join()
        spool = getattr(self.server, "spool", None)
        if isinstance(spool, ReceiveSpool):
            try:
                spool.discard_unclaimed(self.association)
            except Exception:  # noqa: BLE001 (a clean-up must not kill the server's thread pool)
                log.exception("removing the unfinished datasets of an association failed")


def set_tcp_nodelay(sock: socket.socket) -> None:
    """Send each write at once instead of holding small segments back for Nagle's algorithm.

    pynetdicom writes a DIMSE message as separate PDUs (command, then data set) and then waits for the
    answer; with Nagle on, the second small write waits for the peer's delayed ACK (~40 ms on Linux), so
    tiny messages crawl at tens per second. Every PDU is a whole ``send``, so nothing is gained by
    coalescing. Not a TCP socket (a test's socketpair): nothing to do."""
    if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class ResponseKeepingDIMSE(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider, except that the association's reactor gets no message while a
    ``send_c_*`` call holds it paused (``_reactor_checkpoint`` cleared).

    A ``send_c_*`` call pauses the reactor (clears the checkpoint, then waits for ``_is_paused``) and takes
    the response itself. The reactor sets ``_is_paused`` just before it passes the checkpoint, so the
    caller can read a stale True, send, and lose its response to the reactor's non-blocking ``get_msg``
    ("Received unexpected C-STORE service message", then a DIMSE timeout and an abort). With Nagle's
    delay the response came ~40 ms later and the window never mattered; with TCP_NODELAY a fast peer
    answers inside it (3 of 12 exports of 200 tiny instances failed so). Only the reactor asks without
    blocking. It adds no state, so pynetdicom's provider is re-classed."""

    def get_msg(self, block: bool = False) -> Any:
        if not block and not self.assoc._reactor_checkpoint.is_set():
            return None, None
        return super().get_msg(block)


def wake_reactor_only_when_it_may_take(assoc: Association) -> None:
    """Set ``assoc``'s reactor wake-up (:func:`pacs_node.dicom.adjustments.wake_reactors_early`) for a
    message received only while its checkpoint is set: while a ``send_c_*`` call holds it cleared the
    message is the caller's (:class:`ResponseKeepingDIMSE`), and waking the reactor for it only made it
    look and sleep again, a thread wake-up per response. A message that arrives then and is not taken
    the reactor finds at its next poll."""
    messages = assoc.dimse.msg_queue
    wake, checkpoint = messages.wake, assoc._reactor_checkpoint  # type: ignore[attr-defined]

    def wake_if_it_may_take() -> None:
        if checkpoint.is_set():
            wake()

    messages.wake = wake_if_it_may_take  # type: ignore[attr-defined]


class ResponseKeepingAssociation(Association):
    """A requested association whose ``send_c_*`` calls do not wait for the reactor to park.

    Each ``send_c_*`` clears the reactor's checkpoint and then polls until the reactor reports itself
    parked, which it does only after its next 1 ms sleep: up to a millisecond per message, a quarter of
    an export's or a C-MOVE sub-operation's time on tiny instances. The pause exists so that the reactor
    cannot take the response, and :class:`ResponseKeepingDIMSE` already guarantees that while the
    checkpoint is cleared, so a cleared checkpoint counts as paused. (The reactor's other checks while
    it finishes its iteration only look at queues: a peer's release or abort, the DUL's life.)"""

    @property  # type: ignore[override]
    def _is_paused(self) -> bool:
        return bool(self.__dict__.get("_reactor_parked")) or not self._reactor_checkpoint.is_set()

    @_is_paused.setter
    def _is_paused(self, value: bool) -> None:
        self.__dict__["_reactor_parked"] = value


class SendLockedSocket(AssociationSocket):
    """The socket of an association this node requested: each ``send`` (a whole PDU, from the DUL thread)
    holds :attr:`send_lock`, which :func:`pacs_node.dicom.qr.sending.send_stored_file` holds around the
    PDUs of a whole C-STORE request it writes from the sending thread, so no PDU of the DUL's (an
    A-ABORT on a timeout) lands inside one of them. It adds no state of its own but the lock."""

    send_lock: threading.RLock

    def send(self, bytestream: bytes) -> None:
        with self.send_lock:
            super().send(bytestream)

    def write(self, data: bytes, timeout: float | None) -> None:
        """Write ``data`` whole from a sending thread that holds :attr:`send_lock`, or raise
        ``ConnectionError``: the connection failed, or the peer took nothing for ``timeout`` seconds (one
        that stopped reading would hold the thread for ever, and with it its jobs' leases). Unlike
        :meth:`send` it tells the DUL nothing: the caller ends the association, whose message it cut
        short. ``EVT_DATA_SENT`` is triggered as ``send`` triggers it."""
        raw = self.socket
        if raw is None:
            raise ConnectionError("the association's connection is closed")
        previous = raw.gettimeout()
        raw.settimeout(timeout)
        try:
            raw.sendall(data)
        except OSError as exc:
            raise ConnectionError(f"sending to the peer failed ({type(exc).__name__})") from exc
        finally:
            raw.settimeout(previous)
        evt.trigger(self.assoc, evt.EVT_DATA_SENT, {"data": data})


class NoDelayAE(AE):
    """An AE whose requested associations (export, ``pacs-node send`` and ``echo``, the listener's C-MOVE
    sub-associations) send without Nagle's delay, keep their responses (:class:`ResponseKeepingDIMSE`),
    do not wait for their reactor between messages (:class:`ResponseKeepingAssociation`) nor wake it
    for the responses their caller takes (:func:`wake_reactor_only_when_it_may_take`), can have a
    stored file's C-STORE written by the sending thread itself (:class:`SendLockedSocket`) and, while a
    server runs in the process, have reactors that wake when there is work
    (:func:`pacs_node.dicom.adjustments.wake_reactors_early`).

    pynetdicom 3 has no socket-options hook; ``_create_socket`` is where its AE makes the socket of an
    association it requests (worth proposing upstream as an option). Accepted sockets get TCP_NODELAY in
    :meth:`GuardedAssociationServer.get_request`."""

    def _create_socket(self, assoc: Association, address: AddressInformation,
                       tls_args: tuple[ssl.SSLContext, str] | None) -> AssociationSocket:
        sock = super()._create_socket(assoc, address, tls_args)
        assert sock.socket is not None
        set_tcp_nodelay(sock.socket)
        assert type(sock) is AssociationSocket
        sock.__class__ = SendLockedSocket
        sock.send_lock = threading.RLock()  # type: ignore[attr-defined]
        assert type(assoc.dimse) is DIMSEServiceProvider and type(assoc) is Association
        assoc.dimse.__class__ = ResponseKeepingDIMSE
        parked = assoc.__dict__.pop("_is_paused")
        assoc.__class__ = ResponseKeepingAssociation
        assoc._is_paused = parked
        wake_reactors_early(assoc)
        wake_reactor_only_when_it_may_take(assoc)
        return sock


class PduTooLarge(ConnectionError):
    """A PDU header announced more bytes than this listener will buffer."""


class PduDeadline(TimeoutError):
    """A PDU did not arrive whole within its deadline."""


class _PduLimit:
    """Mixin for a socket class: ``recv`` raises :class:`PduTooLarge` on an oversized PDU header and
    :class:`PduDeadline` when a PDU takes longer than ``pdu_deadline_s`` from its first byte to its last;
    it serves ``pushback`` (bytes the doorman read) before the kernel's. ``recv_into`` does the same.

    Framing is followed byte by byte, so it holds however the reader splits its reads."""

    pdu_limit: int = UNLIMITED_PDU_CAP
    pdu_deadline_s: float = 60.0
    idle_timeout_s: float | None = 60.0
    pushback: bytes = b""
    _header: bytes = b""
    _remaining: int = 0
    _deadline: float | None = None
    _shortened: bool = False  # the socket's timeout is the deadline's remainder, not idle_timeout_s

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        if self.pushback:
            data, self.pushback = self.pushback[:bufsize], self.pushback[bufsize:]
        else:
            self._arm_deadline()
            data = super().recv(bufsize, flags)  # type: ignore[misc]
        self._follow(data)
        self._disarm_deadline()
        return data

    def recv_into(self, buffer: memoryview, nbytes: int = 0, flags: int = 0) -> int:
        """``recv`` into ``buffer``: the same limit, deadline and pushback, without a copy."""
        if self.pushback:
            data = self.recv(nbytes or len(buffer), flags)
            buffer[:len(data)] = data
            return len(data)
        self._arm_deadline()
        count = super().recv_into(buffer, nbytes or len(buffer), flags)  # type: ignore[misc]
        self._follow(buffer[:count])
        self._disarm_deadline()
        return int(count)

    def _arm_deadline(self) -> None:
        """Within a PDU, the socket's timeout is what is left of its deadline (or the idle timeout)."""
        if self._deadline is not None:
            left = self._deadline - time.monotonic()
            if left <= 0:
                raise PduDeadline(f"a PDU took longer than {self.pdu_deadline_s:g} s to arrive")
            idle = self.idle_timeout_s
            self.settimeout(left if idle is None else min(left, idle))  # type: ignore[attr-defined]
            self._shortened = True

    def _disarm_deadline(self) -> None:
        """Between PDUs, the idle timeout again."""
        if self._deadline is None and self._shortened:
            self.settimeout(self.idle_timeout_s)  # type: ignore[attr-defined]
            self._shortened = False

    def _follow(self, data: bytes | memoryview) -> None:
        """Track PDU framing over ``data``; start a PDU's deadline at its first byte, end it at its last."""
        view = memoryview(data)
        while view:
            if self._remaining:
                step = min(self._remaining, len(view))
                self._remaining -= step
                view = view[step:]
                if not self._remaining:
                    self._deadline = None
                continue
            if not self._header:
                self._deadline = time.monotonic() + self.pdu_deadline_s
            need = _HEADER.size - len(self._header)
            self._header += bytes(view[:need])
            view = view[need:]
            if len(self._header) == _HEADER.size:
                _, _, length = _HEADER.unpack(self._header)
                self._header = b""
                if length > self.pdu_limit:
                    log.warning("dropping connection from %s: a PDU header announces %d bytes, more than "
                                "the limit of %d", _peer(self), length, self.pdu_limit)
                    raise PduTooLarge(f"PDU of {length} bytes announced; the limit is {self.pdu_limit}")
                self._remaining = length
                if not length:
                    self._deadline = None


def _peer(sock: object) -> str:
    try:
        return str(sock.getpeername()[0])  # type: ignore[attr-defined]
    except (OSError, AttributeError, IndexError):
        return "?"


class _LimitedSocket(_PduLimit, socket.socket):
    pass


class _LimitedSSLSocket(_PduLimit, ssl.SSLSocket):
    pass


#: PDU type of an A-ASSOCIATE-RQ, the only PDU a new connection may send.
_ASSOCIATE_RQ = 0x01
#: A-ABORT, source: service provider (2), reason: unexpected PDU (2).
_ABORT_UNEXPECTED_PDU = bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 2, 2])


@dataclass(order=True)
class _Pending:
    """A connection the doorman holds until its A-ASSOCIATE-RQ is complete."""

    deadline: float
    arrived: float
    sock: socket.socket = field(compare=False)
    address: Any = field(compare=False)
    data: bytearray = field(default_factory=bytearray, compare=False)
    handshaken: bool = field(default=False, compare=False)
    closed: bool = field(default=False, compare=False)


class Doorman:
    """One thread that holds every connection that has not yet sent a whole A-ASSOCIATE-RQ, reading
    them without blocking, and hands each complete request to ``admit`` (see the module docstring).

    ``dropped(reason)`` is told of every connection closed here: ``request_deadline``, ``pending_full``,
    ``not_associate_rq``, ``too_large``, ``tls`` or ``closed`` (the peer hung up)."""

    def __init__(self, admit: Callable[[socket.socket, Any], None], *, max_pending: int, deadline_s: float,
                 pdu_limit: int, dropped: Callable[[str], None] | None = None) -> None:
        self._admit = admit
        self.max_pending = max_pending
        self.deadline_s = deadline_s
        self.pdu_limit = pdu_limit
        self._dropped = dropped or (lambda reason: None)
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._arrivals: list[tuple[socket.socket, Any]] = []
        self._lock = threading.Lock()
        self._pending: dict[int, _Pending] = {}
        self._by_deadline: list[_Pending] = []
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="doorman", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        self._wake()
        self._thread.join(5)
        for entry in list(self._pending.values()):
            self._close(entry, None)
        with self._lock:
            for sock, _ in self._arrivals:
                sock.close()
            self._arrivals.clear()
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    @property
    def pending(self) -> int:
        """Connections held now (for tests and the health page)."""
        return len(self._pending)

    def hold(self, sock: socket.socket, address: Any) -> None:
        """Take a just-accepted connection (called by the accept loop; never blocks)."""
        with self._lock:
            self._arrivals.append((sock, address))
        self._wake()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:  # its buffer is full: the doorman is already due to wake
            pass

    # -- the loop -----------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop:
            timeout = 1.0
            if self._by_deadline:
                timeout = max(0.0, min(timeout, self._by_deadline[0].deadline - time.monotonic()))
            for key, _ in self._selector.select(timeout):
                if key.fileobj is self._wake_r:
                    self._take_arrivals()
                else:
                    entry = self._pending.get(key.fd)
                    if entry is not None:
                        self._advance(entry)
            self._expire()

    def _take_arrivals(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass
        with self._lock:
            arrivals, self._arrivals = self._arrivals, []
        for sock, address in arrivals:
            while len(self._pending) >= self.max_pending:
                oldest = min(self._pending.values(), key=lambda e: e.arrived)
                self._close(oldest, "pending_full")
            now = time.monotonic()
            entry = _Pending(now + self.deadline_s, now, sock, address)
            try:
                sock.setblocking(False)
                self._selector.register(sock, selectors.EVENT_READ)
            except (OSError, ValueError):
                sock.close()
                continue
            self._pending[sock.fileno()] = entry
            heapq.heappush(self._by_deadline, entry)
            self._advance(entry)  # a TLS server speaks second, but data may already be waiting

    def _expire(self) -> None:
        now = time.monotonic()
        while self._by_deadline and (self._by_deadline[0].closed or self._by_deadline[0].deadline <= now):
            entry = heapq.heappop(self._by_deadline)
            if not entry.closed:
                self._close(entry, "request_deadline")

    def _close(self, entry: _Pending, reason: str | None) -> None:
        if entry.closed:
            return
        entry.closed = True
        fd = entry.sock.fileno()
        self._pending.pop(fd, None)
        try:
            self._selector.unregister(entry.sock)
        except (KeyError, ValueError, OSError):
            pass
        entry.sock.close()
        if reason is not None:
            log.debug("connection from %s closed before associating: %s", _address(entry.address), reason)
            self._dropped(reason)

    def _advance(self, entry: _Pending) -> None:
        """Read what the connection has; hand it over once its A-ASSOCIATE-RQ is whole."""
        sock = entry.sock
        try:
            if isinstance(sock, ssl.SSLSocket) and not entry.handshaken:
                sock.do_handshake()
                entry.handshaken = True
                self._selector.modify(sock, selectors.EVENT_READ)
            while True:
                chunk = socket.socket.recv(sock, 65536) if not isinstance(sock, ssl.SSLSocket) \
                    else ssl.SSLSocket.recv(sock, 65536)
                if not chunk:
                    self._close(entry, "closed")
                    return
                entry.data += chunk
                if self._complete(entry):
                    return
        except ssl.SSLWantReadError:
            self._selector.modify(sock, selectors.EVENT_READ)
        except ssl.SSLWantWriteError:
            self._selector.modify(sock, selectors.EVENT_WRITE)
        except BlockingIOError:
            pass
        except ssl.SSLError as exc:
            log.warning("connection from %s dropped: TLS: %s", _address(entry.address), exc.reason or exc)
            self._close(entry, "tls")
        except OSError:
            self._close(entry, "closed")

    def _complete(self, entry: _Pending) -> bool:
        """Whether ``entry`` was settled (handed over or refused) by what it has sent so far."""
        data = entry.data
        if data[0] != _ASSOCIATE_RQ:
            try:
                socket.socket.send(entry.sock, _ABORT_UNEXPECTED_PDU)
            except OSError:
                pass
            self._close(entry, "not_associate_rq")
            return True
        if len(data) < _HEADER.size:
            return False
        _, _, length = _HEADER.unpack_from(data)
        if length > self.pdu_limit:
            log.warning("dropping connection from %s: its A-ASSOCIATE-RQ announces %d bytes, more than the "
                        "limit of %d", _address(entry.address), length, self.pdu_limit)
            self._close(entry, "too_large")
            return True
        if len(data) < _HEADER.size + length:
            return False
        entry.closed = True  # settled: no longer the doorman's to expire
        self._pending.pop(entry.sock.fileno(), None)
        self._selector.unregister(entry.sock)
        entry.sock.setblocking(True)
        entry.sock.pushback = bytes(data)  # type: ignore[attr-defined]
        self._admit(entry.sock, entry.address)
        return True


def _address(address: Any) -> str:
    try:
        return str(address[0])
    except (TypeError, IndexError):
        return "?"


class GuardedAssociationServer(ThreadedAssociationServer):
    """A :class:`ThreadedAssociationServer` with deferred TLS handshakes, a PDU size limit, PDU deadlines
    and a :class:`Doorman` for connections still sending their request (see the module docstring).
    Build it with :func:`start_guarded_server`."""

    pdu_limit: int = UNLIMITED_PDU_CAP
    idle_timeout_s: float | None = 60.0
    pdu_deadline_s: float = 60.0
    doorman: Doorman | None = None
    #: The kernel's queue of connections not yet accepted (socketserver's default is 5: a burst of
    #: reconnecting sockets fills it, and a legitimate SYN is dropped and retried a second later).
    request_queue_size = 512
    #: The watching threads never hold up shutdown (an association in progress is not waited for).
    daemon_threads = True
    block_on_close = False

    def process_request(self, request: Any, client_address: Any) -> None:
        """Hand a new connection to the doorman, which starts its association thread (ThreadingMixIn's
        ``process_request``) only once the A-ASSOCIATE-RQ is whole."""
        if self.doorman is None:
            super().process_request(request, client_address)
        else:
            self.doorman.hold(request, client_address)

    def _associate(self, request: socket.socket, client_address: Any) -> None:
        request.settimeout(self.idle_timeout_s)
        socketserver.ThreadingMixIn.process_request(self, request, client_address)

    def server_close(self) -> None:
        if self.doorman is not None:
            self.doorman.stop()
        super().server_close()
    #: Where this server's incoming C-STORE datasets are written (see :mod:`pacs_node.dicom.spooling`).
    spool: ReceiveSpool | None = None
    #: ``SO_REUSEPORT``: other processes bind the same port and the kernel spreads connections over them.
    reuse_port: bool = False

    def get_request(self) -> tuple[socket.socket, Any]:
        assert self.socket is not None
        raw, address = self.socket.accept()
        raw.settimeout(self.idle_timeout_s)
        set_tcp_nodelay(raw)
        if self.ssl_context is not None:
            self.ssl_context.sslsocket_class = _LimitedSSLSocket
            client: socket.socket = self.ssl_context.wrap_socket(
                raw, server_side=True, do_handshake_on_connect=False
            )
        else:
            client = _LimitedSocket(raw.family, raw.type, raw.proto, fileno=raw.detach())
            client.settimeout(self.idle_timeout_s)
        client.pdu_limit = self.pdu_limit  # type: ignore[attr-defined]
        client.pdu_deadline_s = self.pdu_deadline_s  # type: ignore[attr-defined]
        client.idle_timeout_s = self.idle_timeout_s  # type: ignore[attr-defined]
        return client, address

    def server_bind(self) -> None:
        if self.reuse_port:
            assert self.socket is not None
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """One failed connection (a TLS handshake that failed, a PDU over the limit) is logged in one
        line, without a traceback or any DICOM content, and the server carries on."""
        exc = sys.exc_info()[1]
        log.warning("connection from %s dropped: %s: %s", client_address[0] if client_address else "?",
                    type(exc).__name__, exc)


class ReusePortServer(GuardedAssociationServer):
    """A guarded server whose port other processes share (the socket is bound as the server is built)."""

    reuse_port = True


class AcceptorContexts(list):  # type: ignore[type-arg]
    """A server's supported presentation contexts, copied cheaply for each association it accepts.

    pynetdicom gives every accepted association a ``deepcopy`` of the server's contexts (negotiation
    sets results and roles on the copy). With every storage SOP class supported that is 171 contexts and
    20-35 ms of CPU per association: more than all of a tiny image's C-STORE, paid again by every modality
    that opens an association per image. A context holds an int, UIDs (immutable strings), flags and
    one list of transfer syntaxes, so a copy of each context with its own list is as independent as a
    deep copy."""

    def __deepcopy__(self, memo: dict[int, Any]) -> list[PresentationContext]:
        copies = []
        for context in self:
            duplicate = copy.copy(context)
            duplicate._transfer_syntax = list(context._transfer_syntax)
            copies.append(duplicate)
        return copies


def start_guarded_server(ae: AE, address: tuple[str, int], *, ssl_context: ssl.SSLContext | None,
                         evt_handlers: list[Any], max_pdu: int, spool: ReceiveSpool | None = None,
                         idle_timeout_s: float | None = 60.0, pdu_deadline_s: float = 60.0,
                         request_deadline_s: float = 10.0, max_pending: int = 64,
                         dropped: Callable[[str], None] | None = None, reuse_port: bool = False
                         ) -> GuardedAssociationServer:
    """Bind ``address`` and serve in a daemon thread, as ``ae.start_server(block=False)`` does;
    ``reuse_port`` shares the port with other listener processes (``SO_REUSEPORT``)."""
    server = ae.make_server(address, ssl_context=ssl_context, evt_handlers=evt_handlers,
                            server_class=ReusePortServer if reuse_port else GuardedAssociationServer,
                            request_handler=GuardedRequestHandler)
    assert isinstance(server, GuardedAssociationServer)
    server.contexts = AcceptorContexts(server.contexts)
    server.spool = spool
    server.pdu_limit = (max_pdu or UNLIMITED_PDU_CAP) + PDU_SLACK
    server.idle_timeout_s = idle_timeout_s
    server.pdu_deadline_s = pdu_deadline_s
    server.doorman = Doorman(server._associate, max_pending=max_pending, deadline_s=request_deadline_s,
                             pdu_limit=server.pdu_limit, dropped=dropped)
    server.doorman.start()
    thread = threading.Thread(target=server.serve_forever, name=f"acceptor:{address[1]}", daemon=True)
    thread.start()
    # As start_server does: the AE tracks its servers (server.shutdown() removes itself from the list).
    ae._servers.append(server)
    return server
