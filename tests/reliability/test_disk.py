"""A full disk and the free-space watermark, end to end: a real listener whose store is a small tmpfs
(the kernel's own ENOSPC, not a mock), fed by DCMTK ``storescu`` and pynetdicom.

The promise: a C-STORE that cannot be stored whole is answered 0xA700 (never 0x0000), leaves no partial
file (in the tree or in ``.tmp``) and no row; once space returns, the next image is stored."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from pynetdicom.sop_class import ComputedRadiographyImageStorage, Verification
from sqlalchemy import func, select

from pacs_node.config import Settings
from pacs_node.dicom.server import Listener
from pacs_node.ops.context import ServerContext
from storage.schema import Instance
from storage.store import TEMP_DIR
from tests.pacs_node.helpers import make_cr, requestor, storescu
from tests.support import free_port, mounted_tmpfs

MiB = 1024 * 1024


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs for the instance store."""
    with mounted_tmpfs(tmp_path / "small", "8m") as mountpoint:
        yield mountpoint


def _start(tmp_path: Path, store: Path, min_free_bytes: int) -> tuple[Settings, ServerContext, Listener]:
    settings = Settings(
        node={"port": free_port(), "bind": "127.0.0.1", "data_dir": tmp_path / "var"},  # database off the tmpfs
        store={"path": store, "min_free_bytes": min_free_bytes},
        pipeline={"bundle": "fake"},
    )
    runtime = ServerContext.open(settings)
    listener = Listener(settings, runtime)
    listener.start()
    return settings, runtime, listener


def _rows(runtime: ServerContext) -> int:
    with runtime.read_session() as session:
        return int(session.scalar(select(func.count()).select_from(Instance)))


def _files(store: Path) -> list[str]:
    """Committed files in the store (relative paths), and anything left in its temp directory."""
    found = []
    for dirpath, _dirs, names in os.walk(store):
        found += [os.path.relpath(os.path.join(dirpath, name), store) for name in names]
    return sorted(found)


def _store(port: int, path: Path) -> int:
    ae = requestor("PYSCU")
    ae.add_requested_context(ComputedRadiographyImageStorage)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSNODE")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(path)
        assert assoc.send_c_echo().Status == 0  # the association is still usable
        return int(status.Status)
    finally:
        assoc.release()


def test_disk_full_answers_a700_leaves_nothing_and_recovers(tmp_path: Path, tmpfs: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    big = [images / f"{i}.dcm" for i in range(5)]
    for i, path in enumerate(big):
        make_cr(path, rows=1024, cols=1024, seed=i)  # 2 MiB each: the fourth cannot fit in 8 MiB
    settings, runtime, listener = _start(tmp_path, tmpfs / "store", min_free_bytes=0)
    try:
        port = settings.node.port
        statuses = [_store(port, path) for path in big[:4]]
        assert statuses[:3] == [0, 0, 0]
        assert statuses[3] == 0xA700
        committed = [f for f in _files(tmpfs / "store") if not f.startswith(TEMP_DIR)]
        assert len(committed) == 3 and _rows(runtime) == 3
        assert _files(tmpfs / "store" / TEMP_DIR) == []  # no partial file anywhere
        assert all(os.path.getsize(tmpfs / "store" / f) > 2 * MiB - 4096 for f in committed)
        # DCMTK sees the same refusal
        refused = storescu(port, [big[3]])
        assert "0xa700" in (refused.stdout + refused.stderr).lower() or refused.returncode != 0
        assert _rows(runtime) == 3
        # space comes back (a person deletes something): the next image goes in whole
        (tmpfs / "store" / committed[0]).unlink()
        done = storescu(port, [big[4]])
        assert done.returncode == 0, done.stdout + done.stderr
        assert _rows(runtime) == 4
        assert _files(tmpfs / "store" / TEMP_DIR) == []
    finally:
        listener.stop()
        runtime.close()


def test_below_the_watermark_stores_are_refused_before_the_disk_fills(tmp_path: Path, tmpfs: Path) -> None:
    small = tmp_path / "small.dcm"
    make_cr(small)
    # 8 MiB filesystem, 7 MiB must stay free: one 2 MiB image is already too much
    settings, runtime, listener = _start(tmp_path, tmpfs / "store", min_free_bytes=7 * MiB)
    try:
        port = settings.node.port
        assert _store(port, small) == 0  # a small image still fits above the watermark
        big = tmp_path / "big.dcm"
        make_cr(big, rows=1024, cols=1024)
        assert _store(port, big) == 0xA700
        assert _rows(runtime) == 1
        assert [f for f in _files(tmpfs / "store") if not f.startswith(TEMP_DIR)].__len__() == 1
        assert _files(tmpfs / "store" / TEMP_DIR) == []
        assert os.statvfs(tmpfs).f_bavail * os.statvfs(tmpfs).f_frsize > 5 * MiB  # the disk never filled
    finally:
        listener.stop()
        runtime.close()
