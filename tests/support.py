"""Helpers for tests: where ``../shared`` is, which real peers are installed, free loopback ports.

Imported as ``from tests.support import ...`` (pytest puts the repository root on ``sys.path``)."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_tool(name: str) -> str:
    """Path of an external program (DCMTK, Orthanc, dciodvfy...), or skip the test with the reason."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (apt-get install the package .ci/run names)")
    return path
