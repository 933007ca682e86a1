"""Whether the whole node can do its job now: one typed report behind ``/healthz``.

A node is healthy when it can accept an image (the listener runs, the database answers, the store is
writable and has room), analyse it (a live worker whose pipeline loaded) and send the results (a live
exporter). Those checks are *critical*: one failing makes :attr:`HealthReport.http_status` 503. A
destination that is down is reported but is not critical: the node is doing its job (results wait,
durable, and go when the peer answers); an orchestrator restarting the node would not bring the PACS back.

Workers and exporters live in other processes (or hosts), so they are judged by the rows they renew in
``node_processes`` (:mod:`pacs_node.ops.liveness`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pacs_node.ops.context import ServerContext
from pacs_node.ops.liveness import ProcessState, is_fresh
from storage import processes
from storage.db import ping
from storage.destinations import all_destinations
from storage.schema import DestinationState, NodeProcess, utcnow


class Listening(Protocol):
    """What health needs of the DICOM listener (:class:`pacs_node.dicom.server.Listener`)."""

    @property
    def serving(self) -> bool: ...


@dataclass(frozen=True)
class Check:
    """One check: whether it passed, whether failing it makes the node unhealthy, and what it found."""

    ok: bool
    critical: bool = True
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "critical": self.critical, **self.details}


@dataclass(frozen=True)
class HealthReport:
    checks: dict[str, Check]

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks.values() if check.critical)

    @property
    def http_status(self) -> int:
        return 200 if self.ok else 503

    @property
    def failing(self) -> list[str]:
        return [name for name, check in self.checks.items() if not check.ok]

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "failing": self.failing,
                "checks": {name: check.to_json() for name, check in self.checks.items()}}


def _error(exc: BaseException) -> dict[str, Any]:
    return {"error": f"{type(exc).__name__}: {exc}"}


def _process_json(row: NodeProcess, now: datetime) -> dict[str, Any]:
    return {"name": row.name, "state": row.state, "alive": is_fresh(row.seen_at, now),
            "seen_s_ago": round((now - row.seen_at).total_seconds(), 1), "detail": row.detail}


def _role_check(rows: list[NodeProcess], role: str, now: datetime, expected: int | None) -> Check:
    """At least one live process of ``role`` in the ready state; every one listed with what it said."""
    mine = [row for row in rows if row.role == role and row.state != ProcessState.STOPPED]
    ready = [row for row in mine if row.state == ProcessState.READY and is_fresh(row.seen_at, now)]
    details: dict[str, Any] = {"ready": len(ready), "processes": [_process_json(row, now) for row in mine
                                                                   if is_fresh(row.seen_at, now)
                                                                   or row.state == ProcessState.FAILED]}
    if expected is not None:
        details["expected"] = expected
    if not ready:
        failed = [row.detail for row in mine if row.state == ProcessState.FAILED and row.detail]
        details["error"] = failed[-1] if failed else f"no live {role} has reported ready"
    return Check(bool(ready), details=details)


def node_health(context: ServerContext, *, listener: Listening | None = None) -> HealthReport:
    """Check everything the node needs; ``listener`` is the DICOM listener when it runs in this process
    (otherwise it is not checked here)."""
    checks: dict[str, Check] = {}
    if listener is not None:
        checks["listener"] = Check(listener.serving, details={"port": context.settings.node.port})
    try:
        ping(context.engine)
        checks["database"] = Check(True)
    except Exception as exc:
        checks["database"] = Check(False, details=_error(exc))
    try:
        with context.store.temp() as probe:
            probe.write(b"ok")
        checks["store_writable"] = Check(True)
    except Exception as exc:
        checks["store_writable"] = Check(False, details=_error(exc))
    try:
        checks["free_space"] = Check(context.store.has_room(), details={
            "free_bytes": context.store.free_bytes(), "min_free_bytes": context.store.min_free_bytes})
    except OSError as exc:
        checks["free_space"] = Check(False, details=_error(exc))
    if checks["database"].ok:
        now = utcnow()
        try:
            with context.read_session() as session:
                rows = list(processes.processes(session))
                destinations = list(all_destinations(session))
        except Exception as exc:  # an old schema, a dropped connection: say so, as a failed check
            checks["workers"] = Check(False, details=_error(exc))
        else:
            count = context.settings.worker.count
            checks["workers"] = _role_check(rows, "worker", now, count or None)
            checks["exporters"] = _role_check(rows, "exporter", now, None)
            down = [{"name": d.name, "down_since": d.down_since.isoformat() if d.down_since else None,
                     "consecutive_failures": d.consecutive_failures, "last_error": d.last_error}
                    for d in destinations if d.state == DestinationState.DOWN.value]
            checks["destinations"] = Check(not down, critical=False,
                                           details={"configured": sorted(context.settings.peers), "down": down})
    return HealthReport(checks)


class NodeStateCollector(Collector):
    """Liveness of workers and exporters, destination state and oldest waiting job, read from the
    database at scrape time (labels are roles, states and peer names: never a patient's)."""

    def __init__(self, runtime: ServerContext) -> None:
        self._rt = runtime

    def collect(self) -> Iterable[Metric]:
        now = utcnow()
        with self._rt.read_session() as session:
            rows = list(processes.processes(session))
            destinations = {d.name: d for d in all_destinations(session)}
        alive = GaugeMetricFamily("pacs_node_processes_alive",
                                  "Workers and exporters renewing their liveness row, by role and state",
                                  labels=["role", "state"])
        counts: dict[tuple[str, str], int] = {(role, state): 0 for role in ("worker", "exporter")
                                              for state in (ProcessState.READY, ProcessState.FAILED)}
        for row in rows:
            if is_fresh(row.seen_at, now):
                counts[(row.role, row.state)] = counts.get((row.role, row.state), 0) + 1
        for (role, state), n in sorted(counts.items()):
            alive.add_metric([role, state], n)
        yield alive
        up = GaugeMetricFamily("pacs_node_destination_up", "1 when the destination takes associations, 0 when "
                               "it is marked down", labels=["destination"])
        failures = GaugeMetricFamily("pacs_node_destination_consecutive_failures",
                                     "Failed sends in a row to the destination", labels=["destination"])
        for name in sorted(set(self._rt.settings.peers) | set(destinations)):
            row = destinations.get(name)
            up.add_metric([name], 0 if row is not None and row.state == DestinationState.DOWN.value else 1)
            failures.add_metric([name], row.consecutive_failures if row is not None else 0)
        yield up
        yield failures
        oldest = GaugeMetricFamily("pacs_node_oldest_waiting_job_seconds",
                                   "Age of the oldest queued or failed job, by kind", labels=["kind"])
        ages = self._rt.queue.oldest_waiting_age_s()
        for kind in ("analyse", "export"):
            oldest.add_metric([kind], ages.get(kind, 0.0))
        yield oldest
