"""Prometheus metrics of the node.

``serve`` and the worker processes it starts are separate processes, so counters and histograms use
prometheus_client's multiprocess mode, switched on by :func:`use_multiprocess_dir` (called through
:func:`pacs_node.ops.context.prepare_metrics_dir` by the ``serve`` and ``worker`` commands at start, in
whatever order modules were imported), and ``/metrics`` aggregates every process's files. Queue depth is
not counted by anyone: it is read from the database at scrape time, so it is right even after a crash; so
are the liveness of workers and exporters, the state of each destination and the age of the oldest
waiting job (:class:`pacs_node.ops.health.NodeStateCollector`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, multiprocess, values
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

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
    "pacs_node_pipeline_load_failures_total", "Workers whose pipeline (model bundle) failed to load, by error type",
    ["error"],
)


def use_multiprocess_dir(path: Path) -> None:
    """Keep this process's samples in ``path``, beside those of the node's other processes.

    prometheus_client picks its value class from ``PROMETHEUS_MULTIPROC_DIR`` when it is first imported;
    it is picked again here, so the switch does not depend on import order. Every metric of the node has
    labels, and a labelled metric makes its values on first use (``labels(...)``), after this call."""
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
    values.ValueClass = values.get_value_class()


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


class _ProcessCollector:
    """Everything in prometheus_client's default registry."""

    def collect(self) -> Iterable[Metric]:
        from prometheus_client import REGISTRY

        yield from REGISTRY.collect()


def scrape_registry(counts: Callable[[], Iterable[tuple[str, str, int]]],
                    collectors: Iterable[Collector] = ()) -> CollectorRegistry:
    """The registry ``/metrics`` renders: every process's samples, the queue depth and ``collectors``
    (:class:`pacs_node.ops.health.NodeStateCollector`: liveness, destinations, oldest waiting job)."""
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.MultiProcessCollector(registry)
    else:
        # This process's own samples, through a registry of its own: several applications in one
        # process (tests) must not register the queue gauge twice in the global one.
        registry.register(_ProcessCollector())
    registry.register(QueueDepthCollector(counts))
    for collector in collectors:
        registry.register(collector)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


def process_exited(pid: int) -> None:
    """Forget the live-gauge files of a dead worker process (multiprocess mode only)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(pid)
