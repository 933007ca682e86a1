"""The files pynetdicom spools incoming C-STORE datasets to, made safe against a full disk.

With ``STORE_RECV_CHUNKED_DATASET`` pynetdicom writes each P-DATA fragment straight to a
``NamedTemporaryFile`` from the thread that reads the association. When that write fails (``ENOSPC``,
``EDQUOT``, ``EIO``) the exception escapes pynetdicom's reactor: the association's thread dies, the
sender gets no response at all and waits for its timeout, and the partial file stays behind.

:func:`install` swaps in a file that records the first write error instead of raising it, truncates the
partial data at once (giving the space back) and swallows the rest of the dataset, so the DIMSE message
completes normally. The listener then asks :func:`spool_failure` before ingesting and answers 0xA700
(out of resources), which a modality understands as "try again later".

pynetdicom also forgets a spool file whose dataset never completes: an A-ABORT, a dropped connection or
a stalled sender ends the association with the partial file left in the store's temp area (26 of them
filled a small store). Every spool file is therefore registered to its association when it is opened,
:func:`claim` takes it off the register when the C-STORE handler receives it whole, and
:func:`discard_unclaimed`, called when the association has ended, deletes what was never claimed.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from contextlib import suppress
from typing import Any

from pynetdicom import dimse_messages

log = logging.getLogger(__name__)

_failures: dict[str, str] = {}
#: Spool files not yet handed to a C-STORE handler, by the ``id`` of the association receiving them.
_unclaimed: dict[int, dict[str, SpoolFile]] = {}
_lock = threading.Lock()


def _receiving_association() -> int | None:
    """``id`` of the association whose DUL thread is running this (pynetdicom decodes P-DATA there)."""
    assoc = getattr(threading.current_thread(), "assoc", None)
    return id(assoc) if assoc is not None else None


class SpoolFile:
    """Wraps pynetdicom's temp file; write errors are remembered, never raised (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._file: Any = None
        try:
            self._file = tempfile.NamedTemporaryFile(*args, **kwargs)  # noqa: SIM115 (pynetdicom closes it)
            self.name: str = self._file.name
        except OSError as exc:
            # Not even an empty file could be made: give pynetdicom a name that will never exist.
            self.name = os.path.join(tempfile.gettempdir(), f"unwritable-{os.getpid()}-{id(self):x}.dcm")
            self._fail(exc)
        owner = _receiving_association()
        if owner is not None:
            with _lock:
                _unclaimed.setdefault(owner, {})[self.name] = self

    @property
    def failed(self) -> bool:
        with _lock:
            return self.name in _failures

    def _fail(self, exc: OSError) -> None:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        with _lock:
            if self.name in _failures:
                return
            _failures[self.name] = reason
        log.error("receiving a dataset failed: %s; the rest of it is discarded", reason)
        if self._file is not None:
            with suppress(OSError):
                self._file.close()
            with suppress(OSError):
                os.truncate(self.name, 0)  # give the space back now, not when the handler runs

    def write(self, data: bytes) -> int:
        if not self.failed:
            try:
                return int(self._file.write(data))
            except OSError as exc:
                self._fail(exc)
        return len(data)

    def flush(self) -> None:
        if not self.failed:
            try:
                self._file.flush()
            except OSError as exc:
                self._fail(exc)

    @property
    def file(self) -> SpoolFile:
        """pynetdicom calls ``.file.flush()`` after each fragment."""
        return self

    def close(self) -> None:
        if self._file is not None and not self.failed:
            try:
                self._file.close()
            except OSError as exc:
                self._fail(exc)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)


def claim(path: str | os.PathLike[str]) -> bool:
    """Take the spool file at ``path`` off its association's register, as the C-STORE handler receives
    it whole; False when it was already discarded (its association ended first)."""
    name = str(path)
    with _lock:
        for files in _unclaimed.values():
            if files.pop(name, None) is not None:
                return True
    return os.path.exists(name)


def discard_unclaimed(assoc: object) -> int:
    """Delete the spool files of ``assoc`` (an association that has ended) that no handler received;
    how many there were."""
    with _lock:
        files = _unclaimed.pop(id(assoc), {})
        for name in files:
            _failures.pop(name, None)
    for name, spool in files.items():
        if spool._file is not None:
            with suppress(OSError):
                spool._file.close()
        with suppress(OSError):
            os.unlink(name)
    if files:
        log.warning("removed %d partly received dataset(s): the association ended before they were complete",
                    len(files))
    return len(files)


def spool_failure(path: str | os.PathLike[str]) -> str | None:
    """Why receiving the dataset at ``path`` failed (``None`` if it did not); forgets it."""
    with _lock:
        return _failures.pop(str(path), None)


def install() -> None:
    """Make pynetdicom spool through :class:`SpoolFile` (idempotent)."""
    dimse_messages.NamedTemporaryFile = SpoolFile  # type: ignore[attr-defined]
