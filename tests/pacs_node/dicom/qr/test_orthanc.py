"""The PACS flow against a real Orthanc: the node's results are C-STOREd into Orthanc, and Orthanc,
configured with the node as a modality, queries the node and retrieves a study's results from it
(C-FIND + C-MOVE through Orthanc's REST API)."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset
from pynetdicom import AE

from pacs_node.results import comprehensive_fallback
from tests.pacs_node.dicom.qr.conftest import QR_AET, Archive, Scp
from tests.support import require_tool


class Orthanc:
    def __init__(self, http_port: int) -> None:
        self.base = f"http://127.0.0.1:{http_port}"

    def call(self, method: str, path: str, body: Any = None, timeout: float = 60) -> Any:
        data = None
        if body is not None:
            data = (body if isinstance(body, str) else json.dumps(body)).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method)
        with urllib.request.urlopen(request, timeout=timeout) as response:
            payload = response.read()
        return json.loads(payload) if payload else None

    def sop_uids(self, study_uid: str) -> set[str]:
        found = self.call("POST", "/tools/find", {"Level": "Instance", "Expand": True,
                                                  "Query": {"StudyInstanceUID": study_uid}})
        return {i["MainDicomTags"]["SOPInstanceUID"] for i in found}


@pytest.fixture
def orthanc(tmp_path: Path, orthanc_ports: tuple[int, int], qr_scp: Scp) -> Iterator[Orthanc]:
    binary = require_tool("Orthanc")
    dicom_port, http_port = orthanc_ports
    config = {
        "Name": "pacs-node-test",
        "StorageDirectory": str(tmp_path / "orthanc-storage"),
        "IndexDirectory": str(tmp_path / "orthanc-index"),
        "DicomAet": "ORTHANC",
        "DicomPort": dicom_port,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": [],
        "DicomModalities": {"pacsnode": [QR_AET, "127.0.0.1", qr_scp.port]},
        "DicomScuTimeout": 30,
    }
    config_path = tmp_path / "orthanc.json"
    config_path.write_text(json.dumps(config))
    log = (tmp_path / "orthanc.log").open("w")
    process = subprocess.Popen([binary, str(config_path)], stdout=log, stderr=subprocess.STDOUT)
    client = Orthanc(http_port)
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"Orthanc exited: {(tmp_path / 'orthanc.log').read_text()[-2000:]}")
            try:
                client.call("GET", "/system", timeout=2)
                break
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield client
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def c_store(port: int, datasets: list[Dataset]) -> list[int]:
    ae = AE(ae_title=QR_AET)
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="ORTHANC")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def results_of(archive: Archive, patient_id: str) -> tuple[str, list[Dataset]]:
    for uid, objects in archive.studies.items():
        if objects[0].PatientID == patient_id:
            return uid, [o for o in objects if o.Modality in ("SR", "KO", "PR")]
    raise KeyError(patient_id)


def test_orthanc_stores_results(archive: Archive, orthanc: Orthanc, orthanc_ports: tuple[int, int]) -> None:
    uid, results = results_of(archive, "P-001")
    fallback = comprehensive_fallback(next(r for r in results if r.SOPClassUID.name.startswith("Comprehensive 3D")))
    assert fallback is not None
    statuses = c_store(orthanc_ports[0], [*results, fallback])
    assert statuses == [0x0000] * (len(results) + 1)
    assert orthanc.sop_uids(uid) == {str(r.SOPInstanceUID) for r in results} | {str(fallback.SOPInstanceUID)}


def test_orthanc_queries_and_retrieves_results_from_the_node(archive: Archive, orthanc: Orthanc) -> None:
    uid, results = results_of(archive, "P-002")
    assert orthanc.sop_uids(uid) == set()
    query = orthanc.call("POST", "/modalities/pacsnode/query",
                         {"Level": "Series", "Query": {"StudyInstanceUID": uid, "Modality": "SR",
                                                       "SeriesDescription": ""}})
    answers = orthanc.call("GET", f"/queries/{query['ID']}/answers?expand")
    sr_series = {o.SeriesInstanceUID for o in results if o.Modality == "SR"}
    assert {a["0020,000e"]["Value"] for a in answers} == sr_series
    # Retrieve every answer: Orthanc sends C-MOVE (destination: itself) to the node.
    orthanc.call("POST", f"/queries/{query['ID']}/retrieve", {"TargetAet": "ORTHANC", "Synchronous": True})
    assert orthanc.sop_uids(uid) == {str(o.SOPInstanceUID) for o in results if o.Modality == "SR"}
