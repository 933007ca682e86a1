"""The benchmarks run end to end at a tiny size, so they cannot rot between the runs that measure.

They start real processes (``pacs-node serve``, DCMTK ``storescp``/``storescu``, or pynetdicom peers where
a GPU host has no DCMTK) over loopback, exactly as a measuring run does; only the sizes are small. Figures are not asserted (speed is not a unit-test
property), only that each benchmark completes and reports what it promises.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.common import BenchError, dcmtk
from tests.support import REPO

pytestmark = pytest.mark.slow


@pytest.fixture
def dcmtk_tools() -> None:
    for tool in ("storescp", "storescu"):
        try:
            dcmtk(tool)
        except BenchError as exc:
            pytest.skip(str(exc))


def run_bench(module: str, *args: str, timeout: float = 300) -> dict:
    """Run ``python -m bench.<module> args``; its JSON line, parsed (the table follows it)."""
    result = subprocess.run([sys.executable, "-m", f"bench.{module}", *args], cwd=REPO,
                            capture_output=True, text=True, timeout=timeout, check=False)
    assert result.returncode == 0, f"bench.{module} failed:\n{result.stdout}\n{result.stderr}"
    first = result.stdout.splitlines()[0]
    assert "images/s" in result.stdout or "p50" in result.stdout  # the human table is there too
    return json.loads(first)


@pytest.mark.usefixtures("dcmtk_tools")
def test_ingest_bench_runs_tiny(tmp_path: Path) -> None:
    out = run_bench("ingest", "--tiny", "--count", "3", "--senders", "2",
                    "--workdir", str(tmp_path / "work"), "--cache", str(tmp_path / "cache"))
    assert out["bench"] == "ingest" and out["count"] == 3 and (out["rows"], out["cols"]) == (64, 48)
    assert {(r["receiver"], r["senders"]) for r in out["results"]} == {
        ("storescp", 1), ("node", 1), ("storescp", 2), ("node", 2), ("export", 1)}
    assert all(r["images"] == 3 and r["mb_s"] >= 0 for r in out["results"])
    # one listener process served every association of the node's phases
    assert {r["senders"]: r["associations_per_process"] for r in out["results"] if r["receiver"] == "node"} == {
        1: [1], 2: [2]}
    assert out["dd_fsync_mb_s"] > 0
    assert set(out["ratios"]) == {"node_vs_storescp_1_sender", "node_vs_storescp_2_senders",
                                  "node_2_senders_vs_dd_fsync", "node_2_senders_vs_1_sender"}
    assert "export_at_least_200_images_s" in out["goals"]
    assert "CPU" in out["device"]
    # nothing left behind in the work directory but empty receiver directories
    assert not [p for p in (tmp_path / "work").rglob("*") if p.is_file()]


@pytest.mark.parametrize("peers", ["dcmtk", "pynetdicom"])  # pynetdicom: what a GPU host without DCMTK runs
def test_e2e_bench_runs_tiny_with_the_fake_pipeline(tmp_path: Path, peers: str, request: pytest.FixtureRequest
                                                    ) -> None:
    if peers == "dcmtk":
        request.getfixturevalue("dcmtk_tools")
    out = run_bench("e2e", "--bundle", "fake", "--rows", "64", "--cols", "48", "--light", "2", "--burst", "2",
                    "--loaded", "2", "--peers", peers, "--timeout", "120",
                    "--workdir", str(tmp_path / "work"), "--cache", str(tmp_path / "cache"))
    assert out["bench"] == "e2e"
    assert out["pipeline"].startswith("FAKE")  # the output says plainly that no model ran
    assert out["peers"].lower().startswith(peers)
    assert out["max_throughput_images_s"] > 0
    for phase in out["latency"].values():
        assert phase["n"] == 2
        assert 0 < phase["p50_s"] <= phase["p95_s"] <= phase["p99_s"] <= phase["max_s"]


def test_results_bench_runs_tiny() -> None:
    out = run_bench("results", "--images", "2", "--processes", "0,1")
    assert out["bench"] == "results" and set(out["by_processes"]) == {"0", "1"}
    assert all(r["images_per_s"] > 0 and r["objects_per_image"] >= 2 for r in out["by_processes"].values())


def test_training_bench_runs_tiny() -> None:
    out = run_bench("training", "--preset", "tiny", "--stage", "heads", "--steps", "4", "--warmup", "1",
                    "--batch", "4", "--count", "8", "--procs", "1")
    assert out["bench"] == "training" and [r["procs"] for r in out["runs"]] == [1]
    assert out["runs"][0]["images_per_s_per_process"] > 0


@pytest.mark.usefixtures("dcmtk_tools")
def test_stow_bench_runs_tiny(tmp_path: Path) -> None:
    out = run_bench("stow", "--count", "2", "--rows", "64", "--cols", "48",
                    "--workdir", str(tmp_path / "work"), "--cache", str(tmp_path / "cache"))
    assert out["bench"] == "stow" and out["count"] == 2
    assert [r["path"] for r in out["results"]] == ["storescu", "stow-1-request", "stow-per-image"]
    assert all(r["images"] == 2 for r in out["results"])
    assert set(out["ratios"]) == {"stow-1-request_vs_storescu", "stow-per-image_vs_storescu"}


def test_lockout_bench_runs_tiny(dcmtk_tools: None) -> None:
    out = run_bench("lockout", "--tricklers", "4", "--trickle-s", "0.5", "--idlers", "2", "--reopen-s", "0.5",
                    "--duration-s", "2", "--deadline-s", "1", "--every-s", "1")
    assert out["bench"] == "lockout" and out["sends"] >= 1 and out["failed"] == 0
    assert out["attack_connections"] >= 6


@pytest.mark.usefixtures("dcmtk_tools")
def test_export_bench_runs_tiny(tmp_path: Path) -> None:
    out = run_bench("export", "--images", "2", "--rate", "20", "--workdir", str(tmp_path / "work"))
    assert out["bench"] == "export" and out["images"] == 2
    ((checkout, runs),) = out["runs"].items()  # no --compare: this checkout only
    assert Path(checkout) == REPO and len(runs) == 1
    assert {phase: figures["results"] for phase, figures in runs[0].items()} == {"backlog": 8, "paced": 8}
    assert all(figures["cpu_ms_per_result"] > 0 for figures in runs[0].values())


@pytest.mark.usefixtures("dcmtk_tools")
def test_qr_bench_runs_tiny(tmp_path: Path) -> None:
    out = run_bench("qr", "--count", "3", "--repeat", "1",
                    "--workdir", str(tmp_path / "work"), "--cache", str(tmp_path / "cache"))
    assert out["bench"] == "qr" and out["count"] == 3
    assert set(out["results"]) == {"node", "dcmqrscp"}
    assert all(r["find_s"] > 0 and r["move_instances_s"] > 0 for r in out["results"].values())
    assert set(out["goals"]) == {"find_3_matches_within_1_s", "move_at_least_200_instances_s"}
