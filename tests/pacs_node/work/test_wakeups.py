"""The doorbell between the node's processes: rings cross processes, are never lost while a waiter
exists, and a dead waiter's pipe is cleaned up by the next ring."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

from pacs_node.work.wakeups import Doorbell

REPO = Path(__file__).resolve().parents[3]

WAIT_IN_CHILD = """
import sys
from pathlib import Path
from pacs_node.work.wakeups import Doorbell
with Doorbell(Path(sys.argv[1]), "analyse").waiter() as waiter:
    print("waiting", flush=True)
    print("rung" if waiter.wait(120) else "timed out", flush=True)
"""


def test_a_ring_wakes_a_waiter_in_another_process(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", WAIT_IN_CHILD, str(tmp_path)], stdout=subprocess.PIPE,
                             text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "waiting"
    Doorbell(tmp_path, "export").ring()  # another topic: not for this waiter
    Doorbell(tmp_path, "analyse").ring()
    assert child.stdout.readline().strip() == "rung"
    assert child.wait(30) == 0
    assert list(tmp_path.iterdir()) == []  # the waiter removed its pipe


def test_a_ring_while_the_waiter_is_busy_is_kept_for_its_next_wait(tmp_path: Path) -> None:
    bell = Doorbell(tmp_path, "analyse")
    with bell.waiter() as waiter:
        assert waiter.wait(0) is False
        bell.ring()
        bell.ring()
        assert waiter.wait(0) is True  # both rings, consumed at once
        assert waiter.wait(0) is False


def test_a_stop_event_ends_a_wait(tmp_path: Path) -> None:
    stop = threading.Event()
    with Doorbell(tmp_path, "export").waiter() as waiter:
        threading.Timer(0.2, stop.set).start()
        assert waiter.wait(120, stop) is False
        assert stop.is_set()


def test_the_pipe_of_a_dead_waiter_is_removed_and_a_missing_directory_is_harmless(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "analyse.999999.0")  # what a waiter killed with -9 leaves behind
    Doorbell(tmp_path, "analyse").ring()
    assert not (tmp_path / "analyse.999999.0").exists()
    Doorbell(tmp_path / "absent", "analyse").ring()


def test_drain_consumes_the_rings_so_far_and_wake_rings_one_waiter(tmp_path: Path) -> None:
    bell = Doorbell(tmp_path, "analyse")
    with bell.waiter() as waiter, bell.waiter() as other:
        assert waiter.drain() is False
        bell.ring()
        bell.ring()
        assert waiter.drain() is True  # a claim made now answers both
        assert waiter.wait(0) is False
        assert other.drain() is True
        waiter.wake()  # news from another thread of this process, for this waiter alone
        assert other.wait(0) is False
        assert waiter.wait(0) is True
    waiter.wake()  # after close: nothing (its descriptor numbers may be another file's by now)
    assert list(tmp_path.iterdir()) == []
