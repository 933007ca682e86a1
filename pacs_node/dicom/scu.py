"""This node as an SCU: the AE it calls peers with, C-ECHO, and C-STORE of a batch on one association.

Used by the exporter (:mod:`pacs_node.work.export`) and the ``echo`` and ``send`` commands. Every outgoing
association reads through pynetdicom's own socket: the server's adjustments
(:mod:`pacs_node.dicom.adjustments`, :mod:`pacs_node.dicom.transport`) do not apply to it; only its AE's
(:class:`~pacs_node.dicom.transport.NoDelayAE`: TCP_NODELAY) do.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable

from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import Comprehensive3DSRStorage, ComprehensiveSRStorage, Verification

from pacs_node.config import Peer, Settings
from pacs_node.dicom.tls import TLSConfigError, peer_tls_args
from pacs_node.dicom.transcoding import TranscodeError, accepted_syntaxes, for_peer, proposed_syntaxes
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


def send_datasets(settings: Settings, peer: Peer, datasets: list[Dataset],
                  fallback: Callable[[Dataset], Dataset | None] | None = None) -> list[int | ScuError]:
    """C-STORE ``datasets`` to ``peer`` in one association; one outcome per dataset, in order: the peer's
    status, or an :class:`ScuError` for a dataset that could not be sent (its SOP class refused in
    negotiation: not retryable; the association lost before its turn: retryable).

    A dataset whose SOP class the peer refused is replaced by ``fallback(ds)`` when that gives something (a
    Comprehensive SR for a Comprehensive 3D SR). A dataset stored in a syntax the peer does not accept is
    transcoded (:mod:`pacs_node.dicom.transcoding`). Raises :class:`ScuError` when no association is made."""
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
            raise ScuError(f"{where} accepts none of the SOP classes {refused}", retryable=False)
        if assoc.is_rejected:
            raise ScuError(f"{where} rejected the association (is our AE title {settings.node.ae_title} "
                              "known to it?)")
        raise ScuError(f"no association with {where} (connection refused, aborted or timed out)")
    try:
        accepted = accepted_syntaxes(assoc)
        outcomes: list[int | ScuError] = []
        for ds in datasets:
            if not assoc.is_established:
                outcomes.append(ScuError(f"the association with {where} ended before this was sent"))
                continue
            to_send = ds
            if ds.SOPClassUID not in accepted:
                replacement = fallback(ds) if fallback is not None else None
                if replacement is None or replacement.SOPClassUID not in accepted:
                    outcomes.append(ScuError(f"{peer.ae_title} does not accept SOP class {ds.SOPClassUID}",
                                                retryable=False))
                    continue
                log.info("%s refuses SOP class %s; sending %s instead", peer.ae_title, ds.SOPClassUID,
                         replacement.SOPClassUID)
                to_send = replacement
            try:
                to_send = for_peer(to_send, accepted[to_send.SOPClassUID], peer.transfer_syntax)
            except TranscodeError as exc:
                outcomes.append(ScuError(f"{peer.ae_title}: {exc}", retryable=False))
                continue
            status = assoc.send_c_store(to_send)
            if not status or "Status" not in status:
                outcomes.append(ScuError(f"no C-STORE response from {peer.ae_title} (timeout or abort)"))
                continue
            outcomes.append(int(status.Status))
        return outcomes
    finally:
        if assoc.is_established:
            assoc.release()
