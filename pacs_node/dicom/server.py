"""The DICOM listener: a pynetdicom AE answering C-ECHO, C-STORE and Query/Retrieve (``pacs_node.dicom.qr``),
with the calling-AE allow-list enforced at association time.

Each association runs in its own thread (pynetdicom's threaded server); the C-STORE handler blocks that
thread until the instance is durable (see :mod:`pacs_node.work.ingest`), which is the back-pressure a
sender should feel when the disk or database is slow.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

from pynetdicom import evt
from pynetdicom.events import Event
from pynetdicom.sop_class import StorageCommitmentPushModel

from pacs_node.config import Service, Settings
from pacs_node.dicom.adjustments import apply_pynetdicom_adjustments, undo_pynetdicom_adjustments
from pacs_node.dicom.commitment import StorageCommitmentSCP
from pacs_node.dicom.permissions import NOT_AUTHORISED, CallerPolicy
from pacs_node.dicom.presentation_contexts import add_scp_contexts, storage_sop_classes
from pacs_node.dicom.qr import QueryRetrieveService
from pacs_node.dicom.spooling import ReceiveSpool
from pacs_node.dicom.tls import server_context
from pacs_node.dicom.transport import GuardedAssociationServer, NoDelayAE, start_guarded_server
from pacs_node.ops import metrics
from pacs_node.ops.context import ServerContext
from pacs_node.work.ingest import OUT_OF_RESOURCES, Caller, Ingestor

log = logging.getLogger(__name__)

_ASSOCIATE_RQ_TIMEOUT_S = 10.0
_REJECT_PERMANENT = 0x01
_SOURCE_SERVICE_USER = 0x01
_DIAG_CALLING_AE_NOT_RECOGNISED = 0x03


class Listener:
    """Owns the AE and its server thread; ``start`` returns once the port is bound."""

    def __init__(self, settings: Settings, runtime: ServerContext) -> None:
        self.settings = settings
        self.rt = runtime
        self.ingestor = Ingestor(settings, runtime)
        self.policy = CallerPolicy(settings)
        self.ae = NoDelayAE(ae_title=settings.node.ae_title)  # C-MOVE sub-associations are requested from it
        self.ae.maximum_pdu_size = settings.node.max_pdu
        self.ae.maximum_associations = settings.node.max_associations
        # pynetdicom's acceptor waits this long for an A-ASSOCIATE-RQ even after the peer has hung up, so
        # every connection that never sends a valid one (a port scan, garbage) holds an association slot
        # for it: 30 s by default. A real peer sends its request within milliseconds of connecting.
        self.ae.acse_timeout = _ASSOCIATE_RQ_TIMEOUT_S
        # A-ASSOCIATE-RJ (permanent, service user, "called AE title not recognised") for a request
        # addressed to another AE: a misconfigured modality learns at once, instead of storing to the
        # wrong node.
        self.ae.require_called_aet = settings.node.check_called_ae
        storage_classes = storage_sop_classes(settings.policy.any_storage_class)
        add_scp_contexts(self.ae, storage_classes)
        query_retrieve = QueryRetrieveService.from_runtime(settings, runtime, self.policy)
        query_retrieve.add_contexts(self.ae, storage_classes)
        self.ae.add_supported_context(StorageCommitmentPushModel)
        self._commitment = StorageCommitmentSCP(settings, runtime, self.policy)
        self._qr_handlers = query_retrieve.handlers()
        # pynetdicom writes arriving datasets into the store's temp directory, so filing is a rename.
        self.spool = ReceiveSpool(runtime.incoming_dir)
        self._server: GuardedAssociationServer | None = None
        #: The C-STORE statuses answered on each live association (by its ``id``), for the line logged
        #: when it ends.
        self._answered: dict[int, Counter[int]] = {}

    # -- event handlers ----------------------------------------------------------------------------

    def _on_requested(self, event: Event) -> None:
        requestor = event.assoc.requestor
        ae_title = str(requestor.primitive.calling_ae_title).strip()
        host = requestor.address
        if self.policy.grant(ae_title, host) is None:
            log.warning("association from %s at %s rejected: calling AE not allowed", ae_title, host)
            metrics.ASSOCIATIONS_REJECTED.labels("calling_ae").inc()
            event.assoc.acse.send_reject(_REJECT_PERMANENT, _SOURCE_SERVICE_USER, _DIAG_CALLING_AE_NOT_RECOGNISED)
            # As pynetdicom's own rejections do: stop the DUL only after it has sent the A-ASSOCIATE-RJ,
            # so the caller reads a rejection rather than a dropped connection.
            event.assoc.kill()

    def _on_echo(self, event: Event) -> int:
        return 0x0000

    def _on_store(self, event: Event) -> int:
        requestor = event.assoc.requestor
        caller = Caller(ae_title=str(requestor.ae_title).strip(), host=requestor.address)
        path = Path(event.dataset_path)
        if not self.spool.claim(path):  # its association ended (aborted) while it waited for this handler
            return OUT_OF_RESOURCES
        if not self.policy.allows(caller.ae_title, caller.host, Service.STORE):
            log.warning("C-STORE from %s at %s refused (0x%04X): the caller may not store", caller.ae_title,
                        caller.host, NOT_AUTHORISED)
            metrics.INSTANCES_RECEIVED.labels("refused").inc()
            return NOT_AUTHORISED
        failure = self.spool.failure(path)
        if failure is not None:  # the disk filled (or failed) while the dataset arrived
            log.error("could not receive instance from %s (0x%04X): %s", caller.ae_title, OUT_OF_RESOURCES, failure)
            metrics.INSTANCES_RECEIVED.labels("failed").inc()
            path.unlink(missing_ok=True)
            return OUT_OF_RESOURCES
        status = self.ingestor.ingest(path, str(event.request.AffectedSOPInstanceUID), caller)
        answered = self._answered.get(id(event.assoc))
        if answered is None:
            answered = self._answered[id(event.assoc)] = Counter()
        answered[status] += 1
        return status

    def _on_closed(self, event: Event) -> None:
        """One INFO line per association that stored: how many C-STOREs it was answered, by status."""
        answered = self._answered.pop(id(event.assoc), None)
        if answered:
            requestor = event.assoc.requestor
            log.info("association from %s at %s ended: C-STORE answered %s", str(requestor.ae_title).strip(),
                     requestor.address, ", ".join(f"0x{status:04X} x {n}" for status, n in sorted(answered.items())))

    # -- life cycle -------------------------------------------------------------------------------

    def start(self, *, reuse_port: bool = False) -> None:
        """Bind and serve; ``reuse_port`` when other listener processes share the port."""
        handlers = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_CONN_CLOSE, self._on_closed),
            (evt.EVT_N_ACTION, self._commitment.on_n_action),
            (evt.EVT_N_EVENT_REPORT, self._commitment.on_n_event_report),
            *self._qr_handlers,
        ]
        bind = (self.settings.node.bind, self.settings.node.port)
        tls = self.settings.node.tls
        ssl_context = server_context(tls) if tls is not None else None
        apply_pynetdicom_adjustments()
        try:
            self._server = start_guarded_server(
                self.ae, bind, ssl_context=ssl_context, evt_handlers=handlers,
                max_pdu=self.settings.node.max_pdu, spool=self.spool, reuse_port=reuse_port,
                pdu_deadline_s=self.settings.node.pdu_deadline_s,
                request_deadline_s=self.settings.node.request_deadline_s,
                max_pending=self.settings.node.max_pending_connections,
                dropped=lambda reason: metrics.ASSOCIATIONS_REJECTED.labels(reason).inc(),
            )
        except BaseException:
            undo_pynetdicom_adjustments()
            raise
        log.info("listening as %s on %s:%d%s", self.settings.node.ae_title, *bind,
                 " (DICOM TLS, client certificates required)" if tls and tls.ca_file
                 else " (DICOM TLS)" if tls else "")

    @property
    def serving(self) -> bool:
        """Whether the association server is running (``/healthz``)."""
        return self._server is not None

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
            undo_pynetdicom_adjustments()
