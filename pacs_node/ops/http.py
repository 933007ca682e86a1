"""``/healthz`` and ``/metrics`` on a local HTTP port (stdlib server, one thread per request).

Health (:func:`pacs_node.ops.health.node_health`) is what an operator or a container orchestrator needs
to decide "can this node take, analyse and deliver an image right now". Bound to 127.0.0.1 by default:
the metrics reveal volumes and the health check is no one else's business.
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from pacs_node.ops import metrics
from pacs_node.ops.context import ServerContext
from pacs_node.ops.health import Listening, NodeStateCollector, node_health

log = logging.getLogger(__name__)


class HttpServer:
    def __init__(self, runtime: ServerContext, bind: str, port: int, listener: Listening | None = None) -> None:
        registry = metrics.scrape_registry(runtime.queue_depth, [NodeStateCollector(runtime)])

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (stdlib name)
                if self.path.split("?")[0] == "/healthz":
                    report = node_health(runtime, listener=listener)
                    self._send(report.http_status, "application/json", json.dumps(report.to_json()).encode())
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
