"""``/healthz`` and ``/metrics`` on a local HTTP port (stdlib server, one thread per request).

Health is what an operator or a container orchestrator needs to decide "is this node able to accept an
image right now": the database answers, the store is writable and has room. Bound to 127.0.0.1 by
default: the metrics reveal volumes and the health check is no one else's business.
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from pacs_node.ops import metrics
from pacs_node.ops.context import ServerContext
from storage.db import ping

log = logging.getLogger(__name__)


def health(runtime: ServerContext) -> tuple[bool, dict[str, Any]]:
    """(healthy, details) — each check says what it found, so a failing probe explains itself."""
    checks: dict[str, Any] = {}
    try:
        ping(runtime.engine)
        checks["database"] = {"ok": True}
    except Exception as exc:
        checks["database"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    try:
        with runtime.store.temp() as probe:
            probe.write(b"ok")
        checks["store_writable"] = {"ok": True}
    except Exception as exc:
        checks["store_writable"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    try:
        free = runtime.store.free_bytes()
        checks["free_space"] = {"ok": runtime.store.has_room(), "free_bytes": free,
                                "min_free_bytes": runtime.store.min_free_bytes}
    except OSError as exc:
        checks["free_space"] = {"ok": False, "error": str(exc)}
    return all(check["ok"] for check in checks.values()), checks


class HttpServer:
    def __init__(self, runtime: ServerContext, bind: str, port: int) -> None:
        registry = metrics.scrape_registry(runtime.queue_depth)

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (stdlib name)
                if self.path.split("?")[0] == "/healthz":
                    ok, checks = health(runtime)
                    self._send(200 if ok else 503, "application/json",
                               json.dumps({"ok": ok, "checks": checks}).encode())
                elif self.path.split("?")[0] == "/metrics":
                    try:
                        body = metrics.render(registry)
                    except Exception as exc:
                        log.exception("rendering metrics failed")
                        self._send(500, "text/plain", f"{type(exc).__name__}: {exc}\n".encode())
                        return
                    self._send(200, "text/plain; version=0.0.4; charset=utf-8", body)
                else:
                    self._send(404, "text/plain", b"not found: try /healthz or /metrics\n")

            def _send(self, code: int, content_type: str, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
                log.debug("http: " + format, *args)

        self._server = ThreadingHTTPServer((bind, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="http", daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def start(self) -> None:
        self._thread.start()
        log.info("health and metrics on http://%s:%d/", *self._server.server_address[:2])

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
