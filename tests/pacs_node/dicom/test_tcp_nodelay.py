"""Every association the node opens or accepts sends without Nagle's delay (TCP_NODELAY).

Without it, a DIMSE message written as two PDUs (command, data set) waits for the peer's delayed ACK
before its second PDU leaves: tiny instances crawl at tens per second in either direction."""

from __future__ import annotations

import socket
from pathlib import Path

from pynetdicom.association import Association
from pynetdicom.sop_class import Verification

from pacs_node.config import Peer, Settings
from pacs_node.dicom.server import Listener
from pacs_node.ops.context import ServerContext
from pacs_node.dicom.scu import make_scu
from tests.support import free_port


def _nodelay(sock: socket.socket) -> bool:
    return bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))


def _assert_paused_reactor_takes_no_response(assoc: Association) -> None:
    """While a ``send_c_*`` holds the reactor paused, a response waiting in the queue is the sender's:
    the reactor's non-blocking ``get_msg`` gets nothing (the race that fast answers expose)."""
    response = (1, object())
    assoc._reactor_checkpoint.clear()
    try:
        assoc.dimse.msg_queue.put(response)
        assert assoc.dimse.get_msg(block=False) == (None, None)
        assert assoc.dimse.get_msg(block=True) == response
    finally:
        assoc._reactor_checkpoint.set()


def test_outgoing_and_accepted_sockets_have_tcp_nodelay(tmp_path: Path) -> None:
    settings = Settings(
        node={"ae_title": "PACSNODE", "port": free_port(), "bind": "127.0.0.1", "data_dir": tmp_path / "var"},
        database={"url": f"sqlite:///{tmp_path / 'node.sqlite3'}"},
        store={"min_free_bytes": 0}, pipeline={"bundle": "fake"},
    )
    runtime = ServerContext.open(settings)
    listener = Listener(settings, runtime)
    listener.start()
    try:
        peer = Peer(ae_title="PACSNODE", host="127.0.0.1", port=settings.node.port)
        # the exporter's, `pacs-node send`'s and `echo`'s AE, and the listener's own (C-MOVE sub-operations)
        checked: list[Association] = []  # accepted before: released, maybe still closing (socket gone)
        for ae in (make_scu(settings), listener.ae):
            ae.add_requested_context(Verification)
            assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title)
            assert assoc.is_established
            try:
                assert _nodelay(assoc.dul.socket.socket), "outgoing association waits on Nagle"
                accepted = [a for a in listener.ae.active_associations if a.is_acceptor and a not in checked]
                assert accepted and all(_nodelay(a.dul.socket.socket) for a in accepted), \
                    "accepted association waits on Nagle"
                checked += accepted
                assert assoc.send_c_echo().Status == 0
                _assert_paused_reactor_takes_no_response(assoc)
            finally:
                assoc.release()
    finally:
        listener.stop()
        runtime.close()
