"""C-STOREs that never finish: aborted (A-ABORT), dropped (the socket closed) or stalled mid-dataset.
Each leaves its partly received file in the store's temp area unless the node removes it, and 26 of them
filled a small store. The byte streams are a real pynetdicom sender's, recorded once through a proxy and
replayed cut short, so every transfer stops at the same point of the dataset."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom.sop_class import ComputedRadiographyImageStorage

from pacs_node.config import Settings
from pacs_node.ops.context import ServerContext
from storage.doctor import Doctor
from tests.pacs_node.helpers import make_cr, requestor, running_listener
from tests.support import free_port

PDU_DEADLINE_S = 1.0
_ABORT = bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 0, 0])


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[Settings, ServerContext]]:
    settings = Settings(
        node={"port": free_port(), "bind": "127.0.0.1", "data_dir": tmp_path / "var", "max_pdu": 16384,
              "max_associations": 32, "pdu_deadline_s": PDU_DEADLINE_S},
        store={"min_free_bytes": 0}, pipeline={"bundle": "fake"},
    )
    with running_listener(settings) as runtime:
        yield settings, runtime


def _pdus(stream: bytes) -> list[bytes]:
    out, at = [], 0
    while at + 6 <= len(stream):
        (length,) = struct.unpack_from(">L", stream, at + 2)
        out.append(stream[at:at + 6 + length])
        at += 6 + length
    return out


def _record_store(port: int, image: Path) -> list[bytes]:
    """The PDUs a pynetdicom sender sends to store ``image`` (through a recording proxy to ``port``)."""
    proxy = socket.create_server(("127.0.0.1", 0))
    sent = bytearray()

    def pump(src: socket.socket, dst: socket.socket, record: bool) -> None:
        try:
            while data := src.recv(65536):
                if record:
                    sent.extend(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def serve() -> None:
        client, _ = proxy.accept()
        upstream = socket.create_connection(("127.0.0.1", port))
        back = threading.Thread(target=pump, args=(upstream, client, False), daemon=True)
        back.start()
        pump(client, upstream, True)
        back.join(5)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    ae = requestor("MODALITY")
    ae.maximum_pdu_size = 16384
    ae.add_requested_context(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", proxy.getsockname()[1], ae_title="PACSNODE", max_pdu=16384)
    assert assoc.is_established
    assert assoc.send_c_store(image).Status == 0
    assoc.release()
    thread.join(10)
    proxy.close()
    return _pdus(bytes(sent))


def _cut_short(port: int, pdus: list[bytes], how: str) -> None:
    """Replay the association up to the middle of the dataset, then abort, drop or stall."""
    data = [p for p in pdus if p[0] == 0x04]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(pdus[0])
        assert sock.recv(1) == b"\x02", "not accepted"
        half = len(data) // 2
        sock.sendall(b"".join(data[:half]))
        if how == "abort":
            sock.sendall(_ABORT)
            time.sleep(0.1)
        elif how == "stall":  # half a PDU, then silence: cut at the PDU deadline
            sock.sendall(data[half][: len(data[half]) // 2])
            sock.settimeout(PDU_DEADLINE_S + 5)
            try:
                while sock.recv(65536):
                    pass
            except OSError:
                pass
        # "drop": just close


def test_aborted_dropped_and_stalled_receives_leave_no_temp_file(node: tuple[Settings, ServerContext],
                                                                  tmp_path: Path) -> None:
    settings, runtime = node
    image = tmp_path / "image.dcm"
    make_cr(image, rows=256, cols=256)
    pdus = _record_store(settings.node.port, image)
    assert len([p for p in pdus if p[0] == 0x04]) >= 8  # the dataset spans many PDUs
    kinds = ["abort"] * 10 + ["drop"] * 10 + ["stall"] * 6
    threads = [threading.Thread(target=_cut_short, args=(settings.node.port, pdus, how)) for how in kinds]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    incoming = runtime.incoming_dir
    deadline = time.monotonic() + 10
    while list(incoming.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.1)  # the listener tears the last associations down
    assert list(incoming.iterdir()) == []
    report = Doctor(runtime.sessions, runtime.store, runtime.queue, grace_s=3600).check()
    assert report.temp_leftovers == [] and report.temp_in_flight == []


def test_doctor_counts_every_temp_file_it_finds(node: tuple[Settings, ServerContext]) -> None:
    _, runtime = node
    (runtime.incoming_dir / "tmpabcdef.dcm").write_bytes(b"partial")
    report = Doctor(runtime.sessions, runtime.store, runtime.queue, grace_s=3600).check()
    assert [Path(p).name for p in report.temp_in_flight] == ["tmpabcdef.dcm"]

