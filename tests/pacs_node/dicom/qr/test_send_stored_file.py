"""A stored file's C-STORE request written by the sending thread itself (pacs_node.dicom.qr.sending
``send_stored_file``): byte for byte the request pynetdicom would send (command set, fragments, PDUs), in
one write for a small file, to a real DCMTK ``storescp`` that stores the bytes it got; pynetdicom sends
whenever this way does not apply (a handler bound to a sent-message event)."""

from __future__ import annotations

import io
import signal
import time
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import evt
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import split_dataset
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import ComputedRadiographyImageStorage, EnhancedSRStorage

from bench.common import stop_process, wait_for_port
from pacs_node.config import Peer, Settings
from pacs_node.dicom.adjustments import apply_pynetdicom_adjustments, undo_pynetdicom_adjustments
from pacs_node.dicom.qr.sending import file_meta_uids, store_request_command_set, write_store_request
from pacs_node.dicom.scu import StoreAssociation, StoredInstance, store_contexts
from tests.pacs_node.results.synthetic import make_cr
from tests.support import dcmtk, free_port


def an_sr(path: Path, uid_length_odd: bool) -> Path:
    """A small SR file; its SOP Instance UID of odd or even length (padded with NUL when odd)."""
    ds = pydicom.Dataset()
    uid = generate_uid()
    uid = uid if (len(uid) % 2 == 1) == uid_length_odd else uid[:-1]
    ds.SOPClassUID, ds.SOPInstanceUID = EnhancedSRStorage, uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.ValueType, ds.CompletionFlag, ds.VerificationFlag = "SR", "CONTAINER", "COMPLETE", "UNVERIFIED"
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path


def a_large_cr(path: Path) -> Path:
    """A CR of 300 x 256 16-bit pixels (150 KiB): more than the first read, so it is streamed."""
    ds = make_cr(patient_id="P", patient_name="Large^One", study_uid=generate_uid(), study_date="20240101",
                 accession="A1", rows=300, columns=256)
    ds.save_as(path, enforce_file_format=True)
    assert path.stat().st_size > 128 * 1024
    return path


def pynetdicom_request(path: Path, msg_id: int, priority: int, originator_aet: str | None,
                       originator_id: int | None, context_id: int, max_pdu: int) -> bytes:
    """The bytes pynetdicom's own chunked sending writes for this C-STORE request (its PDUs, in order)."""
    meta, offset = split_dataset(path)
    request = C_STORE()
    request.MessageID, request.Priority = msg_id, priority
    request.MoveOriginatorApplicationEntityTitle, request.MoveOriginatorMessageID = originator_aet, originator_id
    request.AffectedSOPClassUID = meta.MediaStorageSOPClassUID
    request.AffectedSOPInstanceUID = meta.MediaStorageSOPInstanceUID
    request._dataset_path = (path, offset)
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    return b"".join(P_DATA_TF(pdata).encode() for pdata in message.encode_msg(context_id, max_pdu))


class Recorder:
    """A socket stand-in that keeps what is written to it."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: bytes, timeout: float | None) -> None:
        self.writes.append(bytes(data))


def ours(path: Path, msg_id: int, priority: int, originator_aet: str | None, originator_id: int | None,
         context_id: int, max_pdu: int) -> list[bytes]:
    with open(path, "rb") as f:
        head = f.read(64 * 1024)
        meta = file_meta_uids(head)
        assert meta is not None
        uids, offset = meta
        command = store_request_command_set(uids[0x0002], uids[0x0003], msg_id, priority, originator_aet,
                                            originator_id)
        sock = Recorder()
        write_store_request(sock, f, head, offset, context_id, command, max_pdu - 6 if max_pdu else None)
    return sock.writes


@pytest.mark.parametrize("max_pdu", [0, 16384, 4096, 1000])
@pytest.mark.parametrize(("originator_aet", "originator_id"), [(None, None), ("MOVER", 7), ("ABCDEFGHIJKLMNOP", 65535)])
def test_the_request_is_pynetdicoms_byte_for_byte(tmp_path: Path, max_pdu: int, originator_aet: str | None,
                                                  originator_id: int | None) -> None:
    files = [an_sr(tmp_path / "odd.dcm", True), an_sr(tmp_path / "even.dcm", False), a_large_cr(tmp_path / "cr.dcm")]
    for path in files:
        for msg_id, priority, context_id in ((1, 2, 1), (65535, 0, 127), (300, 1, 255)):
            written = ours(path, msg_id, priority, originator_aet, originator_id, context_id, max_pdu)
            expected = pynetdicom_request(path, msg_id, priority, originator_aet, originator_id, context_id, max_pdu)
            assert b"".join(written) == expected
            if path.stat().st_size < 64 * 1024:
                assert len(written) == 1  # a small request in one write


def test_file_meta_uids_reads_what_pydicom_reads(tmp_path: Path) -> None:
    path = a_large_cr(tmp_path / "cr.dcm")
    meta, offset = split_dataset(path)
    uids, ours_offset = file_meta_uids(path.read_bytes()[:64 * 1024]) or ({}, 0)
    assert ours_offset == offset
    assert (uids[0x0002], uids[0x0003], uids[0x0010]) == (meta.MediaStorageSOPClassUID,
                                                          meta.MediaStorageSOPInstanceUID, meta.TransferSyntaxUID)
    assert file_meta_uids(b"\0" * 200) is None  # no DICM: pynetdicom reads (and rejects) it itself
    assert file_meta_uids(path.read_bytes()[:150]) is None  # group 2 goes on past what was read


@pytest.fixture
def adjusted() -> Iterator[None]:
    """pynetdicom as the exporter threads and a running listener have it."""
    apply_pynetdicom_adjustments()
    yield
    undo_pynetdicom_adjustments()


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """DCMTK ``storescp`` writing the bytes it receives (``+B``), a small maximum PDU (several fragments)."""
    port, received = free_port(), tmp_path / "received"
    received.mkdir()
    proc = subprocess.Popen([dcmtk("storescp"), "+B", "-aet", "RECEIVER", "-od", str(received), "--max-pdu", "8192",
                             str(port)], env={**os.environ, "TCP_NODELAY": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(port, timeout=20, proc=proc)
    yield port, received
    stop_process(proc, timeout=5)


def association(tmp_path: Path, port: int, files: list[Path]) -> tuple[StoreAssociation, list[StoredInstance]]:
    settings = Settings(node={"data_dir": tmp_path / "var"}, export={"timeout_s": 10})
    peer = Peer(ae_title="RECEIVER", host="127.0.0.1", port=port)
    instances = []
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        instances.append(StoredInstance(path, str(ds.SOPClassUID), str(ds.SOPInstanceUID),
                                        str(ds.file_meta.TransferSyntaxUID)))
    contexts = store_contexts(((i.sop_class_uid, i.transfer_syntax_uid) for i in instances), Peer(
        ae_title="RECEIVER", host="127.0.0.1", port=port), False)
    return StoreAssociation(settings, peer, contexts), instances


def received_data_sets(directory: Path) -> dict[str, bytes]:
    out = {}
    for path in directory.iterdir():
        raw = path.read_bytes()
        out[str(pydicom.dcmread(io.BytesIO(raw), stop_before_pixels=True).SOPInstanceUID)] = raw[-split_size(raw):]
    return out


def split_size(raw: bytes) -> int:
    """The length of a DICOM file's data set (what follows its File Meta Information)."""
    return len(raw) - (144 + int.from_bytes(raw[140:144], "little"))


def test_a_stored_file_is_written_by_the_sending_thread_as_pynetdicom_would(
        tmp_path: Path, adjusted: None, storescp: tuple[int, Path]) -> None:
    port, received = storescp
    files = [an_sr(tmp_path / "a.dcm", True), an_sr(tmp_path / "b.dcm", False), a_large_cr(tmp_path / "c.dcm")]
    link, instances = association(tmp_path, port, files)
    writes: list[tuple[str, bytes]] = []
    link._assoc.bind(evt.EVT_DATA_SENT, lambda event: writes.append((threading.current_thread().name,
                                                                     bytes(event.data))))
    try:
        assert link.send(instances) == [0, 0, 0]
        max_pdu = link._assoc.acceptor.maximum_length
        assert max_pdu == 8192
        contexts = {cx.abstract_syntax: cx.context_id for cx in link._assoc.accepted_contexts}
        me = threading.current_thread().name
        assert {name for name, _ in writes} == {me}, "the request went through the DUL thread"
        assert [data for _, data in writes[:2]] == [
            pynetdicom_request(path, n, 2, None, None, contexts[instance.sop_class_uid], max_pdu)
            for n, (path, instance) in enumerate(zip(files[:2], instances[:2], strict=True), 1)]
        assert b"".join(data for _, data in writes[2:]) == pynetdicom_request(
            files[2], 3, 2, None, None, contexts[ComputedRadiographyImageStorage], max_pdu)
    finally:
        link.close()
    got = received_data_sets(received)
    assert got == {i.sop_instance_uid: path.read_bytes()[-split_size(path.read_bytes()):]
                   for i, path in zip(instances, files, strict=True)}


def test_pynetdicom_sends_when_a_sent_message_handler_is_bound(
        tmp_path: Path, adjusted: None, storescp: tuple[int, Path]) -> None:
    port, received = storescp
    files = [an_sr(tmp_path / "a.dcm", True), an_sr(tmp_path / "b.dcm", False)]
    link, instances = association(tmp_path, port, files)
    messages: list[str] = []
    writers: set[str] = set()
    link._assoc.bind(evt.EVT_DIMSE_SENT, lambda event: messages.append(type(event.message).__name__))
    link._assoc.bind(evt.EVT_DATA_SENT, lambda event: writers.add(threading.current_thread().name))
    try:
        assert link.send(instances) == [0, 0]
    finally:
        link.close()
    assert messages == ["C_STORE_RQ", "C_STORE_RQ"]  # pynetdicom's own sending, its events as before
    assert threading.current_thread().name not in writers
    assert len(received_data_sets(received)) == 2


def test_pynetdicom_sends_a_file_whose_uid_it_would_validate(
        tmp_path: Path, adjusted: None, storescp: tuple[int, Path]) -> None:
    port, _ = storescp
    path = an_sr(tmp_path / "a.dcm", True)
    ds = pydicom.dcmread(path)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.1x"
    ds.save_as(path, enforce_file_format=True)
    link, instances = association(tmp_path, port, [path])
    writers: set[str] = set()
    link._assoc.bind(evt.EVT_DATA_SENT, lambda event: writers.add(threading.current_thread().name))
    try:
        link.send(instances)
    finally:
        link.close()
    assert writers and threading.current_thread().name not in writers  # the DUL thread wrote it


def test_a_peer_that_stops_reading_ends_the_association_not_the_thread(
        tmp_path: Path, adjusted: None, storescp: tuple[int, Path]) -> None:
    """``storescp`` stopped (SIGSTOP) while a large file is written: the write gives up after the
    association's timeout instead of holding the sending thread for ever, the association is aborted
    (no other message may follow a request cut short), and the instance counts as not sent."""
    port, _ = storescp
    big = tmp_path / "big.dcm"
    ds = pydicom.dcmread(a_large_cr(tmp_path / "cr.dcm"))
    ds.Rows, ds.Columns = 4096, 4096
    ds.PixelData = bytes(4096 * 4096 * 2)  # 32 MiB: more than the kernel's socket buffers take
    ds.save_as(big, enforce_file_format=True)
    link, instances = association(tmp_path, port, [big])
    link._assoc.dimse_timeout = 1.0
    proc = next(p for p in _storescp_processes(port))
    os.kill(proc, signal.SIGSTOP)
    try:
        started = time.monotonic()
        outcomes = link.send(instances)
        assert time.monotonic() - started < 15
    finally:
        os.kill(proc, signal.SIGCONT)
        link.close()
    assert not link.is_established
    assert not isinstance(outcomes[0], int) or outcomes[0] != 0


def _storescp_processes(port: int) -> Iterator[int]:
    """The pids of the DCMTK ``storescp`` listening on ``port`` (the fixture's)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if cmdline and cmdline[0].endswith(b"storescp") and str(port).encode() in cmdline:
                yield int(entry.name)
