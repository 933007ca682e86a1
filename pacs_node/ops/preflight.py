"""What ``pacs-node config check`` verifies beyond the schema, without starting anything: the things that
would otherwise only show once the node runs (a worker crash-looping on a missing bundle, an export that
fails on an unreadable CA file, a database URL for a server this node cannot use).

Each problem names its config key, so the fix is obvious: ``pipeline.bundle: ... manifest.json: missing``.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from pacs_node.config import Settings

#: Database dialects the node runs on (storage.db configures these two, and only these).
SUPPORTED_DIALECTS = ("sqlite", "postgresql")


@dataclass(frozen=True)
class Problem:
    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.key}: {self.message}"


def _bundle(settings: Settings) -> list[Problem]:
    bundle = settings.bundle_path
    if bundle is None:
        return []
    if not bundle.is_dir():
        return [Problem("pipeline.bundle", f"{bundle} is not a directory (no model bundle there)")]
    try:
        from pipelines.bundle import verify_bundle
    except ImportError as exc:
        return [Problem("pipeline.bundle", f"cannot verify {bundle}: the inference engine is not installed ({exc})")]
    return [Problem("pipeline.bundle", f"{bundle}: {line}") for line in verify_bundle(bundle)]


def _tls(settings: Settings) -> list[Problem]:
    from pacs_node.dicom.tls import TLSConfigError, peer_tls_args, server_context

    checks = [lambda: server_context(settings.node.tls)] if settings.node.tls is not None else []
    checks += [lambda name=name, peer=peer: peer_tls_args(peer, name)
               for name, peer in sorted(settings.peers.items()) if peer.tls is not None]
    problems = []
    for check in checks:
        try:
            check()
        except TLSConfigError as exc:  # its message starts with the key: "peers.pacs.tls.ca_file: ..."
            key, _, message = str(exc).partition(": ")
            problems.append(Problem(key, message))
    return problems


def _database(settings: Settings) -> list[Problem]:
    try:
        url = make_url(settings.database_url)
    except ArgumentError as exc:
        return [Problem("database.url", f"not a database URL ({exc})")]
    if url.get_backend_name() not in SUPPORTED_DIALECTS:
        return [Problem("database.url", f"{url.get_backend_name()!r} databases are not supported: use "
                                        "sqlite:///PATH or postgresql+psycopg://USER@HOST/DATABASE")]
    return []


def _peers(settings: Settings) -> list[Problem]:
    problems = []
    for name, peer in sorted(settings.peers.items()):
        try:
            socket.getaddrinfo(peer.host, peer.port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            problems.append(Problem(f"peers.{name}.host", f"{peer.host!r} does not resolve to an address ({exc})"))
    return problems


def check_settings(settings: Settings) -> list[Problem]:
    """Every problem found; empty when the node should start and run as configured."""
    return [*_database(settings), *_bundle(settings), *_tls(settings), *_peers(settings)]
