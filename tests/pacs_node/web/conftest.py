"""Fixtures of the web tests: the HTTP application served by uvicorn in this process (no listener, no
workers: what STOW/QIDO/WADO, auth and the API need), with an admin and a read-only token."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pacs_node.config import Settings
from pacs_node.ops.context import ServerContext
from pacs_node.web.auth import hash_secret
from pacs_node.web.server import WebServer
from tests.support import free_port

ADMIN_SECRET = "admin-secret-for-tests"
READER_SECRET = "reader-secret-for-tests"


def token_toml() -> str:
    """``[[http.tokens]]`` of the two test tokens (for a ``pacs-node serve`` subprocess)."""
    return f"""
[[http.tokens]]
name = "admin"
role = "admin"
secret_hash = "{hash_secret(ADMIN_SECRET, iterations=1000)}"
[[http.tokens]]
name = "reader"
role = "read-only"
secret_hash = "sha256:{hashlib.sha256(READER_SECRET.encode()).hexdigest()}"
"""


def token_settings() -> list[dict[str, str]]:
    return [
        {"name": "admin", "role": "admin", "secret_hash": hash_secret(ADMIN_SECRET, iterations=1000)},
        {"name": "reader", "role": "read-only",
         "secret_hash": "sha256:" + hashlib.sha256(READER_SECRET.encode()).hexdigest()},
    ]


@dataclass
class Web:
    base: str
    runtime: ServerContext
    settings: Settings

    admin = {"Authorization": f"Bearer {ADMIN_SECRET}"}
    reader = {"Authorization": f"Bearer {READER_SECRET}"}

    @property
    def dicomweb(self) -> str:
        return self.base + "/dicom-web"


def serve_web(tmp_path: Path, **http: object) -> tuple[WebServer, Web]:
    settings = Settings(node={"data_dir": tmp_path / "var"}, store={"min_free_bytes": 0}, pipeline={"bundle": "fake"},
                        http={"port": free_port(), "tokens": token_settings(), **http})
    runtime = ServerContext.open(settings)
    server = WebServer(settings, runtime)
    server.start()
    return server, Web(f"http://127.0.0.1:{server.port}", runtime, settings)


@pytest.fixture
def web(tmp_path: Path) -> Iterator[Web]:
    server, handle = serve_web(tmp_path)
    try:
        yield handle
    finally:
        server.stop()
        handle.runtime.close()
