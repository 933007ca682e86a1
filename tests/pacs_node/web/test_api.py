"""The admin API's operations on a real queue: cancel a running job, run a done one again, re-analyse,
resend, find studies; and the HTTP port over TLS."""

from __future__ import annotations

from pathlib import Path

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient

from tests.pacs_node.helpers import make_cr
from tests.pacs_node.web.conftest import Web, serve_web
from tests.reliability.certs import KEY_PASSWORD, make_certs


def test_queue_and_study_operations(web: Web, tmp_path: Path) -> None:
    image = make_cr(tmp_path / "a.dcm", seed=5)
    DICOMwebClient(web.dicomweb, headers=web.admin).store_instances([pydicom.dcmread(tmp_path / "a.dcm")])
    api = web.base + "/api"
    (job,) = requests.get(api + "/queue", params={"kind": "analyse"}, headers=web.reader, timeout=10).json()
    # a running job is cancelled: its worker loses the lease, so its result would not count
    (claimed,) = web.runtime.queue.claim("w1", ["analyse"])
    assert requests.post(f"{api}/queue/{job['id']}/cancel", headers=web.admin, timeout=10).json()["ok"]
    assert not web.runtime.queue.complete(claimed.id, "w1")
    assert requests.get(f"{api}/queue/{job['id']}", headers=web.reader, timeout=10).json()["state"] == "cancelled"
    # retried, finished, then run again from done
    assert requests.post(f"{api}/queue/{job['id']}/retry", headers=web.admin, timeout=10).json()["ok"]
    (claimed,) = web.runtime.queue.claim("w1", ["analyse"])
    assert web.runtime.queue.complete(claimed.id, "w1")
    assert requests.post(f"{api}/queue/{job['id']}/retry", headers=web.admin, timeout=10).json()["ok"]
    assert requests.get(api + "/queue/counts", headers=web.reader, timeout=10).json()["queued"] == 1
    assert requests.get(f"{api}/queue/999", headers=web.reader, timeout=10).status_code == 404
    # studies by accession number or patient ID (in the body, not the URL), and the study's report
    by_accession = requests.post(api + "/studies/find", json={"accession_number": "A00005"}, headers=web.reader,
                                 timeout=10).json()
    by_patient = requests.post(api + "/studies/find", json={"patient_id": "SYN00005"}, headers=web.reader,
                               timeout=10).json()
    assert [s["study_instance_uid"] for s in by_accession] == [s["study_instance_uid"] for s in by_patient] == \
        [image.StudyInstanceUID]
    report = requests.get(f"{api}/studies/{image.StudyInstanceUID}", headers=web.reader, timeout=10).json()
    assert report[0]["sop_instance_uid"] == image.SOPInstanceUID and report[0]["analysis"][0]["state"] == "queued"
    # actions: re-analyse queues it; resending a study without results yet, or to no such peer, is refused
    study = f"{api}/studies/{image.StudyInstanceUID}"
    assert requests.post(study + "/reanalyse", headers=web.admin, timeout=10).json()["count"] == 1
    assert requests.post(study + "/resend", json={"peer": "nowhere"}, headers=web.admin, timeout=10).status_code == 404
    assert requests.get(api + "/stats", headers=web.reader, timeout=10).json()["instances"][0]["count"] == 1
    assert requests.post(api + "/peers/nowhere/echo", headers=web.reader, timeout=10).status_code == 404


def test_https_when_configured(tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "certs")
    server, web = serve_web(tmp_path, tls={"cert_file": certs.server.cert, "key_file": certs.server.key,
                                           "key_password": KEY_PASSWORD})
    try:
        url = f"https://localhost:{server.port}/healthz"
        assert requests.get(url, verify=str(certs.ca), timeout=10).json()["checks"]["database"]["ok"] is True
        assert requests.get(f"https://localhost:{server.port}/api/stats", headers=web.reader, verify=str(certs.ca),
                            timeout=10).ok
    finally:
        server.stop()
        web.runtime.close()
