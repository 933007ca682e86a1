"""Wake-ups between the node's processes on one host: a queued job starts now, not at the next poll.

The job queue in the database is the only truth; a doorbell just says "look now". The listener rings
``analyse`` after committing an instance and its job, a worker rings ``export`` after committing its
results, and the idle worker and export threads wait on the bell instead of sleeping a whole
``worker.poll_interval_s``. A ring that reaches no one (a worker on another machine sharing PostgreSQL,
a process that was just starting) costs at most one poll interval, never a job: every waiter still polls.

Each waiter owns a named pipe ``<directory>/<topic>.<pid>.<n>`` (named pipes, unlike Unix sockets, have
no 108-byte path limit) and holds both of its ends, so a waiter's pipe takes a ring at any time and
never reads end-of-file. A ring writes one byte into every pipe of its topic without blocking: a full
pipe has been rung already, and a pipe nobody holds open any more (its process died) is removed.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import select
import threading
import time
from pathlib import Path

#: How often a wait given a ``stop`` event looks at it: the longest a stopping thread waits on a bell.
STOP_CHECK_S = 0.1

_serial = itertools.count()
_serial_lock = threading.Lock()


class Doorbell:
    """Rings and waiters of one ``topic`` (a job kind) under ``directory``."""

    def __init__(self, directory: Path, topic: str) -> None:
        if not topic.isidentifier():
            raise ValueError(f"doorbell topic must be a plain name, not {topic!r}")
        self.directory = directory
        self.topic = topic

    def ring(self) -> None:
        """Wake every waiter of this topic on this host. Never raises: a lost ring costs one poll interval."""
        with contextlib.suppress(OSError):
            with os.scandir(self.directory) as entries:
                pipes = [e.path for e in entries if e.name.startswith(self.topic + ".")]
            for path in pipes:
                _knock(path)

    def waiter(self) -> Waiter:
        """A new waiter (one per thread that waits); close it when done."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with _serial_lock:
            n = next(_serial)
        return Waiter(self.directory / f"{self.topic}.{os.getpid()}.{n}")


def _knock(path: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # no process holds it open: its waiter died without closing
            with contextlib.suppress(OSError):
                os.unlink(path)
        return
    try:
        os.write(fd, b"\x01")
    except BlockingIOError:  # full: rung many times already and not yet drained
        pass
    finally:
        os.close(fd)


class Waiter:
    """One named pipe: :meth:`wait` returns when the topic is rung, the timeout passes or a stop is set."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a dead process's pipe that happened to have our pid
        os.mkfifo(path, 0o600)
        self._read = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        self._write = os.open(path, os.O_WRONLY | os.O_NONBLOCK)  # keeps a writer: no end-of-file
        self._closing = threading.Lock()
        self._closed = False

    def wait(self, timeout: float, stop: threading.Event | None = None) -> bool:
        """Block until rung, ``timeout`` seconds pass or ``stop`` is set; True when rung. Rings that came
        while the caller was busy return at once (and this one call consumes them all)."""
        deadline = time.monotonic() + max(timeout, 0.0)
        while not (stop is not None and stop.is_set()):
            remaining = max(deadline - time.monotonic(), 0.0)
            readable, _, _ = select.select([self._read], [], [], remaining if stop is None
                                           else min(remaining, STOP_CHECK_S))
            if readable:
                self.drain()
                return True
            if time.monotonic() >= deadline:
                break
        return False

    def drain(self) -> bool:
        """Consume the rings that came so far, without waiting; True if there were any. A loop that is
        about to look for work calls it first: what it finds answers those rings, and only a ring that
        comes after (work queued after it looked) makes its next :meth:`wait` return at once."""
        rung = False
        with contextlib.suppress(BlockingIOError):
            while os.read(self._read, 4096):
                rung = True
        return rung

    def wake(self) -> None:
        """Ring this waiter alone (another thread of its process that has news for the waiting one); nothing
        once it is closed (its descriptors' numbers may belong to other files by then)."""
        with self._closing:
            if self._closed:
                return
            with contextlib.suppress(BlockingIOError):  # full: it has been woken already
                os.write(self._write, b"\x01")

    def close(self) -> None:
        with self._closing:
            if self._closed:
                return
            self._closed = True
        with contextlib.suppress(OSError):
            self.path.unlink()
        for fd in (self._read, self._write):
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> Waiter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
