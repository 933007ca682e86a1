"""Log lines carry their time zone, and a failed association is one line of the node's, not pynetdicom's two."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator

import pytest

from pacs_node.ops.logs import setup_logging


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_timestamps_have_a_zone_and_connect_failures_are_not_errors(restore_logging: None,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("INFO", process="test")
    logging.getLogger("pynetdicom.transport").error("Association request failed: unable to connect to remote")
    logging.getLogger("pynetdicom.transport").error("TCP Initialisation Error: [Errno 111] Connection refused")
    logging.getLogger("pacs_node.work.export").warning("export job 7 to pacs failed")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d WARNING test\[\d+\] ", lines[0]), lines[0]
