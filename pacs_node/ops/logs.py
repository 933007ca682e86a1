"""Logging setup shared by ``serve``, ``worker`` and the CLI.

Node code never puts patient names or IDs in messages at INFO or above. pynetdicom is noisier: at INFO
it narrates every association and DIMSE message (and highdicom every module it copies), so both are
held at WARNING unless the node runs at DEBUG.
"""

from __future__ import annotations

import logging
import sys
from datetime import datetime

#: pynetdicom's own words for an association that could not be made. The node logs one line of its own
#: for that send (which peer, what happens next), so these two ERROR lines per attempt go to DEBUG.
_CONNECT_FAILURES = ("Association request failed", "TCP Initialisation Error")


class _LocalTimeWithZone(logging.Formatter):
    """Timestamps in ISO 8601 with the UTC offset (``2026-12-01T14:03:07.123+01:00``): a log read in
    another time zone, or across a daylight-saving change, is still unambiguous."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802 (stdlib)
        return datetime.fromtimestamp(record.created).astimezone().isoformat(timespec="milliseconds")


def _demote_connect_failures(record: logging.LogRecord) -> bool:
    if record.levelno >= logging.ERROR and record.getMessage().startswith(_CONNECT_FAILURES):
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
    return True


def setup_logging(level: str, *, process: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LocalTimeWithZone(f"%(asctime)s %(levelname)s {process}[%(process)d] %(name)s: %(message)s"))
    handler.addFilter(_demote_connect_failures)
    logging.basicConfig(level=level, handlers=[handler], force=True)
    if level != "DEBUG":
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
        logging.getLogger("apscheduler").setLevel(logging.WARNING)
        logging.getLogger("highdicom").setLevel(logging.WARNING)  # narrates every attribute it copies
