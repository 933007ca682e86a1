"""Helpers for tests: where ``../shared`` is, which real peers are installed, free loopback ports.

Imported as ``from tests.support import ...`` (pytest puts the repository root on ``sys.path``)."""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
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


@functools.cache
def _dcmtk_path(name: str) -> str | None:
    # pynetdicom installs console scripts called storescu/storescp/findscu... too, which may come first on
    # PATH; the tests want DCMTK's, recognised by its version banner. /usr/bin first: probing a pyenv shim
    # means starting Python, which is slow on a busy machine.
    dirs = ["/usr/bin", "/usr/local/bin", *os.environ.get("PATH", "").split(os.pathsep)]
    for candidate in dict.fromkeys(Path(d) / name for d in dirs):
        if not (candidate.is_file() and os.access(candidate, os.X_OK)):
            continue
        try:
            banner = subprocess.run([str(candidate), "--version"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if "dcmtk" in (banner.stdout + banner.stderr).lower():
            return str(candidate)
    return None


def dcmtk(name: str) -> str:
    """Path of the DCMTK program ``name``, or skip the test with the reason."""
    path = _dcmtk_path(name)
    if path is None:
        pytest.skip(f"DCMTK {name} is not installed (apt-get install dcmtk, see .ci/run)")
    return path


@contextlib.contextmanager
def mounted_tmpfs(mountpoint: Path, size: str) -> Iterator[Path]:
    """A real small filesystem at ``mountpoint``, so "disk full" is the kernel's ENOSPC and not a mock;
    skips the test where mounting is not permitted."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mountpoint)],
                             check=False, capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)
