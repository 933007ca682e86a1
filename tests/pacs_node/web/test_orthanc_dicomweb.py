"""Orthanc with its DICOMweb plugin both ways round: as a DICOMweb client of the node it stores an image
into the node (STOW-RS), finds it and its results (QIDO-RS) and retrieves them (WADO-RS); as a DICOMweb
server it receives the node's results by STOW-RS export."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.pacs_node.helpers import Node, base_config, make_cr, new_ports, wait_for_port, write_config
from tests.support import free_port, require_tool
from tests.pacs_node.web.conftest import ADMIN_SECRET, token_toml

PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


class Orthanc:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def call(self, method: str, path: str, body: Any = None, *, data: bytes | None = None, timeout: float = 60) -> Any:
        answer = requests.request(method, self.base + path, json=body, data=data, timeout=timeout)
        answer.raise_for_status()
        return answer.json() if answer.content else None

    def study_instances(self, study_uid: str) -> list[dict[str, Any]]:
        return self.call("POST", "/tools/find", {"Level": "Instance", "Expand": True,
                                                 "Query": {"StudyInstanceUID": study_uid}})


@pytest.fixture
def orthanc_and_node(tmp_path: Path) -> Iterator[tuple[Orthanc, Node]]:
    binary = require_tool("Orthanc")
    if not PLUGIN.is_file():
        pytest.skip("the Orthanc DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)")
    dicom_port, orthanc_http = free_port(), free_port()
    port, http_port, _ = new_ports()
    config = {
        "Name": "pacs-node-web-test", "StorageDirectory": str(tmp_path / "orthanc"),
        "IndexDirectory": str(tmp_path / "orthanc"), "DicomAet": "ORTHANC", "DicomPort": dicom_port,
        "HttpPort": orthanc_http, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
        "Plugins": [str(PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/",
                     "Servers": {"node": {"Url": f"http://127.0.0.1:{http_port}/dicom-web/",
                                          "Username": "admin", "Password": ADMIN_SECRET}}},
    }
    (tmp_path / "orthanc.json").write_text(json.dumps(config))
    log = (tmp_path / "orthanc.log").open("w")
    process = subprocess.Popen([binary, str(tmp_path / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    node_dir = tmp_path / "node"
    node_dir.mkdir()
    extra = f"""
[peers.orthanc]
url = "http://127.0.0.1:{orthanc_http}/dicom-web"
[routing]
always = ["orthanc"]
{token_toml()}"""
    node = Node(node_dir, write_config(node_dir, base_config(node_dir / "var", port, http_port, extra=extra)),
                port, http_port, node_dir / "serve.log")
    try:
        wait_for_port(orthanc_http, proc=process)
        node.start()
        wait_for_port(http_port, proc=node.proc)
        yield Orthanc(orthanc_http), node
    finally:
        node.stop()
        process.terminate()
        process.wait(20)


def _wait(predicate, what: str, node: Node, timeout: float = 90) -> Any:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"{what} never happened\n--- node log ---\n{node.log()[-4000:]}")


def test_orthanc_stores_finds_and_retrieves_by_dicomweb(orthanc_and_node: tuple[Orthanc, Node], tmp_path: Path) -> None:
    orthanc, node = orthanc_and_node
    image = make_cr(tmp_path / "cr.dcm", seed=7, rows=256, cols=256)
    study = image.StudyInstanceUID
    uploaded = orthanc.call("POST", "/instances", data=(tmp_path / "cr.dcm").read_bytes())
    # 1. Orthanc -> node, STOW-RS
    orthanc.call("POST", "/dicom-web/servers/node/stow", {"Resources": [uploaded["ParentStudy"]]})
    # 2. the node analyses it and exports its results to Orthanc by STOW-RS
    jobs = node.wait_jobs(lambda js: [j for j in js if j["kind"] == "export"]
                          and all(j["state"] == "done" for j in js))
    results = [i for i in orthanc.study_instances(study) if i["MainDicomTags"]["SOPInstanceUID"] != image.SOPInstanceUID]
    assert len(results) == len([j for j in jobs if j["kind"] == "export"]) >= 3
    # 3. Orthanc finds the study and the results' series in the node by QIDO-RS
    found = orthanc.call("POST", "/dicom-web/servers/node/qido",
                         {"Uri": "/studies", "Arguments": {"AccessionNumber": "A00007"}})
    assert [s["0020000D"]["Value"] for s in found] == [study]  # Orthanc's simplified answer: plain values
    series = orthanc.call("POST", "/dicom-web/servers/node/qido", {"Uri": f"/studies/{study}/series"})
    modalities = sorted(s["00080060"]["Value"] for s in series)
    assert modalities.count("SR") >= 2 and "CR" in modalities
    # 4. Orthanc forgets the study, then retrieves all of it from the node by WADO-RS
    orthanc.call("DELETE", f"/studies/{uploaded['ParentStudy']}")
    assert orthanc.study_instances(study) == []
    orthanc.call("POST", "/dicom-web/servers/node/retrieve", {"Resources": [{"Study": study}]})
    back = {i["MainDicomTags"]["SOPInstanceUID"] for i in orthanc.study_instances(study)}
    assert back == {image.SOPInstanceUID} | {r["MainDicomTags"]["SOPInstanceUID"] for r in results}
