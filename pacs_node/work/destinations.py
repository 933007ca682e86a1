"""Destinations that are down: stop spending attempts on them, probe them, and send at once when they answer.

A PACS in a maintenance window refuses every association. Retrying each result on its own backoff would
spend the results' attempts and, with a short policy, send them all to ``dead`` before the window ends.
After ``export.down_after_failures`` failed sends in a row the destination is marked down: exporters stop
claiming its jobs (they keep their attempts and wait, durable), housekeeping C-ECHOes it every
``export.probe_interval_s``, and the first answer marks it up and makes all its waiting jobs due now.
"""

from __future__ import annotations

import logging
import time

from pacs_node.config import Settings
from pacs_node.dicom.scu import ScuError, echo
from pacs_node.ops.context import ServerContext
from storage.destinations import down_destinations, record_failure, record_probe, record_success
from storage.schema import JobKind, utcnow

log = logging.getLogger(__name__)

#: Exporters re-read the set of down destinations at most this often (one small query).
_DOWN_CACHE_S = 1.0


class DestinationMonitor:
    """The exporters' shared view of which destinations are down (the truth is in the database)."""

    def __init__(self, settings: Settings, runtime: ServerContext) -> None:
        self.settings, self.rt = settings, runtime
        self._down: set[str] = set()
        self._read_at = float("-inf")
        #: Destinations whose last send from here made an association (recorded), and not seen down since:
        #: their next success needs no write (a batch's, on a kept association, would be one per batch).
        self._up: set[str] = set()

    def down(self) -> set[str]:
        """Destinations not to send to now."""
        if time.monotonic() - self._read_at > _DOWN_CACHE_S:
            with self.rt.read_session() as session:
                self._down = down_destinations(session)
            self._read_at = time.monotonic()
        return self._down

    def failed(self, name: str, error: str) -> None:
        """A send to ``name`` made no association (refused, timed out, rejected)."""
        self._up.discard(name)
        with self.rt.write_session() as session, session.begin():
            marked = record_failure(session, name, error, utcnow(), self.settings.export.down_after_failures)
        if marked:
            self._read_at = float("-inf")
            log.error("destination %s is down after %d failed sends in a row (%s); its results wait, "
                      "and it is probed with C-ECHO every %.0fs", name, self.settings.export.down_after_failures,
                      error, self.settings.export.probe_interval_s)

    def answered(self, name: str) -> None:
        """``name`` accepted an association: up again, and its waiting results are due now."""
        if name in self._up and name not in self._down:
            return
        with self.rt.write_session() as session, session.begin():
            down_since = record_success(session, name, utcnow())
        self._up.add(name)
        if down_since is not None:
            self._read_at = float("-inf")
            released = self.rt.queue.release_destination(name)
            self.rt.doorbell(JobKind.EXPORT).ring()
            log.warning("destination %s answers again after %s down; %d waiting result(s) released", name,
                        str(utcnow() - down_since).split(".")[0], released)

    def probe(self) -> int:
        """C-ECHO every destination marked down; returns how many answered."""

        with self.rt.read_session() as session:
            names = sorted(down_destinations(session))
        answered = 0
        for name in names:
            peer = self.settings.peers.get(name)
            if peer is None:
                continue
            try:
                echo(self.settings, peer)
            except ScuError as exc:
                with self.rt.write_session() as session, session.begin():
                    record_probe(session, name, str(exc), utcnow())
                continue
            self.answered(name)
            answered += 1
        return answered
