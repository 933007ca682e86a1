"""A PACS outage loses no result: the destination is marked down, waits without spending attempts, is
probed with C-ECHO, and gets every result once when it answers, with no person involved. Real peers:
DCMTK storescu sends, a DCMTK storescp is the PACS that goes away and comes back."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.pacs_node.helpers import Node, StoreSCP, make_cr, storescu

pytest.importorskip("pacs_node.results", reason="the result builders (pacs_node.results) are not installed")

#: A day-long policy scaled down ~10,000 times: 4 attempts within about 2 seconds. Without the
#: destination marked down, every result would be dead long before the "two hour" outage below ends.
SCALED_POLICY = """
[export]
retry = { attempts = 4, first_delay_s = 0.2, growth = 2.0, max_delay_s = 1.0 }
down_after_failures = 2
probe_interval_s = 1.0
timeout_s = 5
"""
OUTAGE_S = 6.0  # "two hours" at this scale: three times the whole retry policy


def _wait(predicate: Callable[[], bool], timeout: float, what: str, node: Node) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"{what} never happened\n--- node log ---\n{node.log()[-4000:]}")


def test_a_peer_down_for_hours_gets_every_result_once_when_it_returns(
        make_node: Callable[..., Node], ports: tuple[int, int, int], tmp_path: Path) -> None:
    node = make_node(SCALED_POLICY)
    images = [make_cr(tmp_path / f"cr{i}.dcm", seed=i) for i in range(3)]
    sent = storescu(node.port, [tmp_path / f"cr{i}.dcm" for i in range(3)], calling="RECEIVER")
    assert sent.returncode == 0, sent.stderr

    _wait(lambda: node.query("SELECT * FROM destinations WHERE name = 'receiver' AND state = 'down'"),
          120, "the receiver marked down", node)
    time.sleep(OUTAGE_S)
    exports = node.query("SELECT state, attempts, max_attempts FROM jobs WHERE kind = 'export'")
    assert exports and all(j["state"] in ("failed", "queued") for j in exports), exports
    assert all(j["attempts"] < j["max_attempts"] for j in exports), "the outage spent the retry budget"

    pacs = StoreSCP(tmp_path / "pacs", ports[2]).start()
    try:
        _wait(lambda: all(j["state"] == "done" for j in node.query("SELECT state FROM jobs WHERE kind = 'export'")),
              60, "every export done", node)
        received = pacs.received()
    finally:
        pacs.stop()
    expected = {r["sop_instance_uid"] for r in node.query("SELECT sop_instance_uid FROM instances WHERE origin = 'result'")}
    uids = [str(ds.SOPInstanceUID) for ds in received]
    assert sorted(uids) == sorted(expected) and len(uids) == len(set(uids)), "each result exactly once"
    assert {str(ds.StudyInstanceUID) for ds in received} == {str(ds.StudyInstanceUID) for ds in images}
    assert node.query("SELECT state FROM destinations WHERE name = 'receiver'") == [{"state": "up"}]
    deliveries = node.query("SELECT state, delivered_at FROM deliveries WHERE destination = 'receiver'")
    assert len(deliveries) == len(expected) and all(d["state"] == "done" and d["delivered_at"] for d in deliveries)
    assert "answers again" in node.log()

    # The queue forgets; the history does not: `results` still says what was analysed and sent where.
    node.cli("queue", "purge", "--older-than", "0s")
    assert node.query("SELECT count(*) AS n FROM jobs") == [{"n": 0}]
    for image in images:
        (item,) = node.cli_json("results", str(image.StudyInstanceUID))
        assert [a["state"] for a in item["analysis"]] == ["done"]
        assert item["results"] and all(
            [(e["destination"], e["state"]) for e in r["exports"]] == [("receiver", "done")]
            and e["delivered_at"].endswith("+00:00") and e["attempts"] >= 1
            for r in item["results"] for e in r["exports"])
    stats = node.cli_json("stats")
    assert stats["analyses"] == {"done": 3}
