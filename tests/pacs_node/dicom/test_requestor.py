"""The node's requested associations (:class:`pacs_node.dicom.transport.NoDelayAE`) against a real DCMTK
``storescp``: a response received while the sender holds the reactor paused does not wake the reactor
(the sender takes it); one received while the reactor may take it does."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from pynetdicom.sop_class import Verification

from bench.common import stop_process, wait_for_port
from pacs_node.config import Settings
from pacs_node.dicom.scu import make_scu
from tests.support import dcmtk, free_port


def test_the_reactor_is_not_woken_for_the_senders_responses(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen([dcmtk("storescp"), "-aet", "RECEIVER", "-od", str(tmp_path), str(port)],
                            env={**os.environ, "TCP_NODELAY": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, timeout=20, proc=proc)
        ae = make_scu(Settings(node={"data_dir": tmp_path / "var"}))
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", port, ae_title="RECEIVER")
        assert assoc.is_established
        try:
            wake = assoc.pacs_wake._event
            assoc._reactor_checkpoint.clear()  # as send_c_* holds it while waiting for its response
            wake.clear()
            assoc.dimse.msg_queue.put((1, object()))
            assert not wake.is_set(), "the reactor was woken for the sender's response"
            assert assoc.dimse.get_msg(block=True)[0] == 1
            assoc._reactor_checkpoint.set()
            assoc.dimse.msg_queue.wake()  # what a message put now does
            assert wake.is_set()
            assert assoc.send_c_echo().Status == 0
        finally:
            assoc.release()
    finally:
        stop_process(proc, timeout=5)
