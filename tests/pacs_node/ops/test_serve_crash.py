"""``kill -9`` of ``pacs-node serve`` in the middle of a 50-image transfer loses no acknowledged image
and processes every one exactly once."""

from __future__ import annotations

import re
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest

from tests.pacs_node.helpers import Node, make_cr, storescu
from tests.support import dcmtk

pytest.importorskip("pacs_node.results", reason="the result builders (pacs_node.results) are not installed")

N_IMAGES = 50
KILL_AFTER_ACKS = 8


def _send_and_kill(node: Node, files: list[Path]) -> set[Path]:
    """Run ``storescu -v`` over ``files``; SIGKILL the node after ``KILL_AFTER_ACKS`` acknowledgements.
    Returns the files storescu saw acknowledged with Success (from its verbose log)."""
    proc = subprocess.Popen(
        [dcmtk("storescu"), "-v", "-aet", "MODALITY", "-aec", "PACSNODE", "127.0.0.1", str(node.port),
         *map(str, files)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    acknowledged: set[Path] = set()
    current: Path | None = None
    killed = threading.Event()
    assert proc.stdout is not None
    for line in proc.stdout:
        sending = re.match(r"I: Sending file: (.+)$", line.rstrip())
        if sending:
            current = Path(sending.group(1))
        elif "Received Store Response (Success)" in line and current is not None:
            acknowledged.add(current)
            if len(acknowledged) >= KILL_AFTER_ACKS and not killed.is_set():
                node.kill9()
                killed.set()
    proc.wait(60)
    assert killed.is_set(), "the transfer finished before the node could be killed; make the images larger"
    return acknowledged


def test_kill9_during_transfer_loses_nothing_and_processes_once(make_node: Callable[..., Node],
                                                                tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    files = []
    for i in range(N_IMAGES):
        path = images / f"cr{i:02d}.dcm"
        make_cr(path, rows=512, cols=512, seed=i)
        files.append(path)

    node = make_node(with_peer=False)
    acknowledged = _send_and_kill(node, files)
    assert KILL_AFTER_ACKS <= len(acknowledged) < N_IMAGES

    node.start()  # same data dir: restart after the crash
    uids = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID: f for f in files}
    acknowledged_uids = {uid for uid, path in uids.items() if path in acknowledged}

    # Every stored image (all acknowledged ones, perhaps one more that was stored but whose response
    # the kill cut off) is analysed once: jobs of the dead worker come back when their lease runs out.
    def all_done(jobs: list[dict]) -> bool:
        return len(jobs) >= len(acknowledged) and all(j["state"] == "done" for j in jobs)

    node.wait_jobs(all_done, timeout=600)
    rows = {r["sop_instance_uid"]: r for r in node.query("SELECT * FROM instances WHERE origin = 'received'")}
    assert acknowledged_uids <= set(rows), "an acknowledged image is missing from the database"
    store = node.directory / "var" / "store"
    for uid, row in rows.items():
        stored = store / row["path"]
        assert stored.is_file() and stored.stat().st_size == row["size_bytes"]
        assert pydicom.dcmread(stored).PixelData == pydicom.dcmread(uids[uid]).PixelData

    # The modality sends again what it already sent: acknowledged, and nothing is analysed twice.
    resent = storescu(node.port, sorted(acknowledged))
    assert resent.returncode == 0, resent.stderr

    jobs = node.query("SELECT sop_instance_uid, state FROM jobs WHERE kind = 'analyse'")
    assert sorted(j["sop_instance_uid"] for j in jobs) == sorted(rows)  # exactly one job per image
    assert {j["state"] for j in jobs} == {"done"}
    per_source = node.query(
        "SELECT source_sop_instance_uid AS uid, COUNT(*) AS n FROM instances WHERE origin = 'result' "
        "GROUP BY source_sop_instance_uid")
    counts = {r["uid"]: r["n"] for r in per_source}
    assert set(counts) == set(rows) and len(set(counts.values())) == 1  # one set of results each
    listed = node.cli_json("queue", "ls", "--kind", "analyse", "--limit", "1000")
    assert len(listed) == len(rows) and {j["state"] for j in listed} == {"done"}
