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

A result goes as it is stored: its file's data set streamed to the peer, not read and encoded again
(:class:`pacs_node.dicom.scu.StoreAssociation`), unless the peer needs another syntax or the fallback.
The association with a destination stays open after a batch for the next one (:class:`OpenAssociations`)
and is released after ``export.keep_open_s`` without work, when the exporter stops, and at once when it
failed; the next batch opens a new one. A kept association the peer closed meanwhile costs its batch
nothing: the batch goes again on a new one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import generate_uid
from pynetdicom.status import STATUS_SUCCESS, STATUS_WARNING, code_to_category

from pacs_node.config import Peer, Settings
from pacs_node.dicom.adjustments import apply_pynetdicom_adjustments, undo_pynetdicom_adjustments
from pacs_node.dicom.commitment import request_commitment
from pacs_node.dicom.scu import (
    MAX_CONTEXTS,
    Contexts,
    ScuError,
    StoreAssociation,
    StoredInstance,
    store_contexts,
    unreadable,
)
from pacs_node.ops import metrics
from pacs_node.ops.context import ServerContext
from pacs_node.ops.liveness import Beacon, ProcessState
from pacs_node.results import comprehensive_fallback
from pacs_node.work.destinations import DestinationMonitor
from pacs_node.work.dicomweb_export import stow_datasets
from pacs_node.work.job_loop import JobLoop, complete_jobs
from pacs_node.work.leases import LeaseKeeper
from storage.commitment import held_instances
from storage.history import commitment_requested
from storage.queue import ClaimedJob
from storage.repository import stored_files
from storage.schema import JobKind, utcnow

log = logging.getLogger(__name__)


#: How many times less often than the first export thread the others poll when idle.
IDLE_POLL_FACTOR = 8

#: How long after a claim that left nothing due the other threads leave new work to the claiming thread
#: (which looks again as soon as its batch is sent): a ring wakes every thread, and each that claimed
#: after that claim began found nothing, a write transaction each. A batch that takes longer (a slow or
#: hanging peer) has the next idle thread claim what came meanwhile.
DEFER_S = 0.25

#: How often the threads of an association kept for the next batch poll while it waits (see
#: :func:`pacs_node.dicom.adjustments.park_reactors`: anything from the peer still wakes them at once).
PARKED_POLL_S = 0.1


class OpenAssociations:
    """The associations with storage peers kept open between batches, by destination.

    A batch takes an idle association of its destination that proposed everything the batch needs
    (and gives it back after), or opens one proposing that and all the kept one proposed, so the set a
    destination's association proposes grows to the few result classes and stops there. Two threads
    sending to one destination at once use two associations; the one left idle is closed by
    :meth:`close_idle`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        #: pynetdicom aborts an association idle for ``export.timeout_s``: release it well before
        self.keep_open_s = min(settings.export.keep_open_s, settings.export.timeout_s / 2)
        self._idle: dict[str, list[StoreAssociation]] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._closer: threading.Thread | None = None

    def send(self, destination: str, peer: Peer, instances: list[StoredInstance]) -> list[int | ScuError]:
        """C-STORE ``instances`` to ``peer``; one outcome per instance, in order. Raises
        :class:`ScuError` when no association could be made."""
        wanted = store_contexts(((i.sop_class_uid, i.transfer_syntax_uid) for i in instances), peer, True)
        link, proposing = self._take(destination, wanted)
        kept = link is not None
        if link is None:
            link = StoreAssociation(self.settings, peer, proposing)
        try:
            answers = link.answers
            outcomes = link.send(instances, comprehensive_fallback)
            if kept and link.answers == answers and not link.is_established:
                # The kept association was gone (the peer closed it while idle): not the batch's fault.
                log.info("the kept association with %s had ended; sending on a new one", destination)
                link.close()
                link = StoreAssociation(self.settings, peer, link.contexts)
                outcomes = link.send(instances, comprehensive_fallback)
        finally:
            self._give_back(destination, link)
        return outcomes

    def _take(self, destination: str, wanted: Contexts) -> tuple[StoreAssociation | None, Contexts]:
        """The most recently used idle association of ``destination`` if it covers ``wanted``, else
        None (an idle one that does not is closed) and what a new one should propose: ``wanted`` and
        what the closed one proposed, within the limit of contexts."""
        with self._lock:
            idle = self._idle.get(destination, [])
            link = idle.pop() if idle else None
        if link is None:
            return None, wanted
        if link.is_established and link.covers(wanted):
            link.park(None)
            return link, wanted
        link.close()
        merged = link.contexts | wanted
        return None, merged if len(merged) <= MAX_CONTEXTS else wanted

    def _give_back(self, destination: str, link: StoreAssociation) -> None:
        """Keep ``link`` for the next batch (and start closing idle ones), or release it."""
        if self.keep_open_s > 0 and link.is_established:
            link.park(PARKED_POLL_S)
            with self._lock:
                if not self._closed.is_set():
                    self._idle.setdefault(destination, []).append(link)
                    if self._closer is None:
                        self._closer = threading.Thread(target=self._close_idle_ones, name="export-idle",
                                                        daemon=True)
                        self._closer.start()
                    return
        link.close()

    def _close_idle_ones(self) -> None:
        while not self._closed.wait(self.keep_open_s / 4):
            self.close_idle(self.keep_open_s)

    def close_idle(self, older_than_s: float) -> int:
        """Release the associations idle for at least ``older_than_s``; how many."""
        now = time.monotonic()
        closing = []
        with self._lock:
            for destination, idle in self._idle.items():
                closing += [link for link in idle if now - link.idle_since >= older_than_s]
                idle[:] = [link for link in idle if now - link.idle_since < older_than_s]
        for link in closing:
            link.close()
        return len(closing)

    def close_all(self) -> None:
        """Release every idle association and keep none from now on; those in use are released when
        their batch is over."""
        with self._lock:
            self._closed.set()
            closing = [link for idle in self._idle.values() for link in idle]
            self._idle.clear()
            closer, self._closer = self._closer, None
        for link in closing:
            link.close()
        if closer is not None:
            closer.join()


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
        self.associations = OpenAssociations(self.settings)
        self._beacon = Beacon(self.runtime, self.worker_id, "exporter")
        self._claiming = threading.Lock()
        self._drained_at = float("-inf")  # when the last claim that left no due job began
        self._drained_by: int | None = None  # and the export thread that made it
        concurrency = self.settings.export.concurrency
        self._busy = [False] * concurrency  # by thread: sending a batch it claimed, or its loop ended
        self._deferred = [False] * concurrency  # by thread: its last claim left the work to a busy one
        self._adjusted = False  # the pynetdicom adjustments applied by start, undone by stop

    def start(self) -> None:
        # The adjustments a listener applies, for as long as the exporter runs, whether or not one does
        # (the listener stops first at shutdown): with them a stored file is streamed, not decoded.
        apply_pynetdicom_adjustments()
        self._adjusted = True
        self._beacon.__enter__()
        self._beacon.set(ProcessState.READY, f"{self.settings.export.concurrency} thread(s)")
        for i in range(self.settings.export.concurrency):
            thread = threading.Thread(target=self._loop, args=(i,), name=f"export-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout)
        self.associations.close_all()
        self._beacon.__exit__(None)
        if self._adjusted:
            self._adjusted = False
            undo_pynetdicom_adjustments()

    def _loop(self, index: int) -> None:
        """Export thread ``index``. Every thread wakes when this host's worker rings; only the first polls
        at ``worker.poll_interval_s`` for work the bell does not announce (queued on another host), the
        others :data:`IDLE_POLL_FACTOR` times less often: an idle node's polls were most of its CPU. A
        thread that left new work to a busy one (:meth:`_claim`) looks again after :data:`DEFER_S`."""
        owner = f"{self.worker_id}/export{index}"
        poll = self.settings.worker.poll_interval_s * (1 if index == 0 else IDLE_POLL_FACTOR)

        def work(jobs: list[ClaimedJob], leases: LeaseKeeper) -> None:
            try:
                self.run_jobs(jobs, owner, leases.release)
            finally:
                self._busy[index] = False

        loop = JobLoop(self.runtime, owner, JobKind.EXPORT, claim=lambda: self._claim(owner, index),
                       idle_wait=lambda: DEFER_S if self._deferred[index] else poll,
                       claim_limit=self.settings.export.batch_size)
        try:
            loop.run(self._stop, work)
        finally:
            self._busy[index] = True  # ended (by an error it raised): the threads after it claim without it

    def _claim(self, owner: str, index: int) -> list[ClaimedJob]:
        """Claim a batch as ``owner`` (export thread ``index``), one thread of this exporter at a time, and
        no claim that can only find nothing, each a write transaction (an image's few results took five:
        one that found them, one by each thread the ring woke, one by the thread that sent them, asking
        for more). A thread claims nothing

        * when a thread before it is idle: that one was rung too, and claims (and rings again when its
          claim took a full batch, so the threads after it claim the rest);
        * when a claim that began after it asked left no due job: what was queued before it asked, that
          claim saw;
        * for :data:`DEFER_S` after another thread's claim that left no due job began, while that thread
          sends its batch: it looks again as soon as the batch is sent, and this one looks again after
          that delay (``_deferred``), so a batch held up by a slow peer holds up nothing else for longer.

        (A thread whose own claim came back short waits on the doorbell before claiming again:
        ``JobLoop.claim_limit``.)"""
        asked = time.monotonic()
        with self._claiming:
            self._deferred[index] = False
            if not all(self._busy[:index]):
                return []
            if self._drained_at > asked:
                return []
            began, limit = time.monotonic(), self.settings.export.batch_size
            drained_by = self._drained_by
            if (drained_by is not None and drained_by != index and self._busy[drained_by]
                    and began - self._drained_at < DEFER_S):
                self._deferred[index] = True
                return []
            jobs = self.runtime.queue.claim(owner, [JobKind.EXPORT], limit=limit,
                                            skip_destinations=self.destinations.down())
            if len(jobs) < limit:
                self._drained_at, self._drained_by = began, index
            if jobs:
                self._busy[index] = True
            if len(jobs) == limit:
                # More may be due: the threads after this one, which left the ring's work to it while it
                # was idle, would otherwise wait for their slow poll.
                self.runtime.doorbell(JobKind.EXPORT).ring()
            return jobs

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
        """C-STORE the stored results of ``jobs`` to ``destination`` on one association (STOW-RS: one
        request); per job, None for success (a warning status is stored too) or why it failed."""
        peer = self.settings.peers.get(destination)
        if peer is None:
            return [ScuError(f"destination {destination!r} is not a configured peer", retryable=False)] * len(jobs)
        with self.runtime.read_session() as session:
            files = stored_files(session, (job.sop_instance_uid for job in jobs))
        outcomes: list[ScuError | None] = [None] * len(jobs)
        instances, sending = [], []
        for i, job in enumerate(jobs):
            file = files.get(job.sop_instance_uid)
            if file is None:
                outcomes[i] = ScuError("the result instance is no longer stored", retryable=False)
                continue
            instances.append(StoredInstance(self.runtime.store.path(file.path), file.sop_class_uid,
                                            job.sop_instance_uid, file.transfer_syntax_uid))
            sending.append(i)
        if peer.is_dicomweb:
            datasets = []
            for i, item in zip(list(sending), instances, strict=True):
                try:
                    datasets.append(pydicom.dcmread(item.path))
                except (InvalidDicomError, OSError) as exc:  # its batch mates still go
                    outcomes[i] = unreadable(item, exc)
                    sending.remove(i)
        if not sending:
            return outcomes
        try:
            if peer.is_dicomweb:
                sent = stow_datasets(self.settings, peer, datasets)
            else:
                sent = self.associations.send(destination, peer, instances)
        except ScuError as exc:
            if exc.retryable:
                self.destinations.failed(destination, str(exc))
            sent = [exc] * len(sending)
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
