"""Storage commitment (PS3.4 Annex J) both ways. DCMTK has no storage commitment tools, so the modality
(N-ACTION SCU, N-EVENT-REPORT receiver) is pynetdicom; the PACS that commits the node's results is a real
Orthanc (its storage commitment SCP) and a pynetdicom one. Images go in by DCMTK storescu; the node
reports what it holds and fails what it does not, and records each PACS answer per delivery."""

from __future__ import annotations

import json
import queue
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from pydicom import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import ComputedRadiographyImageStorage, StorageCommitmentPushModel
from pynetdicom.sop_class import StorageCommitmentPushModelInstance as WELL_KNOWN

from pacs_node.config import Settings
from pacs_node.dicom.server import Listener
from pacs_node.ops.context import ServerContext
from pacs_node.work.export import Exporter
from pacs_node.work.worker import Worker
from pipelines.interface import FakePipeline
from storage.history import deliveries_of
from storage.schema import JobKind
from tests.pacs_node.helpers import make_cr, requestor, storescu
from tests.support import free_port, require_tool


def _ref(sop_class: str, uid: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = sop_class, uid
    return item


def test_the_node_commits_what_it_holds_and_fails_the_rest(tmp_path: Path) -> None:
    modality_port = free_port()
    reports: queue.Queue[tuple[int, Dataset]] = queue.Queue()

    def on_report(event: evt.Event) -> tuple[int, None]:
        reports.put((event.event_type, event.event_information))
        return 0x0000, None

    modality = AE(ae_title="MODALITY")
    modality.add_supported_context(StorageCommitmentPushModel)
    server = modality.start_server(("127.0.0.1", modality_port), block=False,
                                   evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)])
    settings = Settings(node={"ae_title": "PACSNODE", "port": free_port(), "bind": "127.0.0.1",
                              "data_dir": tmp_path / "var"},
                        store={"min_free_bytes": 0}, pipeline={"bundle": "fake"}, routing={"default": "none"},
                        peers={"modality": {"ae_title": "MODALITY", "host": "127.0.0.1", "port": modality_port}})
    runtime = ServerContext.open(settings)
    listener = Listener(settings, runtime)
    listener.start()
    try:
        images = [make_cr(tmp_path / f"cr{i}.dcm", seed=i) for i in range(2)]
        assert storescu(settings.node.port, [tmp_path / "cr0.dcm", tmp_path / "cr1.dcm"]).returncode == 0

        def request(refs: list[Dataset]) -> tuple[int, str]:
            scu = requestor("MODALITY")
            scu.add_requested_context(StorageCommitmentPushModel)
            assoc = scu.associate("127.0.0.1", settings.node.port, ae_title="PACSNODE")
            assert assoc.is_established
            info = Dataset()
            info.TransactionUID = generate_uid()
            info.ReferencedSOPSequence = Sequence(refs)
            status, _ = assoc.send_n_action(info, 1, StorageCommitmentPushModel, WELL_KNOWN)
            assoc.release()
            return int(status.Status), str(info.TransactionUID)

        held = [_ref(ComputedRadiographyImageStorage, str(ds.SOPInstanceUID)) for ds in images]
        status, transaction = request(held)
        assert status == 0x0000
        event_type, info = reports.get(timeout=30)
        assert event_type == 1 and info.TransactionUID == transaction
        assert sorted(i.ReferencedSOPInstanceUID for i in info.ReferencedSOPSequence) == \
            sorted(str(ds.SOPInstanceUID) for ds in images)
        assert "FailedSOPSequence" not in info

        never_sent = generate_uid()
        status, transaction = request([held[0], _ref(ComputedRadiographyImageStorage, never_sent)])
        assert status == 0x0000
        event_type, info = reports.get(timeout=30)
        assert event_type == 2 and info.TransactionUID == transaction
        assert [i.ReferencedSOPInstanceUID for i in info.ReferencedSOPSequence] == [str(images[0].SOPInstanceUID)]
        assert [(i.ReferencedSOPInstanceUID, i.FailureReason) for i in info.FailedSOPSequence] == [(never_sent, 0x0112)]
    finally:
        listener.stop()
        runtime.close()
        server.shutdown()


@pytest.mark.parametrize("action_type", [7])
def test_an_unknown_action_is_refused(tmp_path: Path, action_type: int) -> None:
    settings = Settings(node={"ae_title": "PACSNODE", "port": free_port(), "bind": "127.0.0.1",
                              "data_dir": tmp_path / "var"}, store={"min_free_bytes": 0}, pipeline={"bundle": "fake"})
    runtime = ServerContext.open(settings)
    listener = Listener(settings, runtime)
    listener.start()
    try:
        scu = requestor("MODALITY")
        scu.add_requested_context(StorageCommitmentPushModel)
        assoc = scu.associate("127.0.0.1", settings.node.port, ae_title="PACSNODE")
        info = Dataset()
        info.TransactionUID = generate_uid()
        info.ReferencedSOPSequence = Sequence([])
        status, _ = assoc.send_n_action(info, action_type, StorageCommitmentPushModel, WELL_KNOWN)
        assoc.release()
        assert int(status.Status) == 0x0123
    finally:
        listener.stop()
        runtime.close()


class _CommittingPacs:
    """A pynetdicom PACS that stores results and, asked for storage commitment, reports back to the node
    on a new association: committed what it received, failed the rest (as dcm4chee does)."""

    def __init__(self, node_port: int) -> None:
        self.port, self.node_port = free_port(), node_port
        self.received: set[str] = set()
        ae = AE(ae_title="PACS")
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        ae.add_supported_context(StorageCommitmentPushModel)
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[
            (evt.EVT_C_STORE, self._on_store), (evt.EVT_N_ACTION, self._on_action)])

    def _on_store(self, event: evt.Event) -> int:
        self.received.add(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    def _on_action(self, event: evt.Event) -> tuple[int, None]:
        request = event.action_information
        threading.Thread(target=self._report, args=(request,), daemon=True).start()
        return 0x0000, None

    def _report(self, request: Dataset) -> None:
        info = Dataset()
        info.TransactionUID = request.TransactionUID
        info.ReferencedSOPSequence = Sequence([item for item in request.ReferencedSOPSequence
                                               if item.ReferencedSOPInstanceUID in self.received])
        scu = requestor("PACS")
        scu.add_requested_context(StorageCommitmentPushModel)
        assoc = scu.associate("127.0.0.1", self.node_port, ae_title="PACSNODE")
        assoc.send_n_event_report(info, 1, StorageCommitmentPushModel, WELL_KNOWN)
        assoc.release()


def _start_orthanc(tmp_path: Path, node_port: int) -> tuple[subprocess.Popen, int]:
    """Orthanc (its storage commitment SCP) with the node declared as a modality it reports back to."""
    binary = require_tool("Orthanc")
    dicom_port, http_port = free_port(), free_port()
    config = {"Name": "commitment-test", "StorageDirectory": str(tmp_path / "orthanc-storage"),
              "IndexDirectory": str(tmp_path / "orthanc-index"), "DicomAet": "ORTHANC", "DicomPort": dicom_port,
              "HttpPort": http_port, "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "Plugins": [],
              "DicomModalities": {"pacsnode": ["PACSNODE", "127.0.0.1", node_port]}, "DicomScuTimeout": 30}
    (tmp_path / "orthanc.json").write_text(json.dumps(config))
    with (tmp_path / "orthanc.log").open("w") as log:
        process = subprocess.Popen([binary, "--verbose", str(tmp_path / "orthanc.json")], stdout=log,
                                   stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{http_port}/system", timeout=2).close()
            return process, dicom_port
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise
            time.sleep(0.2)


@pytest.mark.parametrize("pacs_kind", ["pynetdicom", "orthanc"])
def test_the_node_asks_the_pacs_to_commit_its_results_and_records_the_answer(tmp_path: Path, pacs_kind: str) -> None:
    node_port = free_port()
    if pacs_kind == "orthanc":
        orthanc, pacs_port = _start_orthanc(tmp_path, node_port)
        pacs_ae, stop_pacs = "ORTHANC", orthanc.terminate
    else:
        pacs = _CommittingPacs(node_port)
        pacs_port, pacs_ae, stop_pacs = pacs.port, "PACS", pacs.server.shutdown
    settings = Settings(node={"ae_title": "PACSNODE", "port": node_port, "bind": "127.0.0.1",
                              "data_dir": tmp_path / "var"},
                        store={"min_free_bytes": 0}, pipeline={"bundle": "fake"},
                        peers={"pacs": {"ae_title": pacs_ae, "host": "127.0.0.1", "port": pacs_port,
                                        "storage_commitment": True}},
                        routing={"default": "none", "always": ["pacs"]}, export={"timeout_s": 10},
                            studies={"settle_s": 0})  # analysed as soon as it is stored
    runtime = ServerContext.open(settings)
    listener = Listener(settings, runtime)
    listener.start()
    try:
        make_cr(tmp_path / "cr.dcm")
        assert storescu(settings.node.port, [tmp_path / "cr.dcm"]).returncode == 0
        worker = Worker(settings, runtime, FakePipeline(), worker_id="w")
        worker.process(runtime.queue.claim("w", [JobKind.ANALYSE]))
        exports = runtime.queue.claim("e", [JobKind.EXPORT], limit=10)
        assert exports
        Exporter(settings, runtime, worker_id="e").run_jobs(exports, "e")
        results = {job.sop_instance_uid for job in exports}
        if pacs_kind == "pynetdicom":
            assert pacs.received == results
        deadline = time.monotonic() + 30
        while True:
            with runtime.read_session() as session:
                rows = deliveries_of(session, sorted(results))
            if all(row.commitment == "committed" for row in rows) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert [(row.state, row.commitment) for row in rows] == [("done", "committed")] * len(results)
        assert all(row.committed_at is not None for row in rows)
    finally:
        listener.stop()
        runtime.close()
        stop_pacs()
