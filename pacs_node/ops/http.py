"""What ``/healthz`` answers (served by :mod:`pacs_node.web.app`).

Health is what an operator or a container orchestrator needs to decide "is this node able to accept an
image right now": the database answers, the store is writable and has room. Bound to 127.0.0.1 by
default: the metrics reveal volumes and the health check is no one else's business.
"""

from __future__ import annotations

from typing import Any

from pacs_node.ops.context import ServerContext
from storage.db import ping

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
