"""Configuration: defaults run a node, every bad value names its key, the environment overrides."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from pacs_node.config import EXAMPLE_TOML, ConfigError, NodeConfig, Settings, load_settings, usable_cpus
from tests.support import REPO


def _error(tmp_path: Path, text: str) -> str:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    return str(info.value)


def test_defaults_make_a_working_local_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    s = load_settings(None)
    assert s.node.port == 11112 and s.http.bind == "127.0.0.1"
    assert s.database_url == f"sqlite:///{tmp_path / 'var' / 'node.sqlite3'}"
    assert s.store_path == tmp_path / "var" / "store"
    assert s.bundle_path is not None and s.bundle_path.parts[-3:] == ("pipelines", "bundles", "demo")


def test_example_file_is_valid_and_equals_the_defaults() -> None:
    assert Settings(**tomllib.loads(EXAMPLE_TOML)) == Settings()


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ("[node]\nport = 70000\n", "node.port:"),
        ("[node]\nae_title = \"WAY_TOO_LONG_AE_TITLE\"\n", "node.ae_title:"),
        ("[pipeline]\ndevice = \"tpu\"\n", "pipeline.device:"),
        ("[worker]\nmax_atempts = 3\n", "worker.max_atempts: unknown key"),
        ("[results]\nkos_threshold = 1.5\n", "results.kos_threshold:"),
        ("[policy]\nnon_chest = \"maybe\"\n", "policy.non_chest:"),
        ("[peers.pacs]\nae_title = \"PACS\"\nhost = \"10.0.0.1\"\n", "peers.pacs.port:"),
        ("[routing]\nalways = [\"nowhere\"]\n", "routing.always: unknown peer 'nowhere'"),
        ("[node]\nlistener_processes = 0\n", "node.listener_processes:"),
        ("[node]\nlistener_processes = \"many\"\n", "node.listener_processes:"),
    ],
)
def test_bad_value_names_its_key(tmp_path: Path, toml: str, key: str) -> None:
    assert key in _error(tmp_path, toml)


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    message = _error(tmp_path, "[node\nport = 1\n")
    assert "c.toml" in message and "TOML" in message


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[node]\nport = 104\nae_title = \"FROMFILE\"\n")
    monkeypatch.setenv("PACS_NODE__NODE__PORT", "2104")
    s = load_settings(path)
    assert (s.node.port, s.node.ae_title) == (2104, "FROMFILE")
    monkeypatch.setenv("PACS_NODE__NODE__PORT", "not-a-port")
    with pytest.raises(ConfigError, match="node.port:"):
        load_settings(path)


def test_cli_exits_2_with_the_key(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[node]\nport = 0\n")
    result = subprocess.run([sys.executable, "-m", "pacs_node", "--config", str(path), "config", "check"],
                            capture_output=True, text=True, cwd=tmp_path, env={"PYTHONPATH": str(REPO), "PATH": ""})
    assert result.returncode == 2
    assert "node.port:" in result.stderr


def test_config_init_writes_a_file_config_check_accepts(tmp_path: Path) -> None:
    env = {"PYTHONPATH": str(REPO), "PATH": ""}
    run = lambda *a: subprocess.run([sys.executable, "-m", "pacs_node", *a], capture_output=True,  # noqa: E731
                                    text=True, cwd=tmp_path, env=env)
    assert run("config", "init").returncode == 0
    assert run("config", "init").returncode == 2  # never overwrites silently
    checked = run("--config", "pacs-node.toml", "config", "check")
    assert checked.returncode == 0, checked.stderr
    assert "configuration OK" in checked.stdout


def test_auto_listener_processes_count_the_cpus_this_process_may_use(monkeypatch: pytest.MonkeyPatch) -> None:
    # Pinned to 4 CPUs of a 64-core host (taskset, a cpuset): auto counts the 4, not the 64.
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert usable_cpus(own_cgroup=Path("/nonexistent")) == 4
    assert NodeConfig(listener_processes="auto").listener_process_count() <= 4
    assert NodeConfig(listener_processes=3).listener_process_count() == 3


def test_usable_cpus_honour_the_cgroup_cpu_quota(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    v2 = tmp_path / "v2"
    (v2 / "node" / "pacs").mkdir(parents=True)
    (v2 / "node" / "pacs" / "cpu.max").write_text("max 100000\n")  # no limit of its own...
    (v2 / "node" / "cpu.max").write_text("150000 100000\n")  # ...but its parent's 1.5 CPUs
    own = tmp_path / "cgroup-v2"
    own.write_text("0::/node/pacs\n")
    assert usable_cpus(v2, own) == 2
    v1 = tmp_path / "v1"
    (v1 / "cpu,cpuacct" / "docker" / "c1").mkdir(parents=True)
    (v1 / "cpu,cpuacct" / "docker" / "c1" / "cpu.cfs_quota_us").write_text("300000\n")
    (v1 / "cpu,cpuacct" / "docker" / "c1" / "cpu.cfs_period_us").write_text("100000\n")
    own.write_text("4:memory:/docker/c1\n2:cpu,cpuacct:/docker/c1\n")
    assert usable_cpus(v1, own) == 3
    (v1 / "cpu,cpuacct" / "docker" / "c1" / "cpu.cfs_quota_us").write_text("-1\n")
    assert usable_cpus(v1, own) == 64
