"""STOW-RS into the node: the C-STORE ingest path (durable, same policy), per-instance answers with the
DIMSE failure reasons, bounded and streamed request bodies."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient

from tests.pacs_node.helpers import make_cr
from tests.pacs_node.web.conftest import Web, serve_web

_FAILED, _REFERENCED, _REASON = "00081198", "00081199", "00081197"


def _multipart(parts: list[bytes], boundary: str = "b0undary") -> tuple[bytes, dict[str, str]]:
    body = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p + b"\r\n" for p in parts)
    body += f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'}


def test_stow_files_like_c_store_and_answers_per_instance(web: Web, tmp_path: Path) -> None:
    chest = make_cr(tmp_path / "chest.dcm", seed=1)
    other = make_cr(tmp_path / "other.dcm", seed=2, study_uid=chest.StudyInstanceUID, body_part="KNEE")
    body, headers = _multipart([(tmp_path / "chest.dcm").read_bytes(), (tmp_path / "other.dcm").read_bytes(),
                                b"this is not DICOM"])
    answer = requests.post(web.dicomweb + "/studies", data=body, headers={**headers, **web.admin}, timeout=30)
    assert answer.status_code == 202  # some stored, one failed
    result = answer.json()
    stored = {item["00081155"]["Value"][0] for item in result[_REFERENCED]["Value"]}
    assert stored == {chest.SOPInstanceUID, other.SOPInstanceUID}
    assert [item[_REASON]["Value"][0] for item in result[_FAILED]["Value"]] == [0xC210]
    assert result["00081190"]["Value"][0].endswith(f"/dicom-web/studies/{chest.StudyInstanceUID}")
    # durable and queued exactly as C-STORE: the file in the store, the chest image queued, the knee not
    jobs = web.runtime.queue.list()
    assert [(j.kind, j.sop_instance_uid) for j in jobs] == [("analyse", chest.SOPInstanceUID)]
    from storage.repository import get_instance

    with web.runtime.read_session() as session:
        row = get_instance(session, chest.SOPInstanceUID)
        knee = get_instance(session, other.SOPInstanceUID)
    assert row is not None and knee is not None and knee.disposition == "not_processed"
    assert pydicom.dcmread(web.runtime.store.path(row.path)).SOPInstanceUID == chest.SOPInstanceUID
    assert row.calling_ae == "admin"
    # no temp file left behind by the refused or the stored parts
    assert not [p for p in web.runtime.incoming_dir.iterdir() if p.is_file()]
    # sending the same instance again is acknowledged (a retried request), not stored twice
    again = requests.post(web.dicomweb + "/studies", data=_multipart([(tmp_path / "chest.dcm").read_bytes()])[0],
                          headers={**headers, **web.admin}, timeout=30)
    assert again.status_code == 200 and len(web.runtime.queue.list()) == 1


def test_stow_to_a_study_refuses_instances_of_another(web: Web, tmp_path: Path) -> None:
    make_cr(tmp_path / "a.dcm", seed=3)
    body, headers = _multipart([(tmp_path / "a.dcm").read_bytes()])
    answer = requests.post(web.dicomweb + "/studies/1.2.3.4", data=body, headers={**headers, **web.admin}, timeout=30)
    assert answer.status_code == 409
    assert answer.json()[_FAILED]["Value"][0][_REASON]["Value"][0] == 0xA900


def test_stow_with_dicomweb_client(web: Web, tmp_path: Path) -> None:
    datasets = [make_cr(tmp_path / f"{i}.dcm", seed=10 + i) for i in range(3)]
    client = DICOMwebClient(web.dicomweb, headers=web.admin)
    result = client.store_instances([pydicom.dcmread(tmp_path / f"{i}.dcm") for i in range(3)])
    assert len(result.ReferencedSOPSequence) == 3
    assert {j.sop_instance_uid for j in web.runtime.queue.list()} == {ds.SOPInstanceUID for ds in datasets}


def test_stow_request_size_is_bounded(tmp_path: Path) -> None:
    server, web = serve_web(tmp_path, max_request_bytes=10_000)
    try:
        make_cr(tmp_path / "big.dcm", seed=4, rows=128, cols=128)  # 32 KiB of pixels
        body, headers = _multipart([(tmp_path / "big.dcm").read_bytes()])
        declared = requests.post(web.dicomweb + "/studies", data=body, headers={**headers, **web.admin}, timeout=30)
        assert declared.status_code == 413
        # chunked (no Content-Length): counted while streaming, refused at the limit, nothing filed
        streamed = requests.post(web.dicomweb + "/studies", data=iter([body[:5000], body[5000:]]),
                                 headers={**headers, **web.admin}, timeout=30)
        assert streamed.status_code == 413
        assert web.runtime.queue.list() == []
        assert not [p for p in web.runtime.incoming_dir.iterdir() if p.is_file()]
    finally:
        server.stop()
        web.runtime.close()


def test_stow_refuses_other_media_types(web: Web) -> None:
    answer = requests.post(web.dicomweb + "/studies", data=b"{}",
                           headers={"Content-Type": "application/json", **web.admin}, timeout=30)
    assert answer.status_code == 415


@pytest.mark.parametrize("what", ["headers", "body"])
def test_a_stalled_client_is_dropped(tmp_path: Path, what: str) -> None:
    server, web = serve_web(tmp_path, header_timeout_s=0.5, read_timeout_s=0.5)
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as conn:
            if what == "headers":
                conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never finished
            else:
                conn.sendall(b"POST /dicom-web/studies HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                             + web.admin["Authorization"].split()[1].encode()
                             + b'\r\nContent-Type: multipart/related; type="application/dicom"; boundary=b\r\n'
                             + b"Content-Length: 100000\r\n\r\n--b\r\n")
            start = time.monotonic()
            data = conn.recv(65536)
            while data and b"408" not in data:
                data = conn.recv(65536)
            assert time.monotonic() - start < 5
    finally:
        server.stop()
        web.runtime.close()


def test_a_full_store_refuses_with_out_of_resources(tmp_path: Path) -> None:
    server, web = serve_web(tmp_path)
    web.runtime.store.min_free_bytes = 2**62  # "less than min_free_bytes free": as the listener, 0xA700
    try:
        make_cr(tmp_path / "a.dcm", seed=6)
        body, headers = _multipart([(tmp_path / "a.dcm").read_bytes()])
        answer = requests.post(web.dicomweb + "/studies", data=body, headers={**headers, **web.admin}, timeout=30)
        assert answer.status_code == 409
        assert answer.json()[_FAILED]["Value"][0][_REASON]["Value"][0] == 0xA700
        assert web.runtime.queue.list() == []
    finally:
        server.stop()
        web.runtime.close()


def test_a_client_that_goes_away_mid_request_leaves_nothing(web: Web, tmp_path: Path) -> None:
    make_cr(tmp_path / "a.dcm", seed=8)
    body, headers = _multipart([(tmp_path / "a.dcm").read_bytes()])
    port = int(web.base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        head = (f"POST /dicom-web/studies HTTP/1.1\r\nHost: x\r\n{'Authorization'}: {web.admin['Authorization']}\r\n"
                f"Content-Type: {headers['Content-Type']}\r\nContent-Length: {len(body)}\r\n\r\n")
        conn.sendall(head.encode() + body[: len(body) // 2])
    deadline = time.monotonic() + 10
    while [p for p in web.runtime.incoming_dir.iterdir() if p.is_file()] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in web.runtime.incoming_dir.iterdir() if p.is_file()]
    assert web.runtime.queue.list() == []
    checks = requests.get(web.base + "/healthz", timeout=10).json()["checks"]  # no worker runs here: 503
    assert checks["database"]["ok"] and checks["store_writable"]["ok"]
