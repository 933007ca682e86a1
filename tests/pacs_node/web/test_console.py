"""The console in a real headless Chromium (Debian's, driven by Playwright): sign in, find a study by
accession number, see the region boxes drawn on the image and the report, retry a failed export once
the destination is back, re-analyse the study. A screenshot of the study page is left in the test's
temporary directory."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.pacs_node.helpers import Node, StoreSCP, base_config, make_cr, new_ports, wait_for_port, write_config
from tests.support import dcmtk
from tests.pacs_node.web.conftest import ADMIN_SECRET, token_toml

CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[Node, int]]:
    port, http_port, receiver_port = new_ports()
    extra = f"""
[peers.receiver]
ae_title = "RECEIVER"
host = "127.0.0.1"
port = {receiver_port}
[routing]
always = ["receiver"]
[export]
retries = 1
{token_toml()}"""
    node = Node(tmp_path, write_config(tmp_path, base_config(tmp_path / "var", port, http_port, extra=extra)),
                port, http_port, tmp_path / "serve.log")
    node.start()
    try:
        wait_for_port(http_port, proc=node.proc)
        yield node, receiver_port
    finally:
        node.stop()


def _wait(node: Node, sql: str, timeout: float = 180) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = node.query(sql)
        if rows:
            return rows
        time.sleep(0.2)
    raise AssertionError(f"never: {sql}\n--- node log ---\n{node.log()[-4000:]}")


def test_console_study_page_and_actions(node: tuple[Node, int], tmp_path: Path) -> None:
    playwright = pytest.importorskip("playwright.sync_api")
    if not CHROMIUM.is_file():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    dcmtk("storescp")
    server, receiver_port = node
    base = f"http://127.0.0.1:{server.http_port}"
    image = make_cr(tmp_path / "cr.dcm", seed=42, rows=320, cols=280)
    body = (b"--b\r\nContent-Type: application/dicom\r\n\r\n" + (tmp_path / "cr.dcm").read_bytes() + b"\r\n--b--\r\n")
    stored = requests.post(base + "/dicom-web/studies", data=body, timeout=30, headers={
        "Authorization": f"Bearer {ADMIN_SECRET}", "Content-Type": 'multipart/related; type="application/dicom"; boundary=b'})
    assert stored.status_code == 200
    # analysed, and every export to the (not yet running) receiver dead after its one attempt
    _wait(server, "SELECT id FROM jobs WHERE kind = 'analyse' AND state = 'done'")
    # (the export jobs were queued with the analysis; the exporter may take them in more than one batch)
    _wait(server, "SELECT 1 AS ended WHERE NOT EXISTS (SELECT 1 FROM jobs WHERE kind = 'export' AND state <> 'dead')")
    dead = server.query("SELECT id FROM jobs WHERE kind = 'export' AND state = 'dead' ORDER BY id")
    analysed_at = server.query("SELECT finished_at FROM jobs WHERE kind = 'analyse'")[0]["finished_at"]

    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(base + "/console/")
            page.fill("input[name=name]", "admin")
            page.fill("input[name=secret]", ADMIN_SECRET)
            page.click("button[type=submit]")
            page.wait_for_selector("#counts")
            page.fill("input[name=accession_number]", "A00042")
            page.click("text=Find study")
            page.wait_for_selector("svg.boxes[data-drawn]")
            assert page.url == f"{base}/console/studies/{image.StudyInstanceUID}"  # no patient data in the URL
            assert page.locator("svg.boxes rect").count() == 3  # the fake model's three reported regions
            assert "unremarkable" in page.inner_text(".report")
            assert "Cardiomegaly" in page.inner_text("table.findings")
            assert "NOT FOR CLINICAL USE" in page.inner_text("body")
            page.screenshot(path=str(tmp_path / "study.png"), full_page=True)

            # the destination comes back; retrying its dead export from the page delivers it
            receiver = StoreSCP(tmp_path / "received", receiver_port).start()
            try:
                page.click(f"button[data-job='{dead[0]['id']}']")
                page.wait_for_selector("svg.boxes[data-drawn]")
                _wait(server, f"SELECT id FROM jobs WHERE id = {dead[0]['id']} AND state = 'done'")
                assert len(receiver.received()) == 1
            finally:
                receiver.stop()

            page.click("#reanalyse")
            page.wait_for_selector("svg.boxes[data-drawn]")
            _wait(server, f"SELECT id FROM jobs WHERE kind = 'analyse' AND state = 'done' "
                          f"AND finished_at > '{analysed_at}'")
        finally:
            browser.close()
    assert (tmp_path / "study.png").stat().st_size > 10_000
    # the CLI runs the same operations
    found = server.cli_json("results", "--accession", "A00042")
    assert [s["study_instance_uid"] for s in found] == [image.StudyInstanceUID]
    assert len(found[0]["instances"][0]["results"]) == len(dead)
    assert server.cli_json("resend", image.StudyInstanceUID, "--peer", "receiver") == {"queued": len(dead)}
    assert server.cli_json("reanalyse", image.StudyInstanceUID) == {"queued": 1}
