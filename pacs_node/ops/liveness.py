"""Processes telling the database they are alive: the ``node_processes`` row of a worker or exporter.

``/healthz`` and ``/metrics`` run in ``serve``, the workers in their own processes (or on other hosts
sharing PostgreSQL): a row each, renewed every :data:`BEACON_INTERVAL_S`, lets the one see the others. A
row not renewed for :data:`STALE_AFTER_S` belongs to a process that is gone or stuck.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from datetime import datetime, timedelta

from pacs_node.ops.context import ServerContext
from storage import processes
from storage.schema import utcnow

log = logging.getLogger(__name__)

BEACON_INTERVAL_S = 2.0
#: Several missed renewals in a row: the process is gone (or so stuck it might as well be).
STALE_AFTER_S = 15.0
#: Rows of processes gone this long are deleted (every restart of a worker leaves one behind).
FORGET_AFTER = timedelta(days=1)


class ProcessState:
    STARTING = "starting"
    READY = "ready"
    FAILED = "failed"  # e.g. its pipeline did not load; ``detail`` says why
    STOPPED = "stopped"


def is_fresh(seen_at: datetime, now: datetime | None = None) -> bool:
    return ((now or utcnow()) - seen_at).total_seconds() <= STALE_AFTER_S


class Beacon:
    """The row of one process (``name``: its lease owner id, ``role``: worker or exporter), renewed from a
    daemon thread while the beacon is open. Database errors are logged, never raised: a beacon must not
    be what stops a worker."""

    def __init__(self, runtime: ServerContext, name: str, role: str) -> None:
        self.rt, self.name, self.role = runtime, name, role
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"beacon-{role}", daemon=True)

    def __enter__(self) -> Beacon:
        self.set(ProcessState.STARTING)
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if exc_type is None:  # after an error the row keeps what the process last said (e.g. failed)
            self.set(ProcessState.STOPPED)

    def set(self, state: str, detail: str | None = None) -> None:
        try:
            with self.rt.write_session() as session, session.begin():
                processes.report(session, name=self.name, role=self.role, host=socket.gethostname(), pid=os.getpid(),
                                 state=state, detail=detail, now=utcnow())
        except Exception:
            log.exception("cannot record %s's state %s", self.name, state)

    def _run(self) -> None:
        while not self._stop.wait(BEACON_INTERVAL_S):
            try:
                with self.rt.write_session() as session, session.begin():
                    processes.seen(session, self.name, utcnow())
            except Exception:
                log.warning("cannot renew %s's liveness row", self.name, exc_info=True)
