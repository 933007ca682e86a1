"""The Query/Retrieve SCP: C-FIND, C-MOVE and C-GET (Patient Root and Study Root) over every stored
instance, received or produced by this node.

``QueryRetrieveService`` only provides pynetdicom event handlers and presentation contexts; the
listener owns the one AE and binds them next to its C-ECHO/C-STORE handlers, so Q/R shares the
listener's port, calling-AE allow-list and association limits.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from typing import Any

from pydicom import Dataset, dcmread
from pydicom.uid import UID
from pynetdicom import AE, build_context, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from pacs_node.config import Peer, Service, Settings, peer_by_ae_title
from pacs_node.dicom.permissions import NOT_AUTHORISED, CallerPolicy, Grant
from pacs_node.dicom.presentation_contexts import STORAGE_SOP_CLASSES, TRANSFER_SYNTAXES
from pacs_node.dicom.transcoding import accepted_syntaxes, for_peer, proposed_syntaxes
from pacs_node.dicom.qr.find import IdentifierEncoder, entity_rows, matching_keys, response_identifier
from pacs_node.dicom.qr.matching import Level, QueryError, identifier_conditions, query_level, selective
from pacs_node.dicom.qr.sending import StoredFile, send_stored_files_as_they_are, skip_unlogged_narration
from pacs_node.ops.context import ServerContext
from storage import query
from storage.query import StoredInstance
from storage.store import InstanceStore

log = logging.getLogger(__name__)

_PATIENT_ROOT = frozenset({PatientRootQueryRetrieveInformationModelFind,
                           PatientRootQueryRetrieveInformationModelMove,
                           PatientRootQueryRetrieveInformationModelGet})
_QR_CLASSES = (*_PATIENT_ROOT, StudyRootQueryRetrieveInformationModelFind,
               StudyRootQueryRetrieveInformationModelMove, StudyRootQueryRetrieveInformationModelGet)

# Statuses (PS3.4 C.4.1.1.4, C.4.2.1.5, C.4.3.1.4).
PENDING = 0xFF00
CANCEL = 0xFE00
IDENTIFIER_DOES_NOT_MATCH = 0xA900
UNABLE_TO_PROCESS = 0xC001
OUT_OF_RESOURCES_MATCHES = 0xA701  # C-MOVE/C-GET: more matches than one response can count

_MAX_SUBOPERATIONS = 65535  # the counters in a C-MOVE/C-GET response are US
_MAX_CONTEXTS = 128


def _levels(sop_class_uid: str) -> tuple[Level, ...]:
    if sop_class_uid in _PATIENT_ROOT:
        return tuple(Level)
    return (Level.STUDY, Level.SERIES, Level.IMAGE)


class QueryRetrieveService:
    """C-FIND/C-MOVE/C-GET handlers over ``storage.schema.Instance``.

    ``peers`` are the configured peers: the only C-MOVE destinations. A move to any other AE title fails with 0xA801 (Move Destination unknown), so a caller cannot make the node
    send images to an address of its choosing.

    ``policy`` says which caller may find, move (and to which peers) and get; a refused C-FIND or C-GET
    is answered 0x0124 (Refused: Not authorized), a refused C-MOVE 0xA801 (pynetdicom answers a C-MOVE
    with a status of its own only before it has associated with the destination, and a destination the
    caller may not name is, to it, unknown). ``None`` lets every caller do everything.
    """

    def __init__(self, sessions: sessionmaker[Session], store: InstanceStore,
                 peers: Mapping[str, Peer], *, ae_title: str | None = None,
                 max_matches: int = 10000, policy: CallerPolicy | None = None) -> None:
        self.sessions = sessions
        self.store = store
        self.peers = dict(peers)
        self.ae_title = ae_title
        self.max_matches = max_matches
        self.policy = policy

    @classmethod
    def from_runtime(cls, settings: Settings, runtime: ServerContext,
                     policy: CallerPolicy | None = None) -> QueryRetrieveService:
        """The service as the listener builds it: configured peers, the runtime's store and sessions."""
        return cls(runtime.sessions, runtime.store, settings.peers, ae_title=settings.node.ae_title,
                   policy=policy)

    def _grant(self, event: Event) -> Grant | None:
        if self.policy is None:
            return Grant(frozenset(Service))
        requestor = event.assoc.requestor
        return self.policy.grant(str(requestor.ae_title), requestor.address)

    def _refused(self, event: Event, service: Service) -> bool:
        """Whether the caller may not use ``service`` (logged, without the identifier)."""
        grant = self._grant(event)
        if grant is not None and service in grant.services:
            return False
        log.warning("C-%s from %s refused: the caller may not %s", service.value.upper(), _caller(event),
                    service.value)
        return True

    # -- wiring -----------------------------------------------------------------------------------

    def handlers(self) -> list[tuple[evt.EventType, Any]]:
        return [(evt.EVT_C_FIND, self.on_find), (evt.EVT_C_GET, self.on_get), (evt.EVT_C_MOVE, self.on_move)]

    @staticmethod
    def add_contexts(ae: AE, storage_classes: tuple[UID, ...] = STORAGE_SOP_CLASSES) -> None:
        """Q/R information models, and the storage classes with the SCP role a C-GET requestor asks
        for (it receives our C-STOREs on its own association)."""
        for sop_class in _QR_CLASSES:
            ae.add_supported_context(sop_class)
        for sop_class in storage_classes:
            ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES), scu_role=False, scp_role=True)

    # -- C-FIND -----------------------------------------------------------------------------------

    def on_find(self, event: Event) -> Iterator[tuple[int, Dataset | None]]:
        if self._refused(event, Service.FIND):
            yield NOT_AUTHORISED, None
            return
        sop_class = str(event.request.AffectedSOPClassUID)
        try:
            identifier = event.identifier
            level = query_level(identifier, _levels(sop_class))
        except QueryError as exc:
            log.warning("C-FIND from %s refused: %s", _caller(event), exc)
            yield IDENTIFIER_DOES_NOT_MATCH, None
            return
        except Exception as exc:  # an undecodable identifier
            log.warning("C-FIND from %s: cannot decode the identifier (%s)", _caller(event), exc)
            yield UNABLE_TO_PROCESS, None
            return
        try:
            with self.sessions() as session:
                keys = matching_keys(session, identifier, level, self.max_matches)
                rows = list(entity_rows(session, level, keys))
        except QueryError as exc:  # e.g. a malformed StudyDate: a failure status, not an empty answer
            log.warning("C-FIND from %s refused: %s", _caller(event), exc)
            yield IDENTIFIER_DOES_NOT_MATCH, None
            return
        except SQLAlchemyError:
            log.exception("C-FIND from %s: database error", _caller(event))
            yield UNABLE_TO_PROCESS, None
            return
        if len(keys) >= self.max_matches:
            log.warning("C-FIND from %s at %s level: results capped at %d", _caller(event), level.value,
                        self.max_matches)
        log.info("C-FIND from %s at %s level: %d match(es)", _caller(event), level.value, len(rows))
        skip_unlogged_narration(event.assoc)
        syntax = UID(event.context.transfer_syntax)
        encoder = IdentifierEncoder.for_request(identifier, level, self.ae_title, implicit_vr=syntax.is_implicit_VR,
                                                little_endian=syntax.is_little_endian)
        for row in rows:
            if event.is_cancelled:
                yield CANCEL, None
                return
            yield PENDING, (encoder.identifier(row) if encoder is not None
                            else response_identifier(identifier, level, row, self.ae_title))

    # -- C-MOVE / C-GET ---------------------------------------------------------------------------

    def _matches(self, event: Event) -> list[StoredInstance]:
        identifier = event.identifier
        level = query_level(identifier, _levels(str(event.request.AffectedSOPClassUID)))
        with self.sessions() as session:
            conditions = identifier_conditions(identifier, level, query.dialect_name(session))
            if not conditions or not selective(identifier, level):
                # Retrieving everything is never what a PACS means; require at least one key that is
                # more than wildcards (PatientID=?* matches every patient).
                raise QueryError("C-MOVE/C-GET identifier has no selective matching key")
            return query.instances_to_retrieve(session, conditions)

    def _datasets(self, event: Event, matches: list[StoredInstance],
                  accepted: Mapping[str, list[str]]) -> Iterator[tuple[int, Dataset | None]]:
        """Each match as the stored file where the receiver accepted its syntax for its class (sent
        as it is, :mod:`pacs_node.dicom.qr.sending`), else read from the store and put in a syntax
        the receiver accepted (``accepted``: SOP class -> syntaxes of the store association)."""
        for match in matches:
            if event.is_cancelled:
                yield CANCEL, None
                return
            syntaxes = accepted.get(match.sop_class_uid, [])
            try:
                path = self.store.path(match.path)
                dataset: Dataset = (StoredFile(match.sop_class_uid, match.sop_instance_uid, path)
                                    if match.transfer_syntax_uid in syntaxes else for_peer(dcmread(path), syntaxes))
            except Exception as exc:  # missing, unreadable, untranscodable: a failed sub-operation, not an abort
                log.error("cannot send stored instance %s (%s): %s", match.sop_instance_uid, match.path, exc)
                dataset = Dataset()
                dataset.SOPInstanceUID = match.sop_instance_uid  # listed in Failed SOP Instance UID List
            yield PENDING, dataset

    def on_get(self, event: Event) -> Iterator[Any]:
        if self._refused(event, Service.GET):
            yield 1
            yield NOT_AUTHORISED, None
            return
        try:
            matches = self._matches(event)
        except QueryError as exc:
            log.warning("C-GET from %s refused: %s", _caller(event), exc)
            yield 1
            yield IDENTIFIER_DOES_NOT_MATCH, None
            return
        except SQLAlchemyError:
            log.exception("C-GET from %s: database error", _caller(event))
            yield 1
            yield UNABLE_TO_PROCESS, None
            return
        if len(matches) > _MAX_SUBOPERATIONS:
            yield 1
            yield OUT_OF_RESOURCES_MATCHES, None
            return
        log.info("C-GET from %s: %d instance(s)", _caller(event), len(matches))
        send_stored_files_as_they_are(event.assoc)
        skip_unlogged_narration(event.assoc)
        yield len(matches)
        yield from self._datasets(event, matches, _get_storage_syntaxes(event.assoc))

    def destination(self, ae_title: str) -> tuple[str, str, int] | None:
        """Name, host and port of the configured peer with this AE title (see :func:`peer_by_ae_title`)."""
        found = peer_by_ae_title(self.peers, ae_title)
        return None if found is None else (found[0], found[1].host, found[1].port)

    def on_move(self, event: Event) -> Iterator[Any]:
        raw = event.move_destination
        ae_title = raw.decode("ascii", "replace") if isinstance(raw, bytes) else str(raw)
        if self._refused(event, Service.MOVE):
            yield None, None  # 0xA801, see the class docstring
            return
        found = self.destination(ae_title)
        if found is None:
            log.warning("C-MOVE from %s to unknown destination %r", _caller(event), ae_title.strip())
            yield None, None  # pynetdicom answers 0xA801 Move Destination unknown
            return
        grant = self._grant(event)
        if grant is None or not grant.may_move_to(found[0]):
            log.warning("C-MOVE from %s to %r refused: the caller may not name that destination",
                        _caller(event), ae_title.strip())
            yield None, None
            return
        destination = found[1:]
        try:
            matches = self._matches(event)
            error = None
        except QueryError as exc:
            matches, error = [], (IDENTIFIER_DOES_NOT_MATCH, str(exc))
        except SQLAlchemyError as exc:
            matches, error = [], (UNABLE_TO_PROCESS, str(exc))
        # pynetdicom associates with the destination before it takes a failure status, and an
        # association needs one context: Verification stands in when there is nothing to send.
        contexts = _storage_contexts(matches) or [build_context(Verification)]
        negotiated: dict[str, list[str]] = {}

        def store_association_accepted(accepted: Event) -> None:  # what the destination took, to transcode to
            negotiated.update(accepted_syntaxes(accepted.assoc))
            send_stored_files_as_they_are(accepted.assoc)
            skip_unlogged_narration(accepted.assoc)

        yield destination[0], destination[1], {"contexts": contexts,
                                               "evt_handlers": [(evt.EVT_ACCEPTED, store_association_accepted)]}
        if error is not None:
            log.warning("C-MOVE from %s refused: %s", _caller(event), error[1])
            yield 1
            yield error[0], None
            return
        if len(matches) > _MAX_SUBOPERATIONS:
            yield 1
            yield OUT_OF_RESOURCES_MATCHES, None
            return
        log.info("C-MOVE from %s to %s: %d instance(s)", _caller(event), ae_title.strip(), len(matches))
        skip_unlogged_narration(event.assoc)
        yield len(matches)
        yield from self._datasets(event, matches, negotiated)


def _storage_contexts(matches: list[StoredInstance]) -> list[Any]:
    """Per SOP class, one requested context per stored transfer syntax plus one uncompressed: an
    instance goes as stored where the destination accepts that, transcoded where it does not."""
    stored: dict[str, dict[str, None]] = {}
    for m in matches:
        stored.setdefault(m.sop_class_uid, {})[m.transfer_syntax_uid] = None
    contexts = [build_context(UID(sop), syntaxes)
                for sop in sorted(stored) for syntaxes in proposed_syntaxes(sorted(stored[sop]))]
    if len(contexts) > _MAX_CONTEXTS:
        log.warning("C-MOVE needs %d presentation contexts; only the first %d are proposed",
                    len(contexts), _MAX_CONTEXTS)
    return contexts[:_MAX_CONTEXTS]



def _get_storage_syntaxes(assoc: Any) -> dict[str, list[str]]:
    """SOP class -> syntaxes of the C-GET association's contexts in which this node may send C-STOREs
    (the requestor took the SCP role for the class): only those can carry a sub-operation, so a class
    without the role is a failed sub-operation that says so, not a stored file pynetdicom cannot send."""
    syntaxes: dict[str, list[str]] = {}
    for cx in assoc.accepted_contexts:
        if cx.as_scu:
            syntaxes.setdefault(str(cx.abstract_syntax), []).append(str(cx.transfer_syntax[0]))
    return syntaxes


def _caller(event: Event) -> str:
    try:
        return str(event.assoc.requestor.ae_title).strip()
    except AttributeError:
        return "?"
