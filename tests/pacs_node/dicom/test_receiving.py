"""Data set fragments spooled straight from the socket (pacs_node.dicom.receiving): what arrives is stored
byte for byte whichever path a PDU takes, the PDU limit and deadline still see every byte, and what the
fast path cannot vouch for goes pynetdicom's way."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_ECHO
from pynetdicom.sop_class import ComputedRadiographyImageStorage, Verification
from sqlalchemy import select

from pacs_node.config import Settings
from pacs_node.dicom.adjustments import ACCEPTED_POLL_S
from pacs_node.dicom.receiving import SpoolingDUL
from pacs_node.dicom.transport import PduTooLarge, _LimitedSocket
from pacs_node.ops.context import ServerContext
from pacs_node.work.ingest import Ingestor
from storage.schema import Instance
from tests.pacs_node.helpers import make_cr, requestor, running_listener, storescu
from tests.support import free_port


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[Settings, ServerContext]]:
    settings = Settings(
        node={"ae_title": "PACSNODE", "port": free_port(), "bind": "127.0.0.1", "data_dir": tmp_path / "var"},
        allowed_callers=[{"ae_title": "MODALITY"}],
        store={"min_free_bytes": 0}, pipeline={"bundle": "fake"},
    )
    with running_listener(settings) as runtime:
        yield settings, runtime


def _dataset_bytes(path: Path) -> bytes:
    """A DICOM file's bytes after its File Meta Information (what a C-STORE carries)."""
    meta = pydicom.filereader.read_file_meta_info(path)
    return path.read_bytes()[128 + 4 + 12 + meta.FileMetaInformationGroupLength:]


def _stored(runtime: ServerContext, sop_instance_uid: str) -> Path:
    with runtime.read_session() as session:
        relpath = session.scalar(select(Instance.path).where(Instance.sop_instance_uid == sop_instance_uid))
    assert relpath, "not recorded"
    return runtime.store.path(relpath)


@pytest.mark.parametrize("send_pdu", [4096, 16384, 131072])
def test_dcmtk_fragments_are_spooled_directly_and_stored_byte_for_byte(
        node: tuple[Settings, ServerContext], tmp_path: Path, send_pdu: int) -> None:
    settings, runtime = node
    image = tmp_path / "image.dcm"
    ds = make_cr(image, rows=700, cols=600)  # 840 kB of pixels: every PDU size gives several fragments
    with mock.patch.object(SpoolingDUL, "_spool_fragment", autospec=True,
                           side_effect=SpoolingDUL._spool_fragment) as direct:
        done = storescu(settings.node.port, [image], "--max-send-pdu", str(send_pdu), "-xe")
    assert done.returncode == 0, done.stdout + done.stderr
    assert _dataset_bytes(_stored(runtime, ds.SOPInstanceUID)) == _dataset_bytes(image)
    fragments = -(-len(_dataset_bytes(image)) // (send_pdu - 12))
    assert direct.call_count >= fragments - 2  # all but the last (and a PDU not yet whole when looked at)


def test_pynetdicom_fragments_are_stored_byte_for_byte(node: tuple[Settings, ServerContext], tmp_path: Path) -> None:
    settings, runtime = node
    images = [tmp_path / f"{i}.dcm" for i in range(3)]
    datasets = [make_cr(path, rows=300, cols=257, seed=i) for i, path in enumerate(images)]
    ae = requestor("MODALITY")
    ae.add_requested_context(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", settings.node.port, ae_title="PACSNODE", max_pdu=16384)
    assert assoc.is_established
    try:
        for path in images:
            assert assoc.send_c_store(path).Status == 0
    finally:
        assoc.release()
    for path, ds in zip(images, datasets, strict=True):
        assert _dataset_bytes(_stored(runtime, ds.SOPInstanceUID)) == _dataset_bytes(path)


def test_an_association_that_watches_its_pdus_gets_every_one_from_pynetdicom(
        node: tuple[Settings, ServerContext], tmp_path: Path) -> None:
    """A handler bound to EVT_PDU_RECV must see every PDU, so the fast path stands aside."""
    settings, runtime = node
    image = tmp_path / "image.dcm"
    ds = make_cr(image, rows=300, cols=300)
    seen: list[int] = []
    bind = SpoolingDUL._middle_fragment_size

    def watched(self: SpoolingDUL) -> int | None:
        if not self.assoc.get_handlers(evt.EVT_PDU_RECV):
            self.assoc.bind(evt.EVT_PDU_RECV, lambda event: seen.append(1))
        return bind(self)

    with mock.patch.object(SpoolingDUL, "_middle_fragment_size", watched), \
            mock.patch.object(SpoolingDUL, "_spool_fragment", autospec=True) as direct:
        done = storescu(settings.node.port, [image], "--max-send-pdu", "4096", "-xe")
    assert done.returncode == 0, done.stdout + done.stderr
    assert direct.call_count == 0
    assert len(seen) > 40
    assert _dataset_bytes(_stored(runtime, ds.SOPInstanceUID)) == _dataset_bytes(image)


def _limited_pair(limit: int) -> tuple[_LimitedSocket, socket.socket]:
    ours, theirs = socket.socketpair()
    limited = _LimitedSocket(ours.family, ours.type, ours.proto, fileno=ours.detach())
    limited.pdu_limit = limit
    limited.settimeout(5)
    return limited, theirs


def test_recv_into_follows_the_pdu_framing_recv_does() -> None:
    limited, peer = _limited_pair(1000)
    with limited, peer:
        body = os.urandom(900)
        peer.sendall(struct.pack(">BBL", 4, 0, len(body)) + body + struct.pack(">BBL", 4, 0, 5000))
        assert limited.recv(6) == struct.pack(">BBL", 4, 0, len(body))
        buffer = memoryview(bytearray(900))
        got = 0
        while got < 900:
            got += limited.recv_into(buffer[got:])
        assert bytes(buffer) == body
        with pytest.raises(PduTooLarge):  # the next header announces more than the limit
            limited.recv_into(memoryview(bytearray(6)))


def test_recv_into_serves_the_doormans_pushback_first() -> None:
    limited, peer = _limited_pair(1000)
    with limited, peer:
        limited.pushback = struct.pack(">BBL", 4, 0, 4) + b"ab"
        peer.sendall(b"cd")
        buffer = memoryview(bytearray(10))
        got = limited.recv_into(buffer)
        got += limited.recv_into(buffer[got:])
        assert bytes(buffer) == struct.pack(">BBL", 4, 0, 4) + b"abcd"


def test_a_stalled_fragment_is_cut_at_its_deadline() -> None:
    limited, peer = _limited_pair(1 << 20)
    limited.pdu_deadline_s = 0.3
    with limited, peer:
        peer.sendall(struct.pack(">BBL", 4, 0, 1000) + b"x" * 10)

        def trickle() -> None:
            for _ in range(10):
                threading.Event().wait(0.1)
                try:
                    peer.send(b"y")
                except OSError:
                    return

        threading.Thread(target=trickle, daemon=True).start()
        buffer = memoryview(bytearray(1006))
        got = 0
        with pytest.raises(TimeoutError):
            while got < 1006:
                got += limited.recv_into(buffer[got:])


def test_an_empty_middle_fragment_is_taken_and_the_data_set_stored_whole(tmp_path: Path) -> None:
    from tests.reliability.test_partial_receives import _record_store

    settings = Settings(
        node={"port": free_port(), "bind": "127.0.0.1", "data_dir": tmp_path / "var", "max_pdu": 16384},
        store={"min_free_bytes": 0}, pipeline={"bundle": "fake"},
    )
    image = tmp_path / "image.dcm"
    ds = make_cr(image, rows=256, cols=256)
    with running_listener(settings) as runtime:
        pdus = _record_store(settings.node.port, image)  # stored once, as recorded
        with runtime.write_sessions() as session, session.begin():
            session.query(Instance).delete()
        runtime.store.delete(runtime.store.relpath_for(ds.StudyInstanceUID, ds.SeriesInstanceUID,
                                                       ds.SOPInstanceUID))
        data_set = [i for i, p in enumerate(pdus) if p[0] == 0x04 and not p[11] & 1]
        assert len(data_set) > 4
        context_id = pdus[data_set[1]][10]
        empty = struct.pack(">BBLLBB", 4, 0, 6, 2, context_id, 0)
        replay = [*pdus[:data_set[1]], empty, *pdus[data_set[1]:]]
        with mock.patch.object(SpoolingDUL, "_spool_fragment", autospec=True,
                               side_effect=SpoolingDUL._spool_fragment) as direct, \
                socket.create_connection(("127.0.0.1", settings.node.port), timeout=10) as sock:
            sock.sendall(replay[0])
            assert sock.recv(1) == b"\x02"
            sock.sendall(b"".join(replay[1:]))
            while sock.recv(65536):
                pass
        assert any(call.args[1] == 0 for call in direct.call_args_list)
        assert _dataset_bytes(_stored(runtime, ds.SOPInstanceUID)) == _dataset_bytes(image)


# -- requests served in the DUL thread, slow polls (receiving.InlineServingDIMSE, serve_inline) -------


def _accepted_threads() -> tuple[Association, SpoolingDUL]:
    """The reactor and DUL threads of the one association the node in this process has accepted."""
    duls = [thread for thread in threading.enumerate() if isinstance(thread, SpoolingDUL) and thread.is_alive()]
    assert len(duls) == 1, duls
    return duls[0].assoc, duls[0]


def _switches(thread: threading.Thread) -> int:
    """The voluntary context switches of ``thread`` so far (Linux): one per sleep it woke from."""
    status = Path(f"/proc/self/task/{thread.native_id}/status").read_text()
    return int(status.split("\nvoluntary_ctxt_switches:")[1].split()[0])


def test_c_stores_are_served_and_answered_by_the_dul_thread_that_received_them(
        node: tuple[Settings, ServerContext], tmp_path: Path) -> None:
    settings, runtime = node
    images = [tmp_path / f"{i}.dcm" for i in range(3)]
    datasets = [make_cr(path, seed=i) for i, path in enumerate(images)]
    served_by: list[threading.Thread] = []
    ingest = Ingestor.ingest

    def recording(self: Ingestor, *args: object) -> int:
        served_by.append(threading.current_thread())
        return ingest(self, *args)  # type: ignore[arg-type]

    with mock.patch.object(Ingestor, "ingest", recording):
        done = storescu(settings.node.port, images)
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(served_by) == 3 and all(isinstance(thread, SpoolingDUL) for thread in served_by), served_by
    for ds in datasets:
        _stored(runtime, ds.SOPInstanceUID)


def test_an_idle_accepted_association_polls_slowly_and_still_answers_at_once(
        node: tuple[Settings, ServerContext]) -> None:
    settings, _ = node
    ae = requestor("MODALITY")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", settings.node.port, ae_title="PACSNODE")
    assert assoc.is_established
    try:
        reactor, dul = _accepted_threads()
        time.sleep(0.2)
        before = _switches(reactor), _switches(dul)
        time.sleep(1.0)
        after = _switches(reactor), _switches(dul)
        # pynetdicom's millisecond poll: ~1,000 wake-ups a second each; ACCEPTED_POLL_S: ~20
        assert after[0] - before[0] < 3 / ACCEPTED_POLL_S and after[1] - before[1] < 3 / ACCEPTED_POLL_S
        started = time.monotonic()
        for _ in range(20):
            assert assoc.send_c_echo().Status == 0
        assert time.monotonic() - started < 20 * ACCEPTED_POLL_S / 2  # no answer waits for a poll
    finally:
        assoc.release()
    for thread in (reactor, dul):  # the release (and the DUL's end) woke them: no poll waited for
        thread.join(5 * ACCEPTED_POLL_S)
        assert not thread.is_alive()


def test_an_aborted_accepted_association_ends_at_once(node: tuple[Settings, ServerContext]) -> None:
    settings, _ = node
    ae = requestor("MODALITY")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", settings.node.port, ae_title="PACSNODE")
    assert assoc.is_established
    reactor, dul = _accepted_threads()
    assoc.abort()
    for thread in (reactor, dul):
        thread.join(5 * ACCEPTED_POLL_S)
        assert not thread.is_alive()


def test_a_request_on_a_context_never_accepted_aborts_from_the_dul_thread(
        node: tuple[Settings, ServerContext]) -> None:
    """pynetdicom aborts (blocking: it waits for the DUL to stop) on a request whose context it did not
    accept; served in the DUL thread, that abort must not wait for its own thread."""
    settings, _ = node
    ae = requestor("MODALITY")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", settings.node.port, ae_title="PACSNODE")
    assert assoc.is_established
    reactor, dul = _accepted_threads()
    echo = C_ECHO()
    echo.MessageID = 1
    echo.AffectedSOPClassUID = Verification
    assoc.dimse.send_msg(echo, 99)  # an odd context ID nobody proposed
    for thread in (reactor, dul):
        thread.join(5)
        assert not thread.is_alive()
    deadline = time.monotonic() + 5
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not assoc.is_established


def test_another_thread_pausing_an_accepted_reactor_does_not_wait_for_its_poll(
        node: tuple[Settings, ServerContext]) -> None:
    """pynetdicom's ``send_*`` from another thread clears the checkpoint and waits for the reactor to
    say it is paused, which it does only once its sleep ends: the clear must wake it."""
    settings, _ = node
    ae = requestor("MODALITY")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", settings.node.port, ae_title="PACSNODE")
    assert assoc.is_established
    try:
        reactor, _ = _accepted_threads()
        time.sleep(0.1)
        waited = 0.0
        for _ in range(10):
            started = time.monotonic()
            reactor._reactor_checkpoint.clear()
            while not reactor._is_paused:
                time.sleep(0.0001)
            waited += time.monotonic() - started
            reactor._reactor_checkpoint.set()
            time.sleep(0.01)
        assert waited < 10 * ACCEPTED_POLL_S / 5  # a poll each would be ~10 x ACCEPTED_POLL_S / 2
    finally:
        assoc.release()
