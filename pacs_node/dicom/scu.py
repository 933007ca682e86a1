"""This node as an SCU: the AE it calls peers with, C-ECHO, and C-STORE of a batch on one association.

Used by the exporter (:mod:`pacs_node.work.export`) and the ``echo`` and ``send`` commands. Every outgoing
association reads through pynetdicom's own socket: the server's adjustments
(:mod:`pacs_node.dicom.adjustments`, :mod:`pacs_node.dicom.transport`) do not apply to it; only its AE's
(:class:`~pacs_node.dicom.transport.NoDelayAE`: TCP_NODELAY) do.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import Comprehensive3DSRStorage, ComprehensiveSRStorage, Verification

from pacs_node.config import Peer, Settings
from pacs_node.dicom.adjustments import park_reactors
from pacs_node.dicom.qr.sending import StoredFile, send_stored_files_as_they_are
from pacs_node.dicom.tls import TLSConfigError, peer_tls_args
from pacs_node.dicom.transcoding import (
    TranscodeError,
    accepted_syntaxes,
    choose_syntax,
    for_peer,
    proposed_syntaxes,
)
from pacs_node.dicom.transport import NoDelayAE

log = logging.getLogger(__name__)


class ScuError(Exception):
    """A request to a peer that failed; ``retryable`` False means retrying cannot help (the peer refuses
    the SOP class)."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


def tls_args(peer: Peer) -> tuple[ssl.SSLContext, str] | None:
    """pynetdicom's ``tls_args`` for ``peer``; unusable TLS settings fail the request with the key named."""
    try:
        return peer_tls_args(peer)
    except TLSConfigError as exc:
        raise ScuError(str(exc)) from None


def make_scu(settings: Settings) -> AE:
    ae = NoDelayAE(ae_title=settings.node.ae_title)
    timeout = settings.export.timeout_s
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    return ae


def echo(settings: Settings, peer: Peer) -> int:
    """C-ECHO ``peer``; returns the status, raises :class:`ScuError` when no association is made."""
    ae = make_scu(settings)
    ae.add_requested_context(Verification)
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, tls_args=tls_args(peer))
    if not assoc.is_established:
        raise ScuError(f"no association with {peer.ae_title}@{peer.host}:{peer.port} "
                          "(connection refused, rejected, aborted or timed out)")
    try:
        status = assoc.send_c_echo()
        if not status:
            raise ScuError("no C-ECHO response (timeout or abort)")
        return int(status.Status)
    finally:
        assoc.release()


#: Presentation contexts of one association: (SOP class, the transfer syntaxes of one context).
Contexts = frozenset[tuple[str, tuple[str, ...]]]

#: The most presentation contexts one association can propose (PS3.8: odd context IDs 1..255).
MAX_CONTEXTS = 128


def store_contexts(stored: Iterable[tuple[str, str]], peer: Peer, with_fallback: bool) -> Contexts:
    """The contexts to propose for C-STOREs of instances stored as ``stored`` (SOP class, transfer
    syntax) pairs: per :func:`~pacs_node.dicom.transcoding.proposed_syntaxes`, and Comprehensive SR in
    Explicit VR Little Endian beside Comprehensive 3D SR when there is a fallback for it."""
    wanted: dict[str, list[str]] = {}
    for sop_class, syntax in stored:
        wanted.setdefault(sop_class, []).append(syntax)
        if sop_class == Comprehensive3DSRStorage and with_fallback:
            wanted.setdefault(ComprehensiveSRStorage, []).append(ExplicitVRLittleEndian)
    return frozenset((sop_class, tuple(syntaxes)) for sop_class, stored_syntaxes in wanted.items()
                     for syntaxes in proposed_syntaxes(dict.fromkeys(stored_syntaxes), peer.transfer_syntax))


def _associate(settings: Settings, peer: Peer, contexts: Contexts) -> Association:
    """An association with ``peer`` proposing ``contexts``; raises :class:`ScuError` when none is made
    (not retryable when the peer accepts none of the SOP classes)."""
    ae = make_scu(settings)
    for sop_class, syntaxes in sorted(contexts):
        ae.add_requested_context(sop_class, list(syntaxes))
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, tls_args=tls_args(peer))
    where = _where(peer)
    if not assoc.is_established:
        if assoc.rejected_contexts and not assoc.accepted_contexts:
            # Negotiation worked but the peer supports none of the classes: retrying cannot help.
            refused = ", ".join(sorted({cx.abstract_syntax.name for cx in assoc.rejected_contexts}))
            raise ScuError(f"{where} accepts none of the SOP classes {refused}", retryable=False)
        if assoc.is_rejected:
            raise ScuError(f"{where} rejected the association (is our AE title {settings.node.ae_title} "
                              "known to it?)")
        raise ScuError(f"no association with {where} (connection refused, aborted or timed out)")
    return assoc


def _where(peer: Peer) -> str:
    return f"{peer.ae_title}@{peer.host}:{peer.port}"


def _store(assoc: Association, peer: Peer, what: Dataset, msg_id: int) -> int | ScuError:
    """One C-STORE of ``what`` (a dataset, or a :class:`~pacs_node.dicom.qr.sending.StoredFile` on an
    association prepared to send it as it is) as message ``msg_id``: the peer's status, or why there is
    none."""
    try:
        status = assoc.send_c_store(what, msg_id=(msg_id - 1) % 0xFFFF + 1)  # Message ID is a US, never 0
    except RuntimeError:  # pynetdicom's "not established": the peer released or aborted since we looked
        return ScuError(f"the association with {_where(peer)} ended before this was sent")
    if not status or "Status" not in status:
        return ScuError(f"no C-STORE response from {peer.ae_title} (timeout or abort)")
    return int(status.Status)


def _store_dataset(assoc: Association, peer: Peer, accepted: dict[str, list[str]], ds: Dataset,
                   fallback: Callable[[Dataset], Dataset | None] | None, msg_id: int) -> int | ScuError:
    """C-STORE a decoded ``ds``: its fallback when the peer refused its SOP class, transcoded when the
    peer accepted none of its syntax (:mod:`pacs_node.dicom.transcoding`)."""
    if ds.SOPClassUID not in accepted:
        replacement = fallback(ds) if fallback is not None else None
        if replacement is None or replacement.SOPClassUID not in accepted:
            return ScuError(f"{peer.ae_title} does not accept SOP class {ds.SOPClassUID}", retryable=False)
        log.info("%s refuses SOP class %s; sending %s instead", peer.ae_title, ds.SOPClassUID,
                 replacement.SOPClassUID)
        ds = replacement
    try:
        ds = for_peer(ds, accepted[ds.SOPClassUID], peer.transfer_syntax)
    except TranscodeError as exc:
        return ScuError(f"{peer.ae_title}: {exc}", retryable=False)
    return _store(assoc, peer, ds, msg_id)


def send_datasets(settings: Settings, peer: Peer, datasets: list[Dataset],
                  fallback: Callable[[Dataset], Dataset | None] | None = None) -> list[int | ScuError]:
    """C-STORE ``datasets`` to ``peer`` in one association; one outcome per dataset, in order: the peer's
    status, or an :class:`ScuError` for a dataset that could not be sent (its SOP class refused in
    negotiation: not retryable; the association lost before its turn: retryable).

    A dataset whose SOP class the peer refused is replaced by ``fallback(ds)`` when that gives something (a
    Comprehensive SR for a Comprehensive 3D SR). A dataset stored in a syntax the peer does not accept is
    transcoded (:mod:`pacs_node.dicom.transcoding`). Raises :class:`ScuError` when no association is made."""
    contexts = store_contexts(((ds.SOPClassUID, ds.file_meta.TransferSyntaxUID) for ds in datasets), peer,
                              fallback is not None)
    assoc = _associate(settings, peer, contexts)
    try:
        accepted = accepted_syntaxes(assoc)
        outcomes: list[int | ScuError] = []
        for msg_id, ds in enumerate(datasets, 1):
            if not assoc.is_established:
                outcomes.append(ScuError(f"the association with {_where(peer)} ended before this was sent"))
                continue
            outcomes.append(_store_dataset(assoc, peer, accepted, ds, fallback, msg_id))
        return outcomes
    finally:
        if assoc.is_established:
            assoc.release()


@dataclass(frozen=True)
class StoredInstance:
    """An instance to C-STORE from its file in the store, with what negotiation needs (recorded when it
    was stored), so the file is not opened before its turn."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str


def unreadable(item: StoredInstance, exc: InvalidDicomError | OSError) -> ScuError:
    """Why ``item``'s file cannot be sent: not DICOM (not retryable: the same bytes fail the same way) or
    not readable now (retryable)."""
    if isinstance(exc, InvalidDicomError):
        return ScuError(f"the stored result {item.path} is not readable DICOM: {exc}", retryable=False)
    return ScuError(f"cannot read the stored result {item.path}: {exc}")


class StoreAssociation:
    """An association with one storage peer that sends stored files, kept open by its owner for the
    batches that follow (:class:`pacs_node.work.export.OpenAssociations`).

    A file stored in a syntax the peer accepted for its SOP class goes as it is on disk: its data set
    streamed by pynetdicom (:func:`~pacs_node.dicom.qr.sending.send_stored_files_as_they_are`, the
    C-MOVE/C-GET sub-operations' way), never decoded. Any other (the peer refused the SOP class and there
    is a fallback, or it accepted none of the stored syntax, or prefers another it accepted) is read
    and sent as :func:`send_datasets` sends, transcoded where needed."""

    def __init__(self, settings: Settings, peer: Peer, contexts: Contexts) -> None:
        self.peer, self.contexts = peer, contexts
        self._assoc = _associate(settings, peer, contexts)
        send_stored_files_as_they_are(self._assoc)
        self._accepted = accepted_syntaxes(self._assoc)
        #: ``time.monotonic()`` when its last batch was over (for closing it after an idle interval)
        self.idle_since = time.monotonic()
        #: C-STORE responses received on it so far
        self.answers = 0
        self._requests = 0

    @property
    def is_established(self) -> bool:
        return bool(self._assoc.is_established)

    def covers(self, contexts: Contexts) -> bool:
        """Whether everything ``contexts`` would propose was proposed on this association (what the peer
        refused of it, it would refuse again)."""
        return contexts <= self.contexts

    def send(self, instances: list[StoredInstance],
             fallback: Callable[[Dataset], Dataset | None] | None = None) -> list[int | ScuError]:
        """C-STORE ``instances``; one outcome per instance, in order, as :func:`send_datasets` gives them.
        A file that is not readable DICOM fails alone (not retryable), one that cannot be read now is
        retried later."""
        outcomes: list[int | ScuError] = []
        for item in instances:
            if not self.is_established:
                outcomes.append(ScuError(f"the association with {_where(self.peer)} ended before this was sent"))
                continue
            try:
                outcome = self._send_one(item, fallback)
            except (InvalidDicomError, OSError) as exc:
                outcome = unreadable(item, exc)
            except (AttributeError, ValueError) as exc:  # its file meta incomplete, or not as recorded
                outcome = ScuError(f"cannot send the stored result {item.path}: {exc}", retryable=False)
            if not isinstance(outcome, ScuError):
                self.answers += 1
            outcomes.append(outcome)
        self.idle_since = time.monotonic()
        return outcomes

    def _send_one(self, item: StoredInstance, fallback: Callable[[Dataset], Dataset | None] | None) -> int | ScuError:
        self._requests += 1
        syntaxes = self._accepted.get(item.sop_class_uid)
        if syntaxes and choose_syntax(item.transfer_syntax_uid, syntaxes, self.peer.transfer_syntax) \
                == UID(item.transfer_syntax_uid):
            stored = StoredFile(item.sop_class_uid, item.sop_instance_uid, item.path)
            return _store(self._assoc, self.peer, stored, self._requests)
        return _store_dataset(self._assoc, self.peer, self._accepted, dcmread(item.path), fallback, self._requests)

    def park(self, seconds: float | None) -> None:
        """Let its threads poll every ``seconds`` while it waits for a batch, or (None) as before, now
        (:func:`~pacs_node.dicom.adjustments.park_reactors`)."""
        park_reactors(self._assoc, seconds)

    def close(self) -> None:
        """Release the association (abort it if the peer does not answer the release)."""
        self.park(None)
        if self._assoc.is_established:
            self._assoc.release()
