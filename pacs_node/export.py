"""Sending result objects to their destinations: one durable ``export`` job per (result, peer).

Each send is its own association, made by one of a few exporter threads, so a peer that is down or
hangs costs that peer's jobs a retry with backoff (``JobQueue.fail``) and never holds up the others.
A receiver that refuses Comprehensive 3D SR in negotiation (many PACSs predate it) gets the
Comprehensive SR copy from :func:`pacs_node.results.comprehensive_fallback` instead.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass

import pydicom
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import Comprehensive3DSRStorage, ComprehensiveSRStorage, Verification
from pynetdicom.status import STATUS_SUCCESS, STATUS_WARNING, code_to_category
from sqlalchemy import select

from pacs_node import metrics
from pacs_node.config import Peer, Settings
from pacs_node.runtime import Runtime
from pacs_node.tls import TLSConfigError, peer_tls_args
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
                  fallback: Callable[[Dataset], Dataset | None] | None = None) -> list[int]:
    """C-STORE ``datasets`` to ``peer`` in one association; return their statuses.

    A dataset whose SOP class the peer refused in negotiation is replaced by ``fallback(ds)`` when that
    gives something (a Comprehensive SR for a Comprehensive 3D SR), else fails non-retryably."""
    ae = make_scu(settings)
    wanted: dict[str, set[str]] = {}
    for ds in datasets:
        syntaxes = wanted.setdefault(ds.SOPClassUID, {ExplicitVRLittleEndian, ImplicitVRLittleEndian})
        syntaxes.add(ds.file_meta.TransferSyntaxUID)
        if ds.SOPClassUID == Comprehensive3DSRStorage and fallback is not None:
            wanted.setdefault(ComprehensiveSRStorage, {ExplicitVRLittleEndian, ImplicitVRLittleEndian})
    for sop_class, syntaxes in wanted.items():
        ae.add_requested_context(sop_class, sorted(syntaxes))
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
        accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
        statuses = []
        for ds in datasets:
            to_send = ds
            if ds.SOPClassUID not in accepted:
                replacement = fallback(ds) if fallback is not None else None
                if replacement is None or replacement.SOPClassUID not in accepted:
                    raise ExportError(f"{peer.ae_title} does not accept SOP class {ds.SOPClassUID}", retryable=False)
                log.info("%s refuses SOP class %s; sending %s instead", peer.ae_title, ds.SOPClassUID,
                         replacement.SOPClassUID)
                to_send = replacement
            status = assoc.send_c_store(to_send)
            if not status or "Status" not in status:
                raise ExportError(f"no C-STORE response from {peer.ae_title} (timeout or abort)")
            statuses.append(int(status.Status))
        return statuses
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
    runtime: Runtime
    worker_id: str

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._fallback = _load_fallback()

    def start(self) -> None:
        for i in range(self.settings.export.concurrency):
            thread = threading.Thread(target=self._loop, args=(f"{self.worker_id}/export{i}",),
                                      name=f"export-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout)

    def _loop(self, owner: str) -> None:
        with self.runtime.doorbell(JobKind.EXPORT).waiter() as waiter:
            while not self._stop.is_set():
                try:
                    jobs = self.runtime.queue.claim(owner, [JobKind.EXPORT], limit=1)
                except Exception:
                    log.exception("export: cannot claim jobs; retrying")
                    self._stop.wait(5)
                    continue
                if not jobs:
                    waiter.wait(self.settings.worker.poll_interval_s, self._stop)
                    continue
                self.run_job(jobs[0], owner)

    def run_job(self, job: ClaimedJob, owner: str) -> None:
        queue = self.runtime.queue
        try:
            self._send(job)
        except ExportError as exc:
            metrics.EXPORT_FAILURES.labels(job.destination or "?").inc()
            state = queue.fail(job.id, owner, str(exc), retryable=exc.retryable)
            log.warning("export job %d to %s failed (attempt %d/%d, now %s): %s", job.id, job.destination,
                        job.attempts, job.max_attempts, state.value, exc)
            return
        except Exception as exc:
            metrics.EXPORT_FAILURES.labels(job.destination or "?").inc()
            log.exception("export job %d to %s failed unexpectedly", job.id, job.destination)
            queue.fail(job.id, owner, f"{type(exc).__name__}: {exc}", retryable=True)
            return
        if queue.complete(job.id, owner, {"sent_at": utcnow().isoformat()}):
            self._observe_latency(job.id)
            log.info("export job %d: result sent to %s", job.id, job.destination)

    def _observe_latency(self, job_id: int) -> None:
        record = self.runtime.queue.get(job_id)
        if record is not None and record.finished_at is not None:
            metrics.JOB_SECONDS.labels(JobKind.EXPORT.value).observe(
                (record.finished_at - record.created_at).total_seconds())

    def _send(self, job: ClaimedJob) -> None:
        peer = self.settings.peers.get(job.destination or "")
        if peer is None:
            raise ExportError(f"destination {job.destination!r} is not a configured peer", retryable=False)
        with self.runtime.read_session() as session:
            row = session.scalars(select(Instance).where(Instance.sop_instance_uid == job.sop_instance_uid)).first()
        if row is None or not row.path:
            raise ExportError("the result instance is no longer stored", retryable=False)
        ds = pydicom.dcmread(self.runtime.store.path(row.path))
        (status,) = send_datasets(self.settings, peer, [ds], self._fallback)
        if code_to_category(status) not in (STATUS_SUCCESS, STATUS_WARNING):  # a warning is stored too
            raise ExportError(f"{peer.ae_title} answered C-STORE with status 0x{status:04X}")
