"""The production wiring: a real ``pacs-node serve`` (fake pipeline) receives a radiograph, makes its
results, and serves both through the Q/R SCP the listener binds (DCMTK findscu, movescu, getscu)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from tests.pacs_node.helpers import Node, StoreSCP, base_config, make_cr, new_ports, storescu, write_config
from tests.support import dcmtk


@pytest.fixture
def node_and_receiver(tmp_path: Path) -> Iterator[tuple[Node, StoreSCP]]:
    port, http_port, receiver_port = new_ports()
    receiver = StoreSCP(tmp_path / "received", receiver_port).start()
    config = base_config(tmp_path / "var", port, http_port, extra=f"""
[peers.receiver]
ae_title = "RECEIVER"
host = "127.0.0.1"
port = {receiver_port}
[routing]
default = "none"
[[allowed_callers]]
ae_title = "MODALITY"
services = ["store"]
[[allowed_callers]]
ae_title = "VIEWER"
services = ["find", "move", "get"]
""")
    node = Node(tmp_path, write_config(tmp_path, config), port, http_port, tmp_path / "serve.log")
    try:
        yield node.start(), receiver
    finally:
        node.stop()
        receiver.stop()


@pytest.mark.slow
def test_results_of_a_received_image_are_found_and_retrieved(node_and_receiver: tuple[Node, StoreSCP],
                                                             tmp_path: Path) -> None:
    node, receiver = node_and_receiver
    image = make_cr(tmp_path / "image.dcm", rows=96, cols=80)
    sent = storescu(node.port, [tmp_path / "image.dcm"])
    assert sent.returncode == 0, sent.stderr
    node.wait_jobs(lambda jobs: any(j["kind"] == "analyse" and j["state"] == "done" for j in jobs))
    results = node.query("SELECT sop_instance_uid, modality FROM instances WHERE origin = 'result'")
    assert {r["modality"] for r in results} >= {"SR"}

    out = tmp_path / "find"
    out.mkdir()
    found = subprocess.run(
        [dcmtk("findscu"), "-S", "-aet", "VIEWER", "-aec", "PACSNODE", "-X", "-od", str(out),
         "-k", "QueryRetrieveLevel=SERIES", "-k", f"StudyInstanceUID={image.StudyInstanceUID}",
         "-k", "Modality=SR", "-k", "SeriesInstanceUID", "-k", "SeriesDescription",
         "127.0.0.1", str(node.port)],
        capture_output=True, text=True, timeout=60)
    assert found.returncode == 0, found.stderr
    answers = [pydicom.dcmread(p) for p in sorted(out.iterdir())]
    assert len(answers) == sum(1 for r in results if r["modality"] == "SR")
    assert all(a.Modality == "SR" for a in answers)

    moved = subprocess.run(
        [dcmtk("movescu"), "-S", "-aet", "VIEWER", "-aec", "PACSNODE", "-aem", "RECEIVER",
         "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={image.StudyInstanceUID}",
         "127.0.0.1", str(node.port)],
        capture_output=True, text=True, timeout=120)
    assert moved.returncode == 0, moved.stdout + moved.stderr
    received = {str(ds.SOPInstanceUID) for ds in receiver.received()}
    assert received == {str(image.SOPInstanceUID)} | {r["sop_instance_uid"] for r in results}

    got_dir = tmp_path / "get"
    got_dir.mkdir()
    got = subprocess.run(
        [dcmtk("getscu"), "-S", "-aet", "VIEWER", "-aec", "PACSNODE", "-od", str(got_dir),
         "-k", "QueryRetrieveLevel=SERIES", "-k", f"StudyInstanceUID={image.StudyInstanceUID}",
         "-k", f"SeriesInstanceUID={answers[0].SeriesInstanceUID}", "127.0.0.1", str(node.port)],
        capture_output=True, text=True, timeout=120)
    assert got.returncode == 0, got.stdout + got.stderr
    assert [pydicom.dcmread(p).Modality for p in got_dir.iterdir()] == ["SR"]
