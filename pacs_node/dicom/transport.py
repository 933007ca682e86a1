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
  ever. Here a stalled read times out after ``idle_timeout_s`` (pynetdicom reads only when ``select``
  says data is waiting, so an association idling between messages is not affected).
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct
import sys
import threading
from typing import Any

from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

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


class GuardedRequestHandler(RequestHandler):
    """pynetdicom's request handler, with the accepted association reading through a
    :class:`ServerAssociationSocket` (it adds no state, so the socket pynetdicom built is re-classed)."""

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        sock = assoc.dul.socket
        assert sock is not None and type(sock) is AssociationSocket
        sock.__class__ = ServerAssociationSocket
        return assoc


class PduTooLarge(ConnectionError):
    """A PDU header announced more bytes than this listener will buffer."""


class _PduLimit:
    """Mixin for a socket class: ``recv`` raises :class:`PduTooLarge` on an oversized PDU header.

    Framing is followed byte by byte, so it holds however the reader splits its reads."""

    pdu_limit: int = UNLIMITED_PDU_CAP
    _header: bytes = b""
    _remaining: int = 0

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        data: bytes = super().recv(bufsize, flags)  # type: ignore[misc]
        view = memoryview(data)
        while view:
            if self._remaining:
                step = min(self._remaining, len(view))
                self._remaining -= step
                view = view[step:]
                continue
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
        return data


def _peer(sock: object) -> str:
    try:
        return str(sock.getpeername()[0])  # type: ignore[attr-defined]
    except (OSError, AttributeError, IndexError):
        return "?"


class _LimitedSocket(_PduLimit, socket.socket):
    pass


class _LimitedSSLSocket(_PduLimit, ssl.SSLSocket):
    pass


class GuardedAssociationServer(ThreadedAssociationServer):
    """A :class:`ThreadedAssociationServer` with deferred TLS handshakes, a PDU size limit and read
    timeouts (see the module docstring). Build it with :func:`start_guarded_server`."""

    pdu_limit: int = UNLIMITED_PDU_CAP
    idle_timeout_s: float | None = 60.0
    #: Where this server's incoming C-STORE datasets are written (see :mod:`pacs_node.dicom.spooling`).
    spool: ReceiveSpool | None = None

    def get_request(self) -> tuple[socket.socket, Any]:
        assert self.socket is not None
        raw, address = self.socket.accept()
        raw.settimeout(self.idle_timeout_s)
        if self.ssl_context is not None:
            self.ssl_context.sslsocket_class = _LimitedSSLSocket
            client: socket.socket = self.ssl_context.wrap_socket(
                raw, server_side=True, do_handshake_on_connect=False
            )
        else:
            client = _LimitedSocket(raw.family, raw.type, raw.proto, fileno=raw.detach())
            client.settimeout(self.idle_timeout_s)
        client.pdu_limit = self.pdu_limit  # type: ignore[attr-defined]
        return client, address

    def handle_error(self, request: Any, client_address: Any) -> None:
        """One failed connection (a TLS handshake that failed, a PDU over the limit) is logged in one
        line, without a traceback or any DICOM content, and the server carries on."""
        exc = sys.exc_info()[1]
        log.warning("connection from %s dropped: %s: %s", client_address[0] if client_address else "?",
                    type(exc).__name__, exc)


def start_guarded_server(ae: AE, address: tuple[str, int], *, ssl_context: ssl.SSLContext | None,
                         evt_handlers: list[Any], max_pdu: int, spool: ReceiveSpool | None = None,
                         idle_timeout_s: float | None = 60.0) -> GuardedAssociationServer:
    """Bind ``address`` and serve in a daemon thread, as ``ae.start_server(block=False)`` does."""
    server = ae.make_server(address, ssl_context=ssl_context, evt_handlers=evt_handlers,
                            server_class=GuardedAssociationServer, request_handler=GuardedRequestHandler)
    assert isinstance(server, GuardedAssociationServer)
    server.spool = spool
    server.pdu_limit = (max_pdu or UNLIMITED_PDU_CAP) + PDU_SLACK
    server.idle_timeout_s = idle_timeout_s
    thread = threading.Thread(target=server.serve_forever, name=f"acceptor:{address[1]}", daemon=True)
    thread.start()
    # As start_server does: the AE tracks its servers (server.shutdown() removes itself from the list).
    ae._servers.append(server)
    return server
