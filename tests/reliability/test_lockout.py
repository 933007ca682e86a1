"""Peers that try to lock others out of the listener (in this process, over loopback): connections that
trickle their A-ASSOCIATE-RQ a byte at a time, idle connections reopened as soon as they close, a PDU
trickled after the association, a request for another AE title. The timing of the reported attack (a
byte per 20 s, reopened every 8 s, a 10 s request deadline) is scaled down by the config."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.lockout import Attack, associate_rq
from pacs_node.config import Settings
from tests.pacs_node.helpers import echoscu, make_cr, running_listener
from tests.support import dcmtk, free_port

REQUEST_DEADLINE_S = 2.0
PDU_DEADLINE_S = 2.0


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[Settings]:
    settings = Settings(
        node={"port": free_port(), "bind": "127.0.0.1", "data_dir": tmp_path / "var", "max_associations": 4,
              "request_deadline_s": REQUEST_DEADLINE_S, "pdu_deadline_s": PDU_DEADLINE_S},
        store={"min_free_bytes": 0}, pipeline={"bundle": "fake"},
    )
    with running_listener(settings):
        yield settings


def _storescu(port: int, image: Path) -> tuple[float, subprocess.CompletedProcess[str]]:
    started = time.monotonic()
    done = subprocess.run([dcmtk("storescu"), "-aet", "MODALITY", "-aec", "PACSNODE", "-to", "30", "127.0.0.1",
                           str(port), str(image)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "TCP_NODELAY": "1"})
    return time.monotonic() - started, done


@pytest.mark.timeout(120)
def test_tricklers_and_idlers_never_keep_a_sender_out(listener: Settings, tmp_path: Path) -> None:
    image = tmp_path / "image.dcm"
    make_cr(image)
    port = listener.node.port
    assert _storescu(port, image)[1].returncode == 0  # warm: the first association imports and connects
    # 70 hostile sockets against 64 pending places and 4 association slots: the bytes of each trickler
    # come more often than any per-read timeout, yet its request would take 200 deadlines to arrive.
    attack = Attack(port, tricklers=50, trickle_s=REQUEST_DEADLINE_S / 4, idlers=20,
                    reopen_s=REQUEST_DEADLINE_S / 2).start()
    try:
        time.sleep(REQUEST_DEADLINE_S)  # every slot an attacker could take is taken by now
        sends = []
        for i in range(4):
            make_cr(image, seed=i + 1)
            seconds, done = _storescu(port, image)
            assert done.returncode == 0, done.stdout + done.stderr
            sends.append(seconds)
            time.sleep(REQUEST_DEADLINE_S / 2)
    finally:
        attack.stop()
    print(f"storescu under attack ({attack.connections} hostile connections): "
          f"{', '.join(f'{s:.2f}' for s in sends)} s")
    assert max(sends) < REQUEST_DEADLINE_S
    assert attack.connections > 70  # the listener kept closing them, and they kept coming back


def test_a_pdu_trickled_after_associating_is_cut_at_its_deadline(listener: Settings) -> None:
    with socket.create_connection(("127.0.0.1", listener.node.port), timeout=10) as sock:
        sock.sendall(associate_rq())
        assert sock.recv(1) == b"\x02"  # A-ASSOCIATE-AC
        sock.settimeout(0.2)
        try:
            while sock.recv(65536):
                pass
        except TimeoutError:
            pass
        started = time.monotonic()
        closed = False
        # one byte every 0.3 s: each read is quick, the PDU never completes
        for byte in struct.pack(">BBL", 0x04, 0, 1000) + b"\x00" * 100:
            try:
                sock.sendall(bytes([byte]))
                if sock.recv(65536)[:1] in (b"", b"\x07"):  # closed, or an A-ABORT first
                    closed = True
                    break
            except TimeoutError:
                pass  # nothing from the listener yet
            except OSError:
                closed = True
                break
            time.sleep(0.1)
        elapsed = time.monotonic() - started
    assert closed
    assert elapsed < PDU_DEADLINE_S + 4, elapsed


def test_a_request_for_another_called_ae_is_rejected(listener: Settings) -> None:
    dcmtk("echoscu")
    assert echoscu(listener.node.port).returncode == 0
    wrong = subprocess.run([dcmtk("echoscu"), "-aet", "MODALITY", "-aec", "NOTUS", "127.0.0.1",
                            str(listener.node.port)], capture_output=True, text=True, timeout=30)
    assert wrong.returncode != 0
    assert "Called AE Title Not Recognized" in wrong.stdout + wrong.stderr
