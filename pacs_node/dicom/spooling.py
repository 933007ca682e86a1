"""The files pynetdicom spools incoming C-STORE datasets to: in the server's store, safe against a full disk.

With ``STORE_RECV_CHUNKED_DATASET`` pynetdicom writes each P-DATA fragment straight to a
``NamedTemporaryFile`` from the thread that reads the association. Two things are wrong with that file
for a node that promises durability:

* it lands in tempfile's directory (``/tmp``), so filing it in the store would be a copy, not a rename;
* when a write fails (``ENOSPC``, ``EDQUOT``, ``EIO``) the exception escapes pynetdicom's reactor: the
  association's thread dies, the sender gets no response at all and waits for its timeout, and the
  partial file stays behind.

A :class:`ReceiveSpool` belongs to one association server. Its :class:`SpoolFile` is created in the
server's incoming directory (inside the store, so filing is a rename), records the first write error
instead of raising it, truncates the partial data at once (giving the space back) and swallows the rest
of the dataset, so the DIMSE message completes normally. The server then asks :meth:`ReceiveSpool.failure`
before ingesting and answers 0xA700 (out of resources), which a modality understands as "try again later".

pynetdicom also forgets a spool file whose dataset never completes: an A-ABORT, a dropped connection or
a stalled sender ends the association with the partial file left in the store's temp area (26 of them
filled a small store). Every spool file is therefore registered to its association when it is opened,
:meth:`ReceiveSpool.claim` takes it off the register when the C-STORE handler receives it whole, and
:meth:`ReceiveSpool.discard_unclaimed`, called when the association has ended, deletes what was never
claimed.

:func:`open_receive_file` is what :func:`pacs_node.dicom.adjustments.apply_pynetdicom_adjustments` hands to
pynetdicom: it finds the spool of the server whose association is being read, and gives any other
association (a C-GET requestor in the same process) pynetdicom's own temp file.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from contextlib import suppress
from pathlib import Path
from typing import Any

from storage.store import start_writeback, writer_prefix

log = logging.getLogger(__name__)

#: Bytes received into a spool file after which its pages are pushed towards the disk
#: (``storage.store.start_writeback``): a radiograph's fsync then waits for its last megabyte, not all
#: of it, and a small dataset costs nothing.
WRITEBACK_BYTES = 1024 * 1024


class ReceiveSpool:
    """Where one server's incoming datasets are written, and which of them failed to be written."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._failures: dict[str, str] = {}
        #: Spool files not yet handed to a C-STORE handler, by the ``id`` of the receiving association.
        self._unclaimed: dict[int, dict[str, SpoolFile]] = {}
        self._lock = threading.Lock()

    def open(self, *args: Any, **kwargs: Any) -> SpoolFile:
        """pynetdicom's ``NamedTemporaryFile(...)`` call, answered with a file in :attr:`directory`."""
        spool_file = SpoolFile(self, *args, dir=self.directory, prefix=writer_prefix(), **kwargs)
        assoc = getattr(threading.current_thread(), "assoc", None)
        if assoc is not None:
            with self._lock:
                self._unclaimed.setdefault(id(assoc), {})[spool_file.name] = spool_file
        return spool_file

    def claim(self, path: str | os.PathLike[str]) -> bool:
        """Take the spool file at ``path`` off its association's register, as the C-STORE handler
        receives it whole; False when it was already discarded (its association ended first)."""
        name = str(path)
        with self._lock:
            for files in self._unclaimed.values():
                if files.pop(name, None) is not None:
                    return True
        return os.path.exists(name)

    def discard_unclaimed(self, assoc: object) -> int:
        """Delete the spool files of ``assoc`` (an association that has ended) that no handler
        received; how many there were."""
        with self._lock:
            files = self._unclaimed.pop(id(assoc), {})
            for name in files:
                self._failures.pop(name, None)
        for name, spool_file in files.items():
            spool_file.discard()
        if files:
            log.warning("removed %d partly received dataset(s): the association ended before they were "
                        "complete", len(files))
        return len(files)

    def failed(self, name: str) -> bool:
        with self._lock:
            return name in self._failures

    def record_failure(self, name: str, reason: str) -> bool:
        """Remember why ``name`` could not be written; ``False`` if a failure was already recorded."""
        with self._lock:
            if name in self._failures:
                return False
            self._failures[name] = reason
            return True

    def failure(self, path: str | os.PathLike[str]) -> str | None:
        """Why receiving the dataset at ``path`` failed (``None`` if it did not); forgets it."""
        with self._lock:
            return self._failures.pop(str(path), None)


class SpoolFile:
    """Wraps pynetdicom's temp file; write errors are remembered, never raised (see the module docstring).
    Every :data:`WRITEBACK_BYTES` received, its pages are pushed towards the disk."""

    def __init__(self, spool: ReceiveSpool, *args: Any, **kwargs: Any) -> None:
        self._spool = spool
        self._file: Any = None
        self._unsynced = 0  # bytes written since the last writeback hint
        try:
            self._file = tempfile.NamedTemporaryFile(*args, **kwargs)  # noqa: SIM115 (pynetdicom closes it)
            self.name: str = self._file.name
        except OSError as exc:
            # Not even an empty file could be made: give pynetdicom a name that will never exist.
            self.name = os.path.join(spool.directory, f"unwritable-{os.getpid()}-{id(self):x}.dcm")
            self._fail(exc)

    @property
    def failed(self) -> bool:
        return self._spool.failed(self.name)

    def _fail(self, exc: OSError) -> None:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        if not self._spool.record_failure(self.name, reason):
            return
        log.error("receiving a dataset failed: %s; the rest of it is discarded", reason)
        if self._file is not None:
            with suppress(OSError):
                self._file.close()
            with suppress(OSError):
                os.truncate(self.name, 0)  # give the space back now, not when the handler runs

    def write(self, data: bytes) -> int:
        if not self.failed:
            try:
                written = int(self._file.write(data))
                self._unsynced += written
                return written
            except OSError as exc:
                self._fail(exc)
        return len(data)

    def flush(self) -> None:
        if not self.failed:
            try:
                self._file.flush()
            except OSError as exc:
                self._fail(exc)
                return
            if self._unsynced >= WRITEBACK_BYTES:
                self._unsynced = 0
                try:
                    start_writeback(self._file.fileno())
                except OSError as exc:  # only an optimisation: it must never fail the receiving
                    log.debug("writeback hint failed: %s", exc)

    @property
    def file(self) -> SpoolFile:
        """pynetdicom calls ``.file.flush()`` after each fragment."""
        return self

    def discard(self) -> None:
        """Close and delete the file (a dataset that will never be complete)."""
        if self._file is not None:
            with suppress(OSError):
                self._file.close()
        with suppress(OSError):
            os.unlink(self.name)

    def close(self) -> None:
        if self._file is not None and not self.failed:
            try:
                self._file.close()
            except OSError as exc:
                self._fail(exc)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)


def open_receive_file(*args: Any, **kwargs: Any) -> Any:
    """pynetdicom's ``NamedTemporaryFile`` for a dataset that starts arriving on the current thread.

    pynetdicom decodes P-DATA in the association's DUL thread, whose ``assoc`` leads to the server that
    accepted it; a server with a :class:`ReceiveSpool` (``spool`` attribute) gets its file there."""
    assoc = getattr(threading.current_thread(), "assoc", None)
    spool = getattr(getattr(assoc, "_server", None), "spool", None)
    if isinstance(spool, ReceiveSpool):
        return spool.open(*args, **kwargs)
    return tempfile.NamedTemporaryFile(*args, **kwargs)  # noqa: SIM115 (pynetdicom closes it)
