"""Fixtures of the node tests: a ``pacs-node serve`` subprocess and a DCMTK receiver, always stopped."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.pacs_node.helpers import Node, StoreSCP, base_config, new_ports, write_config
from tests.storage.conftest import pg_server, pg_url  # noqa: F401 (fixtures: a private PostgreSQL schema)
from tests.support import dcmtk


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """``database.url`` for the node: a SQLite file, or a private PostgreSQL schema (skipped with the
    reason when PostgreSQL is unreachable)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'var' / 'node.sqlite3'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def ports() -> tuple[int, int, int]:
    return new_ports()


@pytest.fixture
def receiver(tmp_path: Path, ports: tuple[int, int, int]) -> Iterator[StoreSCP]:
    dcmtk("storescp")
    scp = StoreSCP(tmp_path / "received", ports[2]).start()
    yield scp
    scp.stop()


@pytest.fixture
def make_node(tmp_path: Path, ports: tuple[int, int, int]) -> Iterator[Callable[..., Node]]:
    """``make_node(extra_toml)`` -> a started node on ``ports[0]`` (HTTP on ``ports[1]``); peer
    ``receiver`` is the DCMTK storescp on ``ports[2]``."""
    nodes: list[Node] = []
    peer = f"""
[peers.receiver]
ae_title = "RECEIVER"
host = "127.0.0.1"
port = {ports[2]}
"""

    def factory(extra: str = "", *, start: bool = True, with_peer: bool = True,
                env: dict[str, str] | None = None, poll_interval_s: float = 0.1) -> Node:
        directory = tmp_path / f"node{len(nodes)}"
        directory.mkdir()
        config = write_config(directory, base_config(directory / "var", ports[0], ports[1],
                                                     extra=(peer if with_peer else "") + extra,
                                                     poll_interval_s=poll_interval_s))
        node = Node(directory, config, ports[0], ports[1], directory / "serve.log", env=dict(env or {}))
        nodes.append(node)
        return node.start() if start else node

    yield factory
    for node in nodes:
        node.stop()
