"""The deployment files are valid as far as this machine can tell without a container engine: the compose
file passes ``docker-compose config``, the TOML it mounts is a valid configuration, the images copy only
what exists, and the systemd units run commands the CLI has."""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess

import pytest

from pacs_node.config import load_settings
from tests.support import REPO

DEPLOY = REPO / "deploy"


def test_compose_file_validates() -> None:
    tool = shutil.which("docker-compose")
    if tool is None:
        pytest.skip("docker-compose is not installed (apt-get install docker-compose)")
    env = {**os.environ, "POSTGRES_PASSWORD": "not-a-real-password"}
    done = subprocess.run([tool, "-f", str(DEPLOY / "compose.yaml"), "config", "-q"], check=False, capture_output=True,
                          text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    # without the password it refuses to start rather than run PostgreSQL with an empty one
    env.pop("POSTGRES_PASSWORD")
    refused = subprocess.run([tool, "-f", str(DEPLOY / "compose.yaml"), "config", "-q"], check=False, capture_output=True,
                             text=True, env=env, timeout=60)
    assert refused.returncode != 0 and "POSTGRES_PASSWORD" in refused.stderr


def test_compose_configuration_is_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PACS_NODE__DATABASE__URL", "postgresql+psycopg://pacs:pw@postgres:5432/pacs")
    settings = load_settings(DEPLOY / "pacs-node.compose.toml")
    assert settings.worker.count == 0 and settings.routing.always == ["orthanc"]
    assert settings.database_url.startswith("postgresql+psycopg://")
    assert settings.http.bind == "0.0.0.0"  # the prometheus container scrapes it over the compose network


def test_compose_services_run_as_written() -> None:
    """Read without a container engine: every image a service runs is built by that service, the default
    worker needs no GPU, and Prometheus scrapes the listener's metrics port."""
    yaml = pytest.importorskip("yaml")
    services = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    built = {service["image"] for service in services.values() if "build" in service and "image" in service}
    for name, service in services.items():
        if service.get("image", "").startswith("pacs-node"):
            assert "build" in service and service["image"] in built, f"{name} runs an image it does not build"
    assert "deploy" not in services["worker"] and services["worker"]["command"] == ["worker"]
    assert services["worker-gpu"]["profiles"] == ["gpu"]
    assert "8731" in services["listener"]["expose"]
    scrape = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())["scrape_configs"][0]
    assert scrape["static_configs"][0]["targets"] == ["listener:8731"]


def test_dashboard_queries_metrics_the_node_exports() -> None:
    import json

    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "pacs-node.json").read_text())
    queried = {name for panel in dashboard["panels"] for target in panel["targets"]
               for name in re.findall(r"pacs_node_[a-z_]+", target["expr"])}
    sources = "".join((REPO / "pacs_node" / "ops" / module).read_text() for module in ("metrics.py", "health.py"))
    exported = set(re.findall(r'"(pacs_node_[a-z_]+)"', sources))
    suffixes = ("_bucket", "_total")
    missing = {name for name in queried
               if name not in exported and not any(name.removesuffix(s) in exported for s in suffixes)}
    assert queried and not missing, missing


@pytest.mark.parametrize("dockerfile", ["Dockerfile.listener", "Dockerfile.worker"])
def test_dockerfiles_copy_what_exists(dockerfile: str) -> None:
    text = (DEPLOY / dockerfile).read_text()
    sources = [part for line in re.findall(r"^COPY (.+)$", text, re.MULTILINE) for part in line.split()[:-1]]
    assert sources and all((REPO / source).exists() for source in sources), sources
    assert "torch==2.14.1" in text


def test_systemd_units_run_real_commands() -> None:
    from typer.main import get_command

    from pacs_node.cli.main import app

    commands = set(get_command(app).commands)  # type: ignore[attr-defined]
    units = sorted((DEPLOY / "systemd").glob("*.service"))
    assert units
    for unit in units:
        parser = configparser.ConfigParser(strict=False, interpolation=None)
        parser.optionxform = str  # type: ignore[assignment,method-assign]
        parser.read(unit)
        assert parser.has_section("Unit") and parser.has_section("Service"), unit.name
        for key in ("ExecStartPre", "ExecStart"):
            if parser.has_option("Service", key):
                subcommand = parser.get("Service", key).split()[1]
                assert subcommand in commands, f"{unit.name}: {key} runs unknown `pacs-node {subcommand}`"
