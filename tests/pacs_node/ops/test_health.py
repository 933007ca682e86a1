"""``/healthz`` and ``/metrics`` reflect the whole node, and ``config check`` catches what would stop it
working before it starts; a worker killed mid-job has its job run again within seconds."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.pacs_node.helpers import Node, make_cr, storescu

pytest.importorskip("pacs_node.results", reason="the result builders (pacs_node.results) are not installed")


def healthz(node: Node) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{node.http_port}/healthz", timeout=10) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def wait_health(node: Node, predicate: Callable[[int, dict[str, Any]], bool], timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            status, body = healthz(node)
        except urllib.error.URLError:  # the HTTP port opens just after the DICOM port
            status, body = 0, {}
        if status and predicate(status, body):
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"/healthz stayed {status} {body}\n--- node log ---\n{node.log()[-3000:]}")
        time.sleep(0.3)


def test_a_missing_bundle_fails_config_check_and_health(make_node: Callable[..., Node], tmp_path: Path) -> None:
    node = make_node(start=False)
    missing = tmp_path / "no-bundle-here"
    node.config.write_text(node.config.read_text().replace('bundle = "fake"', f'bundle = "{missing}"'))
    check = node.cli("config", "check", check=False)
    assert check.returncode == 2 and "pipeline.bundle" in check.stderr and str(missing) in check.stderr

    node.start()
    body = wait_health(node, lambda status, body: status == 503
                       and "pipeline.bundle" in body["checks"]["workers"].get("error", ""))
    workers = body["checks"]["workers"]
    assert workers["ready"] == 0 and "pipeline.bundle" in workers["error"]
    assert body["checks"]["database"]["ok"] and body["checks"]["listener"]["ok"]
    assert body["checks"]["exporters"]["ok"]  # export runs: results already made still go out
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{node.http_port}/metrics", timeout=10).read().decode()
    failures = [line for line in metrics.splitlines()
                if line.startswith('pacs_node_pipeline_load_failures_total{error="PipelineUnavailable"}')]
    assert failures and float(failures[0].split()[1]) >= 1, failures
    assert 'pacs_node_processes_alive{role="worker",state="ready"} 0.0' in metrics


def test_health_and_metrics_of_a_working_node(make_node: Callable[..., Node]) -> None:
    node = make_node()
    body = wait_health(node, lambda status, body: status == 200)
    assert body["checks"]["workers"]["ready"] == 1 and body["checks"]["exporters"]["ready"] == 1
    assert body["checks"]["destinations"] == {"ok": True, "critical": False, "configured": ["receiver"], "down": []}
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{node.http_port}/metrics", timeout=10).read().decode()
    for line in ('pacs_node_processes_alive{role="worker",state="ready"} 1.0',
                 'pacs_node_processes_alive{role="exporter",state="ready"} 1.0',
                 'pacs_node_destination_up{destination="receiver"} 1.0',
                 'pacs_node_oldest_waiting_job_seconds{kind="analyse"} 0.0'):
        assert line in metrics, line


def test_a_worker_killed_mid_job_has_its_job_run_again_within_seconds(make_node: Callable[..., Node],
                                                                      tmp_path: Path) -> None:
    # A lease far longer than the test: only the supervisor's release can bring the job back in time.
    # Two workers: the survivor takes the job at once (a restarted one would first spend its start-up).
    node = make_node(env={"PACS_NODE__WORKER__LEASE_SECONDS": "600", "PACS_NODE__PIPELINE__FAKE_DELAY_S": "2",
                          "PACS_NODE__WORKER__COUNT": "2"}, with_peer=False)
    wait_health(node, lambda status, body: status == 200 and body["checks"]["workers"]["ready"] == 2, timeout=90)
    make_cr(tmp_path / "cr.dcm")
    assert storescu(node.port, [tmp_path / "cr.dcm"]).returncode == 0
    running = node.wait_jobs(lambda jobs: any(j["state"] == "running" for j in jobs), timeout=30)
    owner = running[0]["lease_owner"]
    pid = int(owner.split(":")[1])
    os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    # handed back at once (not after the 600 s lease), for the next worker to take
    node.wait_jobs(lambda jobs: jobs[0]["state"] != "running" or jobs[0]["lease_owner"] != owner, timeout=5)
    released_s = time.monotonic() - killed_at
    jobs = node.wait_jobs(lambda jobs: jobs[0]["state"] == "done", timeout=90)  # far inside the 600 s lease
    again_s = time.monotonic() - killed_at
    print(f"released {released_s:.1f}s after kill -9, done again {again_s:.1f}s after (2 s of it the analysis)")
    assert jobs[0]["attempts"] == 2 and jobs[0]["lease_owner"] is None
    assert "released 1 job(s) held by worker pid" in node.log()
