"""``node.listener_processes = 2``: serve and one ``pacs-node listen`` process accept on the same port
(SO_REUSEPORT), each filing what it receives durably on its own."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

from tests.pacs_node.helpers import Node, make_cr, storescu
from tests.support import dcmtk


def _listening_pids(node: Node) -> set[str]:
    return set(re.findall(r"(?:serve|listen)\[(\d+)\] pacs_node\.dicom\.server: listening as", node.log()))


def _storing_pids(node: Node) -> set[str]:
    return set(re.findall(r"(?:serve|listen)\[(\d+)\] pacs_node\.dicom\.server: association from .* ended: "
                          r"C-STORE answered 0x0000", node.log()))


def test_two_listener_processes_share_the_port(make_node: Callable[..., Node], tmp_path: Path) -> None:
    dcmtk("storescu")
    node = make_node(env={"PACS_NODE__NODE__LISTENER_PROCESSES": "2", "PACS_NODE__WORKER__COUNT": "0"},
                     with_peer=False)
    deadline = time.monotonic() + 60
    while len(_listening_pids(node)) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(_listening_pids(node)) == 2, node.log()[-3000:]

    # One association each, until both processes have filed some: the kernel spreads connections over
    # the two sockets by a hash of their addresses (both within 16 tries but for a 1 in 30,000 chance).
    sent = 0
    while sent < 16 and _storing_pids(node) != _listening_pids(node):
        path = tmp_path / f"cr{sent}.dcm"
        make_cr(path, seed=sent)
        result = storescu(node.port, [path])
        assert result.returncode == 0, result.stderr
        sent += 1
    assert _storing_pids(node) == _listening_pids(node), "one listener process received nothing"
    assert node.query("SELECT count(*) AS n FROM instances")[0]["n"] == sent
