"""Keeps ``worker.count`` worker processes (and the extra listener processes of
``node.listener_processes``) alive next to ``serve``.

Workers are full ``pacs-node worker`` subprocesses (not forks of the listener): they import torch and the
model in their own address space, and whatever kills one (out-of-memory killer, a crashing native
decoder) cannot reach the listener. Extra listeners are ``pacs-node listen`` subprocesses on the same
port. A process that exits is started again, after a delay that grows while it keeps crashing, so a
broken bundle does not spin the CPU. A worker's jobs are handed back at once (``release_leases``): the
supervisor saw it die, so there is no reason to wait for its leases to run out.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pacs_node.ops import metrics

log = logging.getLogger(__name__)

_RESTART_DELAY_MIN_S = 1.0
_RESTART_DELAY_MAX_S = 60.0
#: A worker that lived this long is considered healthy again (its restart delay resets).
_HEALTHY_AFTER_S = 60.0


_PR_SET_PDEATHSIG = 1


def exit_with_parent(parent_pid: int, stop: threading.Event) -> None:
    """A process started by ``serve`` stops when ``serve`` is gone (even after ``kill -9``), so a restarted
    ``serve`` never finds stale workers or listeners from its previous life. On Linux the kernel signals us
    at once (``PR_SET_PDEATHSIG``); polling ``getppid`` covers other systems and a parent that died before."""
    with contextlib.suppress(OSError, AttributeError):  # not Linux: the polling below still works
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    while not stop.is_set():
        if os.getppid() != parent_pid:
            log.warning("parent process %d is gone; stopping", parent_pid)
            stop.set()
        stop.wait(1.0)


class Supervisor:
    """``count`` ``pacs-node <command>`` subprocesses (``worker`` or ``listen``), restarted when they exit."""

    def __init__(self, count: int, config_path: Path | None, command: str = "worker",
                 release_leases: Callable[[str], int] | None = None) -> None:
        self.count = count
        self.config_path = config_path
        self.command = command
        self._release_leases = release_leases
        self._procs: list[subprocess.Popen[bytes] | None] = [None] * count
        self._started_at = [0.0] * count
        self._delay = [_RESTART_DELAY_MIN_S] * count
        self._next_start = [0.0] * count
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="supervisor", daemon=True)

    def _command(self) -> list[str]:
        cmd = [sys.executable, "-m", "pacs_node"]
        if self.config_path is not None:
            cmd += ["--config", str(self.config_path)]
        return cmd + [self.command, "--parent-pid", str(os.getpid())]

    def _spawn(self, slot: int) -> None:
        proc = subprocess.Popen(self._command())  # noqa: S603 (our own interpreter and module)
        self._procs[slot] = proc
        self._started_at[slot] = time.monotonic()
        log.info("started %s %d (pid %d)", self.command, slot, proc.pid)

    def start(self) -> None:
        for slot in range(self.count):
            self._spawn(slot)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(0.5):
            now = time.monotonic()
            for slot, proc in enumerate(self._procs):
                if proc is not None and proc.poll() is None:
                    continue
                if proc is not None:
                    metrics.process_exited(proc.pid)
                    self._hand_back_jobs(proc.pid)
                    lived = now - self._started_at[slot]
                    if lived >= _HEALTHY_AFTER_S:
                        self._delay[slot] = _RESTART_DELAY_MIN_S
                    log.error("%s %d (pid %d) exited with code %s after %.0fs; restarting in %.0fs",
                              self.command, slot, proc.pid, proc.returncode, lived, self._delay[slot])
                    self._next_start[slot] = now + self._delay[slot]
                    self._delay[slot] = min(self._delay[slot] * 2, _RESTART_DELAY_MAX_S)
                    self._procs[slot] = None
                if now >= self._next_start[slot] and not self._stop.is_set():
                    try:
                        self._spawn(slot)
                    except OSError:
                        log.exception("cannot start %s %d", self.command, slot)
                        self._next_start[slot] = now + self._delay[slot]

    def _hand_back_jobs(self, pid: int) -> None:
        """The jobs of a worker that exited: claimable again now (its lease owner id is host:pid)."""
        if self._release_leases is None:
            return
        try:
            n = self._release_leases(f"{socket.gethostname()}:{pid}")
        except Exception:
            log.exception("cannot release the jobs of worker pid %d; their leases will run out", pid)
            return
        if n:
            log.warning("released %d job(s) held by worker pid %d", n, pid)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM every process (a worker finishes its batch), SIGKILL what is still there after ``timeout``."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        live = [proc for proc in self._procs if proc is not None and proc.poll() is None]
        for proc in live:
            proc.terminate()
        deadline = time.monotonic() + timeout
        for proc in live:
            try:
                proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                log.warning("%s pid %d did not stop in %.0fs; killing it", self.command, proc.pid, timeout)
                proc.kill()
                proc.wait()
