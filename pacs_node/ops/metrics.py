"""Prometheus metrics of the node.

``serve`` and the worker processes it starts are separate processes, so counters and histograms use
prometheus_client's multiprocess mode: :func:`pacs_node.ops.context.prepare_metrics_dir` sets
``PROMETHEUS_MULTIPROC_DIR`` *before* this module is first imported, and ``/metrics`` aggregates every
process's files. Queue depth is not counted by anyone: it is read from the database at scrape time, so
it is right even after a crash; so are the liveness of workers and exporters, the state of each
destination and the age of the oldest waiting job (:class:`NodeStateCollector`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, multiprocess
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from pacs_node.ops.context import ServerContext

INSTANCES_RECEIVED = Counter(
    "pacs_node_instances_received_total",
    "C-STORE requests handled, by outcome (stored, duplicate, not_processed, discarded, failed)",
    ["outcome"],
)
ASSOCIATIONS_REJECTED = Counter(
    "pacs_node_associations_rejected_total", "Associations rejected, by reason", ["reason"]
)
JOB_SECONDS = Histogram(
    "pacs_node_job_seconds",
    "Seconds from a job's creation to its completion, by kind",
    ["kind"],
    buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, float("inf")),
)
JOBS_FAILED = Counter("pacs_node_job_failures_total", "Failed job attempts, by kind", ["kind"])
EXPORT_FAILURES = Counter(
    "pacs_node_export_failures_total", "Failed C-STORE attempts of results, by destination", ["destination"]
)
PIPELINE_LOAD_FAILURES = Counter(
    "pacs_node_pipeline_load_failures_total", "Workers whose pipeline (model bundle) failed to load"
)


class QueueDepthCollector(Collector):
    """Jobs per (kind, state), read from the database at scrape time."""

    def __init__(self, counts: Callable[[], Iterable[tuple[str, str, int]]]) -> None:
        self._counts = counts

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily("pacs_node_queue_jobs", "Jobs in the queue, by kind and state",
                                   labels=["kind", "state"])
        for kind, state, n in self._counts():
            family.add_metric([kind, state], n)
        yield family


class NodeStateCollector(Collector):
    """Liveness of workers and exporters, destination state and oldest waiting job, read from the
    database at scrape time (labels are roles, states and peer names: never a patient's)."""

    def __init__(self, runtime: ServerContext) -> None:
        self._rt = runtime

    def collect(self) -> Iterable[Metric]:
        from pacs_node.ops.liveness import ProcessState, is_fresh
        from storage import processes
        from storage.destinations import all_destinations
        from storage.schema import DestinationState, utcnow

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


def scrape_registry(runtime: ServerContext) -> CollectorRegistry:
    """The registry ``/metrics`` renders: every process's samples, the queue depth and the node's state."""
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.MultiProcessCollector(registry)
    else:
        from prometheus_client import REGISTRY

        registry = REGISTRY
    registry.register(QueueDepthCollector(runtime.queue_depth))
    registry.register(NodeStateCollector(runtime))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


def process_exited(pid: int) -> None:
    """Forget the live-gauge files of a dead worker process (multiprocess mode only)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(pid)
