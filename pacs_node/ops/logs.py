"""Logging setup shared by ``serve``, ``worker``, the result builders and the CLI, and the scrubbing that
keeps patient data out of every line, whatever library emits it.

Node code never puts patient names or IDs in messages. Libraries do: highdicom warns with the whole
PatientName quoted (``The string "SMITH JOHN" is unlikely to represent...``), pydicom quotes the value it
cannot parse, and an exception's message may quote anything. So:

* Python warnings are captured into logging (``py.warnings``) instead of going to stderr unformatted;
* every line from a logger outside the node's own packages, and every traceback, has its quoted text
  and the values of dumped elements replaced by ``"…"`` (:func:`scrub`): the node's own messages name
  no patient data, and what a library quotes or dumps is, more often than not, a value from the dataset;
* SQL parameters are never logged (``hide_parameters`` on every engine, see :mod:`storage.db`).

pynetdicom and highdicom narrate every association and attribute at INFO; both are held at WARNING
unless the node runs at DEBUG, which says once, when it starts, that its lines may carry patient data.
"""

from __future__ import annotations

import logging
import re
import sys
from datetime import datetime

#: pynetdicom's own words for an association that could not be made. The node logs one line of its own
#: for that send (which peer, what happens next), so these two ERROR lines per attempt go to DEBUG.
_CONNECT_FAILURES = ("Association request failed", "TCP Initialisation Error")


def _demote_connect_failures(record: logging.LogRecord) -> bool:
    if record.levelno >= logging.ERROR and record.getMessage().startswith(_CONNECT_FAILURES):
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
    return True

#: Loggers whose messages the node writes itself (and keeps free of patient data by construction).
_OWN_PACKAGES = frozenset({"pacs_node", "storage", "pipelines", "bench"})
#: Quoted text, except a traceback's ``File "..."`` (a path of the node's code, needed to debug).
_QUOTED = re.compile(r"(?<!File )\"[^\"\n]*\"|'[^'\n]*'")
#: An element in a dataset dump (pydicom's, pynetdicom's): ``(0010,0010) PN [SMITH^JOHN]``.
_DUMPED = re.compile(r"(\([0-9A-Fa-f]{4},[0-9A-Fa-f]{4}\)\s+[A-Z]{2}\s+)(\[[^\n]*\]|[^\s#][^#\n]*)")
#: What stands in for quoted text.
REDACTED = '"…"'


def scrub(text: str) -> str:
    """``text`` with every quoted span and every value of a dumped element replaced by :data:`REDACTED`,
    and NUL and other control characters (which no log line should carry) replaced by ``?``."""
    text = _DUMPED.sub(lambda m: m.group(1) + REDACTED, _QUOTED.sub(REDACTED, text))
    return "".join(ch if ch >= " " or ch in "\n\t" else "?" for ch in text)


class ScrubbingFormatter(logging.Formatter):
    """Scrubs lines of foreign loggers and every traceback (see the module docstring). Timestamps are
    ISO 8601 with the UTC offset (``2026-12-01T14:03:07.123+01:00``): a log read in another time zone, or
    across a daylight-saving change, is still unambiguous."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802 (stdlib)
        return datetime.fromtimestamp(record.created).astimezone().isoformat(timespec="milliseconds")

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        text = super().formatMessage(record)
        if record.name.split(".", 1)[0] in _OWN_PACKAGES:
            return text
        return scrub(text)

    def formatException(self, ei) -> str:  # noqa: ANN001, N802 (logging's signature)
        return scrub(super().formatException(ei))


def setup_logging(level: str, *, process: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(ScrubbingFormatter(
        f"%(asctime)s %(levelname)s {process}[%(process)d] %(name)s: %(message)s"))
    handler.addFilter(_demote_connect_failures)
    logging.basicConfig(level=level, handlers=[handler], force=True)
    logging.captureWarnings(True)
    if level != "DEBUG":
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
        logging.getLogger("apscheduler").setLevel(logging.WARNING)
        logging.getLogger("highdicom").setLevel(logging.WARNING)  # narrates every attribute it copies
    elif process != "builder":
        logging.getLogger(__name__).warning(
            "logging.level = DEBUG: pynetdicom, highdicom and SQL lines may include patient data "
            "(quoted values are scrubbed, unquoted ones may not be); use INFO in production")
