"""Storage commitment (PS3.4 Annex J, Push Model), both ways.

As SCP: a modality asks whether the node took custody of what it sent, and the node answers for what it
durably holds. As SCU: after delivering results to a peer with ``storage_commitment = true`` the node asks
it the same question (:func:`request_commitment`) and records the answer, which the peer sends back to
the node's listener as an N-EVENT-REPORT (:meth:`StorageCommitmentSCP.on_n_event_report`), per delivery.

An N-ACTION-RQ (Action Type 1, Request Storage Commitment) names a Transaction UID and the instances.
The node answers the N-ACTION at once (0x0000: request received) and then, on a new association to the
requesting AE (a configured peer with that AE title), sends an N-EVENT-REPORT: Event Type 1 when every
instance is held, 2 with a Failed SOP Sequence otherwise. An instance is held when its row is committed
and its file kept: the listener answers C-STORE success only after fsync, rename and commit, so what the
database says it holds survives a power cut. An instance discarded by policy is not held (0x0112).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from pydicom import Dataset
from pydicom.sequence import Sequence
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.sop_class import StorageCommitmentPushModel, StorageCommitmentPushModelInstance

from pacs_node.config import Peer, Service, Settings, peer_by_ae_title
from pacs_node.dicom.permissions import NOT_AUTHORISED, CallerPolicy
from pacs_node.dicom.scu import ScuError, make_scu, tls_args
from pacs_node.ops.context import ServerContext
from storage.commitment import held_instances
from storage.history import commitment_answered
from storage.schema import utcnow

log = logging.getLogger(__name__)

REQUEST_STORAGE_COMMITMENT = 1  # Action Type ID
EVENT_SUCCESS, EVENT_FAILURES = 1, 2  # Event Type IDs
NO_SUCH_OBJECT_INSTANCE = 0x0112  # Failure Reason
CLASS_INSTANCE_CONFLICT = 0x0119
NO_SUCH_ACTION_TYPE = 0x0123  # N-ACTION status
INVALID_ARGUMENT = 0x0115
PROCESSING_FAILURE = 0x0110


@dataclass(frozen=True)
class CommitmentResult:
    transaction_uid: str
    committed: list[tuple[str, str]]  # (SOP Class UID, SOP Instance UID)
    failed: list[tuple[str, str, int]]  # ... and the failure reason

    def event_report(self) -> tuple[int, Dataset]:
        """The N-EVENT-REPORT's Event Type ID and Event Information."""
        info = Dataset()
        info.TransactionUID = self.transaction_uid
        info.ReferencedSOPSequence = Sequence([_item(c, i) for c, i in self.committed])
        if not self.failed:
            return EVENT_SUCCESS, info
        failed = []
        for sop_class, sop_instance, reason in self.failed:
            item = _item(sop_class, sop_instance)
            item.FailureReason = reason
            failed.append(item)
        info.FailedSOPSequence = Sequence(failed)
        if not self.committed:
            del info.ReferencedSOPSequence
        return EVENT_FAILURES, info


def _item(sop_class: str, sop_instance: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_instance
    return item


def commit(runtime: ServerContext, request: Dataset) -> CommitmentResult:
    """Check every referenced instance of a Storage Commitment request against what the node holds."""
    refs = [(str(item.ReferencedSOPClassUID), str(item.ReferencedSOPInstanceUID))
            for item in request.ReferencedSOPSequence]
    with runtime.read_session() as session:
        held = held_instances(session, [uid for _, uid in refs])
    committed, failed = [], []
    for sop_class, uid in refs:
        if uid not in held:
            failed.append((sop_class, uid, NO_SUCH_OBJECT_INSTANCE))
        elif held[uid] != sop_class:
            failed.append((sop_class, uid, CLASS_INSTANCE_CONFLICT))
        else:
            committed.append((sop_class, uid))
    return CommitmentResult(str(request.TransactionUID), committed, failed)


class StorageCommitmentSCP:
    """The listener's N-ACTION and N-EVENT-REPORT handlers for the Storage Commitment Push Model. Both
    belong to storing: a caller without the ``store`` service gets 0x0124 (not authorised)."""

    def __init__(self, settings: Settings, runtime: ServerContext, policy: CallerPolicy) -> None:
        self.settings, self.rt, self.policy = settings, runtime, policy

    def _authorised(self, event: Event) -> bool:
        requestor = event.assoc.requestor
        return self.policy.allows(str(requestor.ae_title).strip(), requestor.address, Service.STORE)

    def on_n_action(self, event: Event) -> tuple[int, Dataset | None]:
        request = event.request
        caller = str(event.assoc.requestor.ae_title).strip()
        if not self._authorised(event):
            log.warning("storage commitment request from %s refused: not authorised to store", caller)
            return NOT_AUTHORISED, None
        if request.RequestedSOPClassUID != StorageCommitmentPushModel:
            return INVALID_ARGUMENT, None
        if request.ActionTypeID != REQUEST_STORAGE_COMMITMENT:
            return NO_SUCH_ACTION_TYPE, None
        try:
            info = event.action_information
            result = commit(self.rt, info)
        except (AttributeError, ValueError, TypeError) as exc:  # no Transaction UID, no sequence, bad UIDs
            log.warning("storage commitment request from %s refused: %s", caller, exc)
            return INVALID_ARGUMENT, None
        except Exception:
            log.exception("storage commitment request from %s: database error", caller)
            return PROCESSING_FAILURE, None
        found = peer_by_ae_title(self.settings.peers, caller)
        if found is None:
            log.warning("storage commitment request from %s: no peer with that AE title is configured, so "
                        "the result cannot be reported back", caller)
            return PROCESSING_FAILURE, None
        threading.Thread(target=self._report, args=(found[1], result), name="commitment-report",
                         daemon=True).start()
        log.info("storage commitment request from %s: %d held, %d not", caller, len(result.committed),
                 len(result.failed))
        return 0x0000, None

    def on_n_event_report(self, event: Event) -> tuple[int, Dataset | None]:
        """A peer's answer to a commitment request of ours: record it on the deliveries it names."""
        if not self._authorised(event):
            return NOT_AUTHORISED, None
        if event.request.AffectedSOPClassUID != StorageCommitmentPushModel:
            return INVALID_ARGUMENT, None
        try:
            info = event.event_information
            transaction = str(info.TransactionUID)
            committed = [str(i.ReferencedSOPInstanceUID) for i in info.get("ReferencedSOPSequence", [])]
            failed = [str(i.ReferencedSOPInstanceUID) for i in info.get("FailedSOPSequence", [])]
        except (AttributeError, ValueError, TypeError) as exc:
            log.warning("storage commitment report refused: %s", exc)
            return INVALID_ARGUMENT, None
        with self.rt.write_session() as session, session.begin():
            settled = commitment_answered(session, transaction, committed, failed, utcnow())
        log.info("storage commitment report from %s: %d committed, %d failed (%d deliveries settled)",
                 str(event.assoc.requestor.ae_title).strip(), len(committed), len(failed), settled)
        return 0x0000, None

    def _report(self, peer: Peer, result: CommitmentResult) -> None:
        try:
            send_event_report(self.settings, peer, result)
        except ScuError as exc:
            log.error("storage commitment report to %s failed: %s", peer.ae_title, exc)


@contextmanager
def _commitment_association(settings: Settings, peer: Peer, purpose: str) -> Iterator[Association]:
    """An association with ``peer`` for the Storage Commitment Push Model, released afterwards."""
    ae = make_scu(settings)
    ae.add_requested_context(StorageCommitmentPushModel)
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, tls_args=tls_args(peer))
    if not assoc.is_established:
        raise ScuError(f"no association with {peer.ae_title}@{peer.host}:{peer.port} for {purpose}")
    try:
        yield assoc
    finally:
        assoc.release()


def request_commitment(settings: Settings, peer: Peer, instances: list[tuple[str, str]], transaction_uid: str) -> None:
    """N-ACTION ``peer`` to commit ``instances`` ((SOP Class UID, SOP Instance UID) pairs) in the
    transaction its N-EVENT-REPORT will name. Raises :class:`ScuError` when the request fails."""
    info = Dataset()
    info.TransactionUID = transaction_uid
    info.ReferencedSOPSequence = Sequence([_item(sop_class, uid) for sop_class, uid in instances])
    with _commitment_association(settings, peer, "storage commitment") as assoc:
        status, _ = assoc.send_n_action(info, REQUEST_STORAGE_COMMITMENT, StorageCommitmentPushModel,
                                        StorageCommitmentPushModelInstance)
    if not status or int(status.get("Status", -1)) != 0x0000:
        raise ScuError(f"{peer.ae_title} refused the storage commitment request "
                       f"({'no response' if not status else hex(int(status.Status))})")


def send_event_report(settings: Settings, peer: Peer, result: CommitmentResult) -> int:
    """N-EVENT-REPORT the commitment ``result`` to ``peer`` on a new association; returns its status."""
    event_type, info = result.event_report()
    with _commitment_association(settings, peer, "the commitment report") as assoc:
        status, _ = assoc.send_n_event_report(info, event_type, StorageCommitmentPushModel,
                                               StorageCommitmentPushModelInstance)
    if not status or "Status" not in status:
        raise ScuError(f"no N-EVENT-REPORT response from {peer.ae_title}")
    return int(status.Status)
