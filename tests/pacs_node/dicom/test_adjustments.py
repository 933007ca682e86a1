"""pynetdicom is adjusted only while a listener runs, and only for the associations it accepts."""

from __future__ import annotations

import tempfile
from pathlib import Path

import time

from pynetdicom import AE, _config, association, dimse_messages, dul
from pynetdicom.sop_class import ComputedRadiographyImageStorage, Verification
from pynetdicom.transport import AssociationSocket

from pacs_node.config import Settings
from pacs_node.dicom.adjustments import reactor_time
from pacs_node.dicom.server import Listener
from pacs_node.dicom.transport import ServerAssociationSocket
from pacs_node.ops.context import ServerContext
from tests.pacs_node.helpers import make_cr
from tests.support import free_port


def test_adjusted_while_listening_and_only_for_accepted_associations(tmp_path: Path) -> None:
    stock = (_config.STORE_RECV_CHUNKED_DATASET, _config.LOG_REQUEST_IDENTIFIERS,
             dimse_messages.NamedTemporaryFile, tempfile.tempdir, association.time, dul.time,
             _config.LOG_HANDLER_LEVEL)
    assert association.time is time and dul.time is time
    settings = Settings(node={"port": free_port(), "bind": "127.0.0.1", "data_dir": tmp_path / "var"},
                        store={"min_free_bytes": 0}, pipeline={"bundle": "fake"})
    runtime = ServerContext.open(settings)
    listener = Listener(settings, runtime)
    assert (_config.STORE_RECV_CHUNKED_DATASET, _config.LOG_REQUEST_IDENTIFIERS,
            dimse_messages.NamedTemporaryFile, tempfile.tempdir, association.time, dul.time,
            _config.LOG_HANDLER_LEVEL) == stock  # built, not started: nothing changed
    listener.start()
    try:
        assert _config.STORE_RECV_CHUNKED_DATASET is True and _config.LOG_REQUEST_IDENTIFIERS is False
        assert tempfile.tempdir == stock[3]  # pynetdicom's receive files go to the store without it
        assert association.time is reactor_time and dul.time is reactor_time
        assert _config.LOG_HANDLER_LEVEL == "none"  # the node holds pynetdicom's logger at WARNING
        make_cr(tmp_path / "cr.dcm")
        ae = AE(ae_title="PYSCU")
        ae.add_requested_context(ComputedRadiographyImageStorage)
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", settings.node.port, ae_title=settings.node.ae_title)
        assert assoc.is_established
        try:
            assert type(assoc.dul.socket) is AssociationSocket  # an outgoing association: stock pynetdicom
            accepted = [a for server in listener.ae._servers for a in server.active_associations]
            assert [type(a.dul.socket) for a in accepted] == [ServerAssociationSocket]
            assert [(hasattr(a, "pacs_wake"), hasattr(a.dul, "pacs_wake")) for a in accepted] == [(True, True)]
            assert not hasattr(assoc, "pacs_wake")  # stock pynetdicom's requestor: no wake-ups
            assert assoc.send_c_store(tmp_path / "cr.dcm").Status == 0x0000
        finally:
            assoc.release()
    finally:
        listener.stop()
        runtime.close()
    assert (_config.STORE_RECV_CHUNKED_DATASET, _config.LOG_REQUEST_IDENTIFIERS,
            dimse_messages.NamedTemporaryFile, tempfile.tempdir, association.time, dul.time,
            _config.LOG_HANDLER_LEVEL) == stock


def test_a_parked_association_still_wakes_for_its_peer(tmp_path: Path) -> None:
    """Parked (an exporter's association between batches) its threads poll every 30 s here, yet a
    C-ECHO is answered and the peer's abort ends it at once: only pynetdicom's timers look later."""
    from pacs_node.dicom.adjustments import (
        apply_pynetdicom_adjustments,
        park_reactors,
        undo_pynetdicom_adjustments,
    )
    from pacs_node.dicom.transport import NoDelayAE

    port = free_port()
    peer = AE(ae_title="PEER")
    peer.add_supported_context(Verification)
    server = peer.start_server(("127.0.0.1", port), block=False)
    apply_pynetdicom_adjustments()
    try:
        ae = NoDelayAE(ae_title="PARKED")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", port, ae_title="PEER")
        assert assoc.is_established
        park_reactors(assoc, 30.0)
        assert assoc.pacs_wake.parked_s == assoc.dul.pacs_wake.parked_s == 30.0
        start = time.monotonic()
        assert assoc.send_c_echo().Status == 0x0000
        for accepted in server.active_associations:
            accepted.abort()
        while assoc.is_established and time.monotonic() - start < 10:
            time.sleep(0.05)
        assert not assoc.is_established and time.monotonic() - start < 10  # not after a parked 30 s sleep
        park_reactors(assoc, None)
        assert assoc.pacs_wake.parked_s is None and assoc.dul.pacs_wake.parked_s is None
    finally:
        undo_pynetdicom_adjustments()
        server.shutdown()
