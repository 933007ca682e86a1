"""Sending result objects to their destinations: one durable ``export`` job per (result, peer).

An exporter thread claims the due jobs (up to ``export.batch_size``) and sends each destination's share on
one association: an image's results (AI findings SR, narrative SR, key object selection, presentation
state) travel together instead of paying an association each, which at GPU throughput would be thousands
of associations a second. Each job still succeeds or fails on its own C-STORE status. A DICOMweb peer
gets the same batch as one STOW-RS request (:mod:`pacs_node.work.dicomweb_export`). The destinations of
a batch are sent to side by side and a few threads claim at once, so a peer that is down or hangs costs
only that peer's jobs a retry with backoff (``JobQueue.fail``).
A receiver that refuses Comprehensive 3D SR in negotiation (many PACSs predate it) gets the
Comprehensive SR copy from :func:`pacs_node.results.comprehensive_fallback` instead.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pydicom
from pydicom.uid import generate_uid
from pydicom.errors import InvalidDicomError
from pynetdicom.status import STATUS_SUCCESS, STATUS_WARNING, code_to_category

from pacs_node.config import Settings
from pacs_node.dicom.commitment import request_commitment
from pacs_node.dicom.scu import ScuError, send_datasets
from pacs_node.ops import metrics
from pacs_node.ops.context import ServerContext
from pacs_node.ops.liveness import Beacon, ProcessState
from pacs_node.results import comprehensive_fallback
from pacs_node.work.destinations import DestinationMonitor
from pacs_node.work.dicomweb_export import stow_datasets
from pacs_node.work.job_loop import JobLoop, complete_jobs
from storage.commitment import held_instances
from storage.history import commitment_requested
from storage.queue import ClaimedJob
from storage.repository import stored_paths
from storage.schema import JobKind, utcnow

log = logging.getLogger(__name__)


#: How many times less often than the first export thread the others poll when idle.
IDLE_POLL_FACTOR = 8


@dataclass
class Exporter:
    """Threads that claim ``export`` jobs one at a time and send them."""

    settings: Settings
    runtime: ServerContext
    worker_id: str

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.destinations = DestinationMonitor(self.settings, self.runtime)
        self._beacon = Beacon(self.runtime, self.worker_id, "exporter")

    def start(self) -> None:
        self._beacon.__enter__()
        self._beacon.set(ProcessState.READY, f"{self.settings.export.concurrency} thread(s)")
        for i in range(self.settings.export.concurrency):
            thread = threading.Thread(target=self._loop, args=(f"{self.worker_id}/export{i}", i == 0),
                                      name=f"export-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout)
        self._beacon.__exit__(None)

    def _loop(self, owner: str, first: bool) -> None:
        """One export thread. Every thread wakes when this host's worker rings; only the first polls at
        ``worker.poll_interval_s`` for work the bell does not announce (queued on another host), the others
        :data:`IDLE_POLL_FACTOR` times less often: an idle node's polls were most of its CPU."""
        poll = self.settings.worker.poll_interval_s * (1 if first else IDLE_POLL_FACTOR)
        loop = JobLoop(self.runtime, owner, JobKind.EXPORT, claim=lambda: self.runtime.queue.claim(
            owner, [JobKind.EXPORT], limit=self.settings.export.batch_size,
            skip_destinations=self.destinations.down()), idle_wait=lambda: poll)
        loop.run(self._stop, lambda jobs, leases: self.run_jobs(jobs, owner, leases.release))

    def run_jobs(self, jobs: list[ClaimedJob], owner: str, settled: Callable[[int], None] = lambda _id: None) -> None:
        """Send claimed ``jobs``, one association per destination, and settle each job on its own outcome
        (``settled(job_id)`` after each)."""
        by_destination: dict[str, list[ClaimedJob]] = {}
        for job in jobs:
            by_destination.setdefault(job.destination or "", []).append(job)

        def send(destination: str, group: list[ClaimedJob]) -> None:
            try:
                outcomes = self._send(destination, group)
            except Exception as exc:
                log.exception("export to %s failed unexpectedly", destination)
                outcomes = [ScuError(f"{type(exc).__name__}: {exc}")] * len(group)
            self._settle(group, outcomes, owner, settled)
            self._ask_commitment(destination, [job.sop_instance_uid for job, outcome in zip(group, outcomes)
                                               if outcome is None])

        if len(by_destination) == 1:
            send(*next(iter(by_destination.items())))
            return
        # Each destination on its own thread: a peer that hangs until the timeout must not hold up the others.
        with ThreadPoolExecutor(len(by_destination), thread_name_prefix="export-to") as pool:
            for done in [pool.submit(send, destination, group) for destination, group in by_destination.items()]:
                done.result()

    def _settle(self, jobs: list[ClaimedJob], outcomes: list[ScuError | None], owner: str,
                settled: Callable[[int], None]) -> None:
        """Fail each job that failed on its own; complete those delivered in one transaction (at the
        message rate of a GPU node a commit per job would be most of the exporter's work)."""
        queue = self.runtime.queue
        delivered = []
        for job, outcome in zip(jobs, outcomes, strict=True):
            settled(job.id)
            if outcome is None:
                delivered.append(job)
                continue
            metrics.EXPORT_FAILURES.labels(job.destination or "?").inc()
            policy = self.settings.export_retry(job.destination or "")
            state = queue.fail(job.id, owner, str(outcome), retryable=outcome.retryable, policy=policy)
            log.warning("export job %d to %s failed (attempt %d/%d, now %s): %s", job.id, job.destination,
                        job.attempts, job.max_attempts, state.value, outcome)
        sent_at = utcnow().isoformat()
        completed = complete_jobs(self.runtime, [(job, {"sent_at": sent_at}) for job in delivered], owner)
        for job, ok in zip(delivered, completed, strict=True):
            if ok:
                log.info("export job %d: result %s sent to %s", job.id, job.sop_instance_uid, job.destination)

    def _send(self, destination: str, jobs: list[ClaimedJob]) -> list[ScuError | None]:
        """C-STORE the stored results of ``jobs`` to ``destination`` on one association; per job, None
        for success (a warning status is stored too) or why it failed."""
        peer = self.settings.peers.get(destination)
        if peer is None:
            return [ScuError(f"destination {destination!r} is not a configured peer", retryable=False)] * len(jobs)
        with self.runtime.read_session() as session:
            paths = stored_paths(session, (job.sop_instance_uid for job in jobs))
        outcomes: list[ScuError | None] = [None] * len(jobs)
        datasets, sending = [], []
        for i, job in enumerate(jobs):
            path = paths.get(job.sop_instance_uid)
            if not path:
                outcomes[i] = ScuError("the result instance is no longer stored", retryable=False)
                continue
            try:
                datasets.append(pydicom.dcmread(self.runtime.store.path(path)))
            except InvalidDicomError as exc:  # the same bytes fail the same way; its batch mates still go
                outcomes[i] = ScuError(f"the stored result {path} is not readable DICOM: {exc}", retryable=False)
                continue
            except OSError as exc:
                outcomes[i] = ScuError(f"cannot read the stored result {path}: {exc}")
                continue
            sending.append(i)
        if not datasets:
            return outcomes
        try:
            if peer.is_dicomweb:
                sent = stow_datasets(self.settings, peer, datasets)
            else:
                sent = send_datasets(self.settings, peer, datasets, comprehensive_fallback)
        except ScuError as exc:
            if exc.retryable:
                self.destinations.failed(destination, str(exc))
            sent = [exc] * len(datasets)
        else:
            self.destinations.answered(destination)
        for i, result in zip(sending, sent, strict=True):
            if isinstance(result, ScuError):
                outcomes[i] = result
            elif code_to_category(result) not in (STATUS_SUCCESS, STATUS_WARNING):
                verb = "STOW-RS" if peer.is_dicomweb else "C-STORE"
                outcomes[i] = ScuError(f"{peer.describe()} answered {verb} with status 0x{result:04X}")
        return outcomes

    def _ask_commitment(self, destination: str, delivered: list[str]) -> None:
        """Ask a peer with ``storage_commitment`` to commit the results just delivered to it (after their
        jobs are settled, so the deliveries exist); a failed request is logged and leaves them unasked."""
        peer = self.settings.peers.get(destination)
        if peer is None or not peer.storage_commitment or not delivered:
            return
        with self.runtime.read_session() as session:
            classes = held_instances(session, delivered)
        transaction = generate_uid()
        with self.runtime.write_session() as session, session.begin():
            commitment_requested(session, destination, delivered, transaction)
        try:
            request_commitment(self.settings, peer, [(classes[uid], uid) for uid in delivered if uid in classes],
                               transaction)
        except ScuError as exc:
            log.warning("storage commitment request to %s failed: %s", destination, exc)
            with self.runtime.write_session() as session, session.begin():
                commitment_requested(session, destination, delivered, None)
