"""Sending result objects to their destinations: one durable ``export`` job per (result, peer).

An exporter thread claims the due jobs (up to ``export.batch_size``) and sends each destination's share on
one association: an image's results (AI findings SR, narrative SR, key object selection, presentation
state) travel together instead of paying an association each, which at GPU throughput would be thousands
of associations a second. Each job still succeeds or fails on its own C-STORE status. The destinations of
a batch are sent to side by side and a few threads claim at once, so a peer that is down or hangs costs
only that peer's jobs a retry with backoff (``JobQueue.fail``).
A receiver that refuses Comprehensive 3D SR in negotiation (many PACSs predate it) gets the
Comprehensive SR copy from :func:`pacs_node.results.comprehensive_fallback` instead.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pydicom
from pydicom import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import Comprehensive3DSRStorage, ComprehensiveSRStorage, Verification
from pynetdicom.status import STATUS_SUCCESS, STATUS_WARNING, code_to_category
from sqlalchemy import select

from pacs_node.ops import metrics
from pacs_node.config import Peer, Settings
from pacs_node.work.destinations import DestinationMonitor
from pacs_node.work.leases import LeaseKeeper
from pacs_node.ops.context import ServerContext
from pacs_node.ops.liveness import Beacon, ProcessState
from pacs_node.dicom.tls import TLSConfigError, peer_tls_args
from pacs_node.dicom.transcoding import TranscodeError, accepted_syntaxes, for_peer, proposed_syntaxes
from storage.queue import ClaimedJob
from storage.schema import Instance, JobKind, utcnow

log = logging.getLogger(__name__)


class ExportError(Exception):
    """One failed send; ``retryable`` False means retrying cannot help (the peer refuses the class)."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


def tls_args(peer: Peer) -> tuple[ssl.SSLContext, str] | None:
    """pynetdicom's ``tls_args`` for ``peer``; unusable TLS settings fail the send with the key named."""
    try:
        return peer_tls_args(peer)
    except TLSConfigError as exc:
        raise ExportError(str(exc)) from None


def make_scu(settings: Settings) -> AE:
    ae = AE(ae_title=settings.node.ae_title)
    timeout = settings.export.timeout_s
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    return ae


def echo(settings: Settings, peer: Peer) -> int:
    """C-ECHO ``peer``; returns the status, raises :class:`ExportError` when no association is made."""
    ae = make_scu(settings)
    ae.add_requested_context(Verification)
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, tls_args=tls_args(peer))
    if not assoc.is_established:
        raise ExportError(f"no association with {peer.ae_title}@{peer.host}:{peer.port} "
                          "(connection refused, rejected, aborted or timed out)")
    try:
        status = assoc.send_c_echo()
        if not status:
            raise ExportError("no C-ECHO response (timeout or abort)")
        return int(status.Status)
    finally:
        assoc.release()


def send_datasets(settings: Settings, peer: Peer, datasets: list[Dataset],
                  fallback: Callable[[Dataset], Dataset | None] | None = None) -> list[int | ExportError]:
    """C-STORE ``datasets`` to ``peer`` in one association; one outcome per dataset, in order: the peer's
    status, or an :class:`ExportError` for a dataset that could not be sent (its SOP class refused in
    negotiation: not retryable; the association lost before its turn: retryable).

    A dataset whose SOP class the peer refused is replaced by ``fallback(ds)`` when that gives something (a
    Comprehensive SR for a Comprehensive 3D SR). A dataset stored in a syntax the peer does not accept is
    transcoded (:mod:`pacs_node.dicom.transcoding`). Raises :class:`ExportError` when no association is made."""
    ae = make_scu(settings)
    wanted: dict[str, list[str]] = {}
    for ds in datasets:
        wanted.setdefault(ds.SOPClassUID, []).append(ds.file_meta.TransferSyntaxUID)
        if ds.SOPClassUID == Comprehensive3DSRStorage and fallback is not None:
            wanted.setdefault(ComprehensiveSRStorage, []).append(ExplicitVRLittleEndian)
    for sop_class, stored in wanted.items():
        for syntaxes in proposed_syntaxes(dict.fromkeys(stored), peer.transfer_syntax):
            ae.add_requested_context(sop_class, syntaxes)
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, tls_args=tls_args(peer))
    where = f"{peer.ae_title}@{peer.host}:{peer.port}"
    if not assoc.is_established:
        if assoc.rejected_contexts and not assoc.accepted_contexts:
            # Negotiation worked but the peer supports none of the classes: retrying cannot help.
            refused = ", ".join(sorted({cx.abstract_syntax.name for cx in assoc.rejected_contexts}))
            raise ExportError(f"{where} accepts none of the SOP classes {refused}", retryable=False)
        if assoc.is_rejected:
            raise ExportError(f"{where} rejected the association (is our AE title {settings.node.ae_title} "
                              "known to it?)")
        raise ExportError(f"no association with {where} (connection refused, aborted or timed out)")
    try:
        accepted = accepted_syntaxes(assoc)
        outcomes: list[int | ExportError] = []
        for ds in datasets:
            if not assoc.is_established:
                outcomes.append(ExportError(f"the association with {where} ended before this was sent"))
                continue
            to_send = ds
            if ds.SOPClassUID not in accepted:
                replacement = fallback(ds) if fallback is not None else None
                if replacement is None or replacement.SOPClassUID not in accepted:
                    outcomes.append(ExportError(f"{peer.ae_title} does not accept SOP class {ds.SOPClassUID}",
                                                retryable=False))
                    continue
                log.info("%s refuses SOP class %s; sending %s instead", peer.ae_title, ds.SOPClassUID,
                         replacement.SOPClassUID)
                to_send = replacement
            try:
                to_send = for_peer(to_send, accepted[to_send.SOPClassUID], peer.transfer_syntax)
            except TranscodeError as exc:
                outcomes.append(ExportError(f"{peer.ae_title}: {exc}", retryable=False))
                continue
            status = assoc.send_c_store(to_send)
            if not status or "Status" not in status:
                outcomes.append(ExportError(f"no C-STORE response from {peer.ae_title} (timeout or abort)"))
                continue
            outcomes.append(int(status.Status))
        return outcomes
    finally:
        if assoc.is_established:
            assoc.release()


def _load_fallback() -> Callable[[Dataset], Dataset | None] | None:
    try:
        from pacs_node.results import comprehensive_fallback
    except ImportError as exc:
        log.warning("no Comprehensive SR fallback available (%s)", exc)
        return None
    return comprehensive_fallback


@dataclass
class Exporter:
    """Threads that claim ``export`` jobs one at a time and send them."""

    settings: Settings
    runtime: ServerContext
    worker_id: str

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._fallback = _load_fallback()
        self.destinations = DestinationMonitor(self.settings, self.runtime)
        self._beacon = Beacon(self.runtime, self.worker_id, "exporter")

    def start(self) -> None:
        self._beacon.__enter__()
        self._beacon.set(ProcessState.READY, f"{self.settings.export.concurrency} thread(s)")
        for i in range(self.settings.export.concurrency):
            thread = threading.Thread(target=self._loop, args=(f"{self.worker_id}/export{i}",),
                                      name=f"export-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout)
        self._beacon.__exit__(None)

    def _loop(self, owner: str) -> None:
        lease = self.settings.worker.lease_seconds
        with LeaseKeeper(self.runtime, owner, lease) as leases, self.runtime.doorbell(JobKind.EXPORT).waiter() as waiter:
            while not self._stop.is_set():
                try:
                    jobs = self.runtime.queue.claim(owner, [JobKind.EXPORT], limit=self.settings.export.batch_size,
                                                    skip_destinations=self.destinations.down())
                except Exception:
                    log.exception("export: cannot claim jobs; retrying")
                    self._stop.wait(5)
                    continue
                if not jobs:
                    waiter.wait(self.settings.worker.poll_interval_s, self._stop)
                    continue
                leases.hold([job.id for job in jobs])
                self.run_jobs(jobs, owner, leases.release)

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
                outcomes = [ExportError(f"{type(exc).__name__}: {exc}")] * len(group)
            for job, outcome in zip(group, outcomes, strict=True):
                settled(job.id)
                self._settle(job, owner, outcome)

        if len(by_destination) == 1:
            send(*next(iter(by_destination.items())))
            return
        # Each destination on its own thread: a peer that hangs until the timeout must not hold up the others.
        with ThreadPoolExecutor(len(by_destination), thread_name_prefix="export-to") as pool:
            for done in [pool.submit(send, destination, group) for destination, group in by_destination.items()]:
                done.result()

    def _settle(self, job: ClaimedJob, owner: str, outcome: ExportError | None) -> None:
        queue = self.runtime.queue
        if outcome is not None:
            metrics.EXPORT_FAILURES.labels(job.destination or "?").inc()
            policy = self.settings.export_retry(job.destination or "")
            state = queue.fail(job.id, owner, str(outcome), retryable=outcome.retryable, policy=policy)
            log.warning("export job %d to %s failed (attempt %d/%d, now %s): %s", job.id, job.destination,
                        job.attempts, job.max_attempts, state.value, outcome)
            return
        if queue.complete(job.id, owner, {"sent_at": utcnow().isoformat()}):
            self._observe_latency(job.id)
            log.info("export job %d: result %s sent to %s", job.id, job.sop_instance_uid, job.destination)

    def _observe_latency(self, job_id: int) -> None:
        record = self.runtime.queue.get(job_id)
        if record is not None and record.finished_at is not None:
            metrics.JOB_SECONDS.labels(JobKind.EXPORT.value).observe(
                (record.finished_at - record.created_at).total_seconds())

    def _send(self, destination: str, jobs: list[ClaimedJob]) -> list[ExportError | None]:
        """C-STORE the stored results of ``jobs`` to ``destination`` on one association; per job, None
        for success (a warning status is stored too) or why it failed."""
        peer = self.settings.peers.get(destination)
        if peer is None:
            return [ExportError(f"destination {destination!r} is not a configured peer", retryable=False)] * len(jobs)
        with self.runtime.read_session() as session:
            rows = session.execute(select(Instance.sop_instance_uid, Instance.path)
                                   .where(Instance.sop_instance_uid.in_({j.sop_instance_uid for j in jobs}))
                                   .where(Instance.path.is_not(None))).all()
        paths = {uid: path for uid, path in rows}
        outcomes: list[ExportError | None] = [None] * len(jobs)
        datasets, sending = [], []
        for i, job in enumerate(jobs):
            path = paths.get(job.sop_instance_uid)
            if not path:
                outcomes[i] = ExportError("the result instance is no longer stored", retryable=False)
                continue
            try:
                datasets.append(pydicom.dcmread(self.runtime.store.path(path)))
            except InvalidDicomError as exc:  # the same bytes fail the same way; its batch mates still go
                outcomes[i] = ExportError(f"the stored result {path} is not readable DICOM: {exc}", retryable=False)
                continue
            except OSError as exc:
                outcomes[i] = ExportError(f"cannot read the stored result {path}: {exc}")
                continue
            sending.append(i)
        if not datasets:
            return outcomes
        try:
            sent = send_datasets(self.settings, peer, datasets, self._fallback)
        except ExportError as exc:
            if exc.retryable:
                self.destinations.failed(destination, str(exc))
            sent = [exc] * len(datasets)
        else:
            self.destinations.answered(destination)
        for i, result in zip(sending, sent, strict=True):
            if isinstance(result, ExportError):
                outcomes[i] = result
            elif code_to_category(result) not in (STATUS_SUCCESS, STATUS_WARNING):
                outcomes[i] = ExportError(f"{peer.ae_title} answered C-STORE with status 0x{result:04X}")
        return outcomes
