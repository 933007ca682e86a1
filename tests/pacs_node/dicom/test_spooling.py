"""Spool files: what pynetdicom writes arrives whole, and large datasets are pushed towards the disk as
they arrive (small ones never are)."""

from __future__ import annotations

import os
from pathlib import Path
from unittest import mock

from pacs_node.dicom.spooling import WRITEBACK_BYTES, ReceiveSpool
from storage import store


def _receive(tmp_path: Path, fragments: list[bytes]) -> tuple[bytes, int]:
    """Write ``fragments`` as pynetdicom does (write, then ``file.flush()``); the file's content and how
    many writeback hints it was given."""
    spool = ReceiveSpool(tmp_path)
    with mock.patch("pacs_node.dicom.spooling.start_writeback", wraps=store.start_writeback) as hint:
        spool_file = spool.open(delete=False)
        for fragment in fragments:
            spool_file.write(fragment)
            spool_file.file.flush()
        spool_file.close()
    return Path(spool_file.name).read_bytes(), hint.call_count


def test_a_large_dataset_is_pushed_to_the_disk_once_per_megabyte_received(tmp_path: Path) -> None:
    fragment = os.urandom(64 * 1024)
    fragments = [fragment] * (3 * WRITEBACK_BYTES // len(fragment) + 1)
    data, hints = _receive(tmp_path, fragments)
    assert data == b"".join(fragments)
    assert hints == 3


def test_a_small_dataset_is_never_pushed(tmp_path: Path) -> None:
    data, hints = _receive(tmp_path, [b"DICM" * 100, b"\0" * 6144])
    assert data == b"DICM" * 100 + b"\0" * 6144
    assert hints == 0
