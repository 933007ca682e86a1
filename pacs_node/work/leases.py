"""Keeping the leases of claimed jobs while they are worked on.

A job's lease (``worker.lease_seconds``) is how long the queue waits before it presumes the owner dead and
hands the job to someone else. Work that can outlast it (a large batch on a slow CPU, a long queue of
results sent to a slow PACS) renews the leases of the jobs in hand from a thread, so slowness is never
mistaken for death.
"""

from __future__ import annotations

import logging
import threading

from pacs_node.ops.context import ServerContext

log = logging.getLogger(__name__)


class LeaseKeeper:
    """Renews the leases ``owner`` holds on the jobs in hand every third of the lease, until they are
    released or the keeper is closed."""

    def __init__(self, runtime: ServerContext, owner: str, lease_seconds: float) -> None:
        self.rt, self.owner, self.interval_s = runtime, owner, max(lease_seconds / 3.0, 1.0)
        self.job_ids: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"leases-{owner}", daemon=True)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def hold(self, job_ids: list[int]) -> None:
        """Renew these jobs' leases too (besides those already held: an overlapping worker holds the
        batch being inferred and the one being recorded at once)."""
        with self._lock:
            self.job_ids.update(job_ids)

    def release(self, job_id: int) -> None:
        """Stop renewing a job that is finished (done or failed): its lease is no longer ours."""
        with self._lock:
            self.job_ids.discard(job_id)

    def release_all(self, job_ids: list[int]) -> None:
        """Stop renewing every one of ``job_ids`` (a batch is over, whatever became of its jobs)."""
        with self._lock:
            self.job_ids.difference_update(job_ids)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            with self._lock:
                held = list(self.job_ids)
            for job_id in held:
                try:
                    if not self.rt.queue.heartbeat(job_id, self.owner):
                        log.warning("lost the lease of job %d", job_id)
                except Exception:
                    log.exception("heartbeat of job %d failed", job_id)
