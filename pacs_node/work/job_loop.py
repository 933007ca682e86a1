"""The loop the analysis worker and every exporter thread run: claim due jobs, keep their leases while
they are worked on, and sleep on the kind's doorbell when there is nothing to do.

A claim that fails (the database is restarting) is retried after :data:`CLAIM_RETRY_S`, never fatal: a
worker outlives a database failover. An idle loop waits at most ``worker.poll_interval_s`` on the doorbell
(:mod:`pacs_node.work.wakeups`), so a ring that never comes (the job was queued on another host) costs one
poll interval. Leases (:mod:`pacs_node.work.leases`) are renewed for the jobs in hand until each is
released or the batch is over.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pacs_node.ops import metrics
from pacs_node.ops.context import ServerContext
from pacs_node.work.leases import LeaseKeeper
from storage.queue import ClaimedJob
from storage.schema import JobKind

log = logging.getLogger(__name__)

#: Pause before claiming again after a claim failed.
CLAIM_RETRY_S = 5.0


@dataclass
class JobLoop:
    """Claims ``kind`` jobs as ``owner`` with ``claim`` and hands each batch to the work function."""

    runtime: ServerContext
    owner: str
    kind: JobKind
    claim: Callable[[], list[ClaimedJob]]

    def run(self, stop: threading.Event, work: Callable[[list[ClaimedJob], LeaseKeeper], None]) -> None:
        """Until ``stop`` is set (a batch in progress is finished first): claim, ``work(jobs, leases)``,
        and wait on the doorbell when nothing was due. ``work`` releases each job's lease when the job is
        settled; whatever it leaves held is released when it returns."""
        settings = self.runtime.settings
        with LeaseKeeper(self.runtime, self.owner, settings.worker.lease_seconds) as leases, \
                self.runtime.doorbell(self.kind).waiter() as waiter:
            while not stop.is_set():
                try:
                    jobs = self.claim()
                except Exception:
                    log.exception("%s: cannot claim jobs; retrying", self.kind.value)
                    stop.wait(CLAIM_RETRY_S)
                    continue
                if not jobs:
                    waiter.wait(settings.worker.poll_interval_s, stop)
                    continue
                leases.hold([job.id for job in jobs])
                try:
                    work(jobs, leases)
                finally:
                    leases.hold([])


def complete_job(runtime: ServerContext, job: ClaimedJob, owner: str, result: Mapping[str, Any]) -> bool:
    """Mark ``job`` done with ``result`` and observe its latency (creation to completion) in
    ``pacs_node_job_seconds``; ``False`` when the lease was lost (another owner has the job now)."""
    if not runtime.queue.complete(job.id, owner, dict(result)):
        return False
    record = runtime.queue.get(job.id)
    if record is not None and record.finished_at is not None:
        metrics.JOB_SECONDS.labels(job.kind).observe((record.finished_at - record.created_at).total_seconds())
    return True
