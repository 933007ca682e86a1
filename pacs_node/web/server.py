"""The HTTP port of ``pacs-node serve``: the application of :mod:`pacs_node.web.app` on uvicorn, in a
thread beside the DICOM listener.

The socket is bound in the caller's thread, so a port already taken fails ``serve`` at start with the
key named, like the DICOM port; the application is built and served in uvicorn's thread. uvicorn limits what one client can hold: ``limit_concurrency``
connections (503 beyond), idle keep-alive connections closed after ``timeout_keep_alive_s``; uvicorn has
no limit on how long a client may take to send its headers, so :class:`HeaderTimeoutProtocol` adds one
(a slow-header client would otherwise hold a connection for ever). Request bodies are read against
``read_timeout_s`` by the handlers that read them (STOW-RS).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
import time
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from pacs_node.config import Settings
from pacs_node.ops.context import ServerContext
from pacs_node.ops.health import Listening

log = logging.getLogger(__name__)


class HeaderTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol that closes a connection whose request headers have not all arrived
    ``header_timeout_s`` after it opened or after its previous response."""

    header_timeout_s: float = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._arm(None)

    def _arm(self, cycle: Any) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._waiting_after = cycle
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def handle_events(self) -> None:
        super().handle_events()
        if self._header_timer is not None and self.cycle is not self._waiting_after:
            self._header_timer.cancel()  # a request's headers are complete: its cycle exists
            self._header_timer = None

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
            self._arm(self.cycle)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        super().connection_lost(exc)

    def _headers_too_slow(self) -> None:
        if not self.transport.is_closing():
            log.debug("http: closing a connection that sent no complete request headers in time")
            self.transport.close()


class WebServer:
    """Owns the bound socket and uvicorn's thread. The socket is bound (and listening) on construction;
    ``start`` returns at once: the application is built and served in the thread, and connections made
    meanwhile wait in the socket's backlog, so ``serve`` starts its workers without waiting for it."""

    def __init__(self, settings: Settings, runtime: ServerContext, listener: Listening | None = None) -> None:
        self.settings = settings
        self.runtime = runtime
        self.listener = listener
        http = settings.http
        self._socket = socket.create_server((http.bind, http.port), family=_family(http.bind), backlog=128)
        self._server: uvicorn.Server | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="http", daemon=True)

    def _config(self) -> uvicorn.Config:
        from pacs_node.web.app import create_app

        http = self.settings.http
        protocol = type("HeaderTimeoutProtocol", (HeaderTimeoutProtocol,), {"header_timeout_s": http.header_timeout_s})
        tls: dict[str, Any] = {}
        if http.tls is not None:
            tls = {"ssl_certfile": str(http.tls.cert_file), "ssl_keyfile": str(http.tls.key_file),
                   "ssl_keyfile_password": http.tls.key_password.get_secret_value() if http.tls.key_password else None}
            if http.tls.ca_file is not None:
                tls |= {"ssl_ca_certs": str(http.tls.ca_file), "ssl_cert_reqs": ssl.CERT_REQUIRED}
        return uvicorn.Config(
            create_app(self.settings, self.runtime, self.listener), http=protocol, ws="none", lifespan="off", interface="asgi3",
            timeout_keep_alive=int(max(1, http.timeout_keep_alive_s)), limit_concurrency=http.limit_concurrency,
            timeout_graceful_shutdown=5, log_config=None, access_log=False, server_header=False, **tls,
        )

    def _run(self) -> None:
        try:
            self._server = uvicorn.Server(self._config())
        except Exception:
            log.exception("http: the application could not be built; the HTTP port answers nothing")
            return
        if self._stopping.is_set():
            return
        scheme = "https" if self.settings.http.tls is not None else "http"
        log.info("HTTP (health, metrics, DICOMweb, admin API, console) on %s://%s:%d/", scheme,
                 *self._socket.getsockname()[:2])
        self._server.run(sockets=[self._socket])

    @property
    def port(self) -> int:
        return self._socket.getsockname()[1]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        deadline = time.monotonic() + 10
        while self._thread.is_alive() and time.monotonic() < deadline:
            if self._server is not None:
                self._server.should_exit = True
            self._thread.join(0.05)
        self._socket.close()


def _family(bind: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in bind else socket.AF_INET
