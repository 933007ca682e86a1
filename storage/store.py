"""The instance store: DICOM files on disk, written so that an acknowledged image is never lost.

Every file is written to a temp file in ``root/.tmp/`` (same filesystem as its final place), renamed into
place with ``os.replace`` (atomic: readers see the old state or the whole new file, never a part) and
fsynced, and the directory holding it is made durable so the rename itself survives power loss, and new
parent directories in their own parents the same way (an fsync of each, or one ``syncfs`` shared by the
commits in flight at the same time: see ``_DirectorySync``). The caller commits its database row only
after ``commit`` returns, so a crash in between leaves at worst an orphan file (found by the doctor),
never a row pointing at nothing or at a partial file. A new path is named *before* its fsync (one
journal commit then covers data, rename and directories; see ``commit`` for why that is safe: no row
references a path that did not exist); an existing path, which a row may reference, is replaced only by
a file already fsynced. Deleting goes the other way round: row first, then file.

Paths inside the store are derived from UIDs but never trust them: a UID that is not a well-formed DICOM
UID (digits and dots) is replaced by a hash, so nothing a peer sends can name a path outside the store.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import itertools
import os
import queue
import re
import secrets
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, NoReturn

#: Errors that mean "no space": the disk is full or a quota is exhausted.
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
#: A well-formed DICOM UID (PS3.5 9.1): digit components separated by dots, at most 64 characters.
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
TEMP_DIR = ".tmp"
ORPHAN_DIR = ".orphans"
_TEMP_SUFFIX = ".part"
_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:32] or "host"


class StoreFullError(OSError):
    """The store's filesystem is full (ENOSPC/EDQUOT). The partial file has already been removed."""


@dataclass(frozen=True)
class TempLeftover:
    """A temp file nobody will commit: its writer died (or it is older than the grace period)."""

    path: Path
    size_bytes: int
    age_s: float


class InstanceStore:
    """Files under ``root``, written durably and atomically (see the module docstring).

    ``min_free_bytes`` is the watermark below which ``has_room`` says no, so the listener can refuse
    new images (0xA700) before the disk is actually full and the database has no room left either.
    """

    def __init__(self, root: str | os.PathLike[str], *, min_free_bytes: int = 0) -> None:
        if min_free_bytes < 0:
            raise ValueError(f"min_free_bytes must not be negative, got {min_free_bytes!r}")
        self.root = Path(root).expanduser().resolve()
        self.min_free_bytes = min_free_bytes
        self._tmp = self.root / TEMP_DIR
        self._makedirs(self._tmp)
        self._directory_sync = _DirectorySync(self.root)

    # -- naming ----------------------------------------------------------------------------------

    def relpath_for(self, study_uid: str, series_uid: str, sop_uid: str) -> str:
        """Where an instance lives, relative to the root: ``ab/cd/<study>/<series>/<sop>.dcm``.

        ``ab/cd`` come from a hash of the study UID, so that years of studies spread over 65,536
        directories instead of one huge one; the rest are the UIDs themselves when they are well-formed
        (an administrator can find a file by UID) and a hash of them otherwise."""
        digest = hashlib.sha256(study_uid.encode("utf-8", "surrogatepass")).hexdigest()
        parts = (digest[:2], digest[2:4], _safe_name(study_uid), _safe_name(series_uid), _safe_name(sop_uid) + ".dcm")
        return "/".join(parts)

    def path(self, relpath: str) -> Path:
        """The absolute path of ``relpath``; ``ValueError`` for anything that could leave the store."""
        pure = PurePosixPath(relpath)
        if (not relpath or pure.is_absolute() or "\\" in relpath or "\0" in relpath
                or any(part in ("", ".", "..") for part in relpath.split("/"))
                or pure.parts[0].startswith(".")):
            raise ValueError(f"not a path inside the instance store: {relpath!r}")
        return self.root.joinpath(*pure.parts)

    # -- writing ---------------------------------------------------------------------------------

    def open_temp(self) -> BinaryIO:
        """A new, empty file in ``root/.tmp/`` opened for writing (and reading back).

        Hand it to ``commit`` when complete or to ``discard`` when not; ``temp()`` does the latter for
        you. Its name carries host and process id so the doctor can tell a live writer from a dead one.
        """
        name = f"{writer_prefix()}{secrets.token_hex(8)}{_TEMP_SUFFIX}"
        try:
            return open(self._tmp / name, "x+b")  # noqa: SIM115 (ownership passes to the caller)
        except OSError as exc:
            _raise_full_or(exc, self._tmp / name)

    @contextmanager
    def temp(self) -> Iterator[BinaryIO]:
        """``open_temp()`` that is discarded if the block raises or does not commit it; a full disk
        while writing surfaces as ``StoreFullError``."""
        file = self.open_temp()
        try:
            yield file
        except OSError as exc:
            self.discard(file)
            _raise_full_or(exc, Path(file.name))
        except BaseException:
            self.discard(file)
            raise
        else:
            if not file.closed:
                self.discard(file)

    def commit(self, temp: BinaryIO, relpath: str) -> Path:
        """Make ``temp`` the file at ``relpath``, durably and atomically; returns its path.

        Replaces an existing file at ``relpath``. On any failure the temp file is removed and nothing
        appears at ``relpath``; a full disk raises ``StoreFullError``. :meth:`begin_commit` and
        :meth:`Filing.wait`, for a caller with something to do while the fsyncs run.
        """
        return self.begin_commit(temp, relpath).wait()

    def begin_commit(self, temp: BinaryIO, relpath: str) -> Filing:
        """Start making ``temp`` the file at ``relpath``: what :meth:`commit` does, with the fsyncs still
        running when it returns. The file is durable (and the failures of :meth:`commit` raised) once
        :meth:`Filing.wait` returns; until then nothing may reference ``relpath``.

        The order depends on whether ``relpath`` exists. When it does, a row may reference it, so the
        new content is fsynced *before* the rename: a crash at any point leaves the old file or the
        whole new one (that path is taken here, whole, before this returns). When it does not, no row
        can reference it yet (the caller commits its row only after :meth:`Filing.wait`), so the file
        takes its name first (a hard link, which unlike a rename fails if the name exists meanwhile: a
        concurrent writer of the same path may have committed and recorded it since we looked) and is
        fsynced after, together with every directory whose entries changed (that is what POSIX promises
        durability by; one ``syncfs`` shared with concurrent commits where :class:`_DirectorySync` can),
        all at once from :data:`_SYNC_THREADS` threads: on a journalling filesystem they
        all wait for the one journal commit that holds the data, the name and the new directories, where
        one after the other each directory's fsync, finding nothing left to write, still waits for a
        cache flush of its own (~0.3-3 ms each on a virtual disk; a new study has up to five). A crash
        before the fsyncs end can then leave a partial file at ``relpath``, but with no row: an orphan,
        which the doctor reports and moves aside (and the sender, never acknowledged, sends the instance
        again, replacing it). Where hard links are not supported, or the name turned out to exist, it is
        fsync-then-rename. Measured on ext4 with a new study's directories: about 40% less time than
        fsync-then-rename for the link, and half again for the concurrent fsyncs.
        """
        final = self.path(relpath)
        placed_new = False
        directories: list[Path] = []
        try:
            temp.flush()
            # A concurrent delete may prune a freshly created, still empty parent; make it again.
            created: list[Path] = []
            for attempt in range(3):
                created += self._makedirs(final.parent, sync=False)
                try:
                    placed_new = _link_if_absent(temp.name, final)
                    break
                except FileNotFoundError:
                    if attempt == 2 or not os.path.exists(temp.name):
                        raise
            # The directories whose entries changed, deepest first: the new name's, and the parent of
            # each directory made for it.
            directories = list(dict.fromkeys([final.parent, *(new.parent for new in reversed(created))]))
            if placed_new:
                return Filing(self, temp, final, directories)
            os.fsync(temp.fileno())
            os.replace(temp.name, final)
            temp.close()
        except OSError as exc:
            self._undo(temp, final if placed_new else None)
            _raise_full_or(exc, final)
        except BaseException:
            self._undo(temp, final if placed_new else None)
            raise
        return Filing(self, None, final, directories)

    def _undo(self, temp: BinaryIO, renamed_to: Path | None) -> None:
        """A failed ``commit``: remove the temp file, and the new name it was given (not yet durable,
        never referenced: nothing may be left at that path)."""
        if renamed_to is not None:
            try:
                ours: os.stat_result | None = os.fstat(temp.fileno())
            except (OSError, ValueError):  # closed already (its close failed): the name is taken as ours
                ours = None
            with suppress(OSError):
                # Only while the name is still ours: a concurrent writer of the same instance, finding
                # it taken, may have renamed its own durable file over it (and recorded it) since.
                there = os.stat(renamed_to)
                if ours is None or (there.st_dev, there.st_ino) == (ours.st_dev, ours.st_ino):
                    os.unlink(renamed_to)
        self.discard(temp)

    def write_bytes(self, relpath: str, data: bytes) -> Path:
        """Write ``data`` to ``relpath`` the durable way (result objects, tests)."""
        with self.temp() as file:
            file.write(data)
            return self.commit(file, relpath)

    def write_many(self, files: list[tuple[str, bytes]]) -> list[Path]:
        """Write each ``(relpath, data)`` the durable way, as one group (a batch of result objects): every
        file is written, all of them made durable, renamed into place, and the renames made durable.
        Where Linux ``syncfs`` is available each "made durable" is one call for the whole group (the
        filesystem's journal committed once) instead of an fsync per file and per directory, ~5x less
        time for a batch of small files; elsewhere each file and directory is fsynced. Each file is still
        atomic (its data is durable before its rename). On a failure those already renamed stay (their
        rows are not committed yet; a retry rewrites them) and the others' temp files are removed."""
        temps: list[tuple[BinaryIO, Path]] = []
        try:
            for relpath, data in files:
                final = self.path(relpath)
                temp = self.open_temp()
                temps.append((temp, final))
                temp.write(data)
                temp.flush()
            if _syncfs is not None:
                self._sync_filesystem()
            for temp, _final in temps:
                if _syncfs is None:
                    os.fsync(temp.fileno())
                temp.close()
            directories: dict[Path, None] = {}
            while temps:
                temp, final = temps[0]
                created = self._makedirs(final.parent, sync=False)
                os.replace(temp.name, final)
                temps.pop(0)
                directories.update(dict.fromkeys([final.parent, *(new.parent for new in reversed(created))]))
            if _syncfs is not None:
                self._sync_filesystem()
            else:
                for directory in sorted(directories, key=lambda d: len(d.parts), reverse=True):  # deepest first
                    _fsync_dir(directory)
        except OSError as exc:
            for temp, _final in temps:
                self.discard(temp)
            _raise_full_or(exc, temps[0][1] if temps else self.root)
        except BaseException:
            for temp, _final in temps:
                self.discard(temp)
            raise
        return [self.path(relpath) for relpath, _data in files]

    def _sync_filesystem(self) -> None:
        """Everything written to the store's filesystem so far, durable (``syncfs``)."""
        assert _syncfs is not None
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            _syncfs(fd)
        finally:
            os.close(fd)

    def discard(self, temp: BinaryIO) -> None:
        """Close and remove a temp file that will not be committed (idempotent, never raises)."""
        with suppress(OSError):
            temp.close()
        with suppress(OSError):  # already gone, or undeletable: then the doctor finds it as a leftover
            os.unlink(temp.name)

    def delete(self, relpath: str) -> bool:
        """Remove the file at ``relpath`` (after its row is gone); ``False`` if it was not there.

        Directories left empty are removed up to the two hash levels, so retention does not leave
        millions of empty directories behind."""
        final = self.path(relpath)
        try:
            final.unlink()
        except FileNotFoundError:
            return False
        _fsync_dir(final.parent)
        directory = final.parent
        while directory != self.root and directory.parent != self.root:
            try:
                directory.rmdir()
            except OSError:
                break  # not empty (or just reused by a writer): leave it
            directory = directory.parent
        return True

    def move_to_orphans(self, relpath: str) -> Path:
        """Move a file nobody references to ``root/.orphans/<relpath>`` for a person to look at."""
        source = self.path(relpath)
        target = self.root / ORPHAN_DIR / PurePosixPath(relpath)
        self._makedirs(target.parent)
        os.replace(source, target)
        _fsync_dir(target.parent)
        _fsync_dir(source.parent)
        return target

    # -- space -----------------------------------------------------------------------------------

    def free_bytes(self) -> int:
        """Bytes an unprivileged writer can still use on the store's filesystem."""
        usage = os.statvfs(self.root)
        return usage.f_bavail * usage.f_frsize

    def has_room(self, nbytes: int = 0) -> bool:
        """Whether ``nbytes`` more would still leave ``min_free_bytes`` free."""
        return self.free_bytes() - nbytes >= self.min_free_bytes

    # -- looking (the doctor) --------------------------------------------------------------------

    def top_level(self) -> list[str]:
        """Names at the root other than the temp and orphan areas: the hash shards the files live in."""
        return sorted(name for name in os.listdir(self.root) if not name.startswith("."))

    def iter_files(self, under: str | None = None) -> Iterator[tuple[str, int, float]]:
        """Every committed file as ``(relpath, size_bytes, mtime)``, in path order; temp and orphan areas
        excluded. ``under`` limits the walk to one ``top_level()`` entry (the doctor goes shard by shard
        so its memory does not grow with the store)."""
        if under is None:
            for name in self.top_level():
                yield from self.iter_files(name)
            return
        start = self.path(under)
        if start.is_file():
            yield from self._file_entry(str(start))
            return
        for dirpath, dirnames, filenames in os.walk(start):
            dirnames.sort()
            for name in sorted(filenames):
                yield from self._file_entry(os.path.join(dirpath, name))

    def _file_entry(self, full: str) -> Iterator[tuple[str, int, float]]:
        try:
            info = os.lstat(full)
        except FileNotFoundError:
            return  # deleted while we walked
        if stat.S_ISREG(info.st_mode):
            yield os.path.relpath(full, self.root).replace(os.sep, "/"), info.st_size, info.st_mtime

    def temp_leftovers(self, older_than_s: float = 3600.0) -> list[TempLeftover]:
        """Temp files that will never be committed: their writer on this host is gone, or they are older
        than ``older_than_s`` (a writer on another host sharing the store cannot be checked)."""
        return [leftover for leftover in self.temp_files()
                if leftover.age_s > older_than_s or _writer_is_gone(leftover.path.name)]

    def temp_files(self) -> list[TempLeftover]:
        """Every file in the temp area, in name order: files being written now, and leftovers."""
        now = time.time()
        found = []
        for entry in sorted(os.scandir(self._tmp), key=lambda e: e.name):
            try:
                info = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # committed or discarded meanwhile
            found.append(TempLeftover(Path(entry.path), info.st_size, now - info.st_mtime))
        return found

    # -- internals -------------------------------------------------------------------------------

    def _makedirs(self, directory: Path, *, sync: bool = True) -> list[Path]:
        """``mkdir -p``; returns the directories it created, top-down. With ``sync`` each one is fsynced
        into its parent as it is made; without, that is the caller's job."""
        missing = []
        while not directory.is_dir():
            missing.append(directory)
            directory = directory.parent
        created = []
        for new in reversed(missing):
            try:
                new.mkdir()
            except FileExistsError:
                continue
            created.append(new)
            if sync:
                _fsync_dir(new.parent)
        return created


class _DirectorySync:
    """Makes directory entries durable, with one ``syncfs`` for every commit waiting at the same time.

    On ext4 an fsync of a directory always forces a commit of the whole running journal transaction
    (its fast-commit path skips directories). Alone, that transaction is empty after the file's own
    fsync and costs nothing; with several associations receiving, it always holds their spool files'
    block allocations and inode updates, so each of an image's three to five directory fsyncs was a
    journal commit of its own, each waiting for the one before (measured: with four senders of 15 MB
    images, dropping the directory fsyncs, which is not safe, gave ~30% more MB/s and a third of the
    cache flushes; on the shared 2-core machine the figure is noisy). ``syncfs`` makes everything on the
    store's filesystem durable, these directories included, in one commit; a commit that arrives while
    one runs waits for the next, which starts after its rename and serves every commit waiting by then
    (group commit). Its cost: it also writes back whatever else is dirty on the filesystem, so it is
    used only while the whole page cache holds little that is dirty or under writeback
    (:data:`SYNCFS_DIRTY_LIMIT`, from ``/proc/meminfo``: a bound on what the call can have to write);
    otherwise, and where ``syncfs`` is unavailable (or cannot report write errors, before Linux 5.8),
    each directory is fsynced. The file's own data is still made durable by its own fsync, which is
    also what reports a failed writeback of it (a ``syncfs`` on a just-opened descriptor reports only
    errors that occur after it was opened)."""

    def __init__(self, root: Path) -> None:
        self._root = root
        self._changed = threading.Condition()
        self._begun = 0  # syncfs calls begun
        self._finished = 0  # syncfs calls finished (in order: one runs at a time)
        self._running = False
        self._failures: dict[int, OSError] = {}  # recent failed calls, by their number
        self._little_dirty_until = -1.0  # until when (monotonic) little was dirty at the last look

    def syncs(self, directories: list[Path]) -> list[tuple[Callable[[Any], None], Any]]:
        """The calls that make the entries of ``directories`` (changed before they run) durable, for
        :class:`Filing` to run at once beside the file's own fsync: one shared ``syncfs`` where it is
        cheap, else an fsync of each directory. Both make the entries durable; the choice only bounds
        what a ``syncfs`` may have to write, so a look at ``/proc/meminfo`` that found little dirty is
        trusted for :data:`DIRTY_RECHECK_S` (an open, read and close fewer for most received instances)."""
        if _syncfs is None or not directories:
            return [(_fsync_dir, directory) for directory in dict.fromkeys(directories)]
        now = time.monotonic()
        if now >= self._little_dirty_until:
            if not _little_is_dirty():
                return [(_fsync_dir, directory) for directory in dict.fromkeys(directories)]
            self._little_dirty_until = now + DIRTY_RECHECK_S
        return [(self._shared_syncfs, None)]

    def _shared_syncfs(self, _: object) -> None:
        """Return once a ``syncfs`` begun after this call has finished (the one running may have begun
        before the caller's rename: it waits for the next, which serves every caller waiting by then)."""
        assert _syncfs is not None
        with self._changed:
            mine = self._begun + 1  # the first call to begin after ours arrived covers ours
            # A call already running may have written our entries and, failing, reported the error to
            # its own descriptor only (the next call would not see it): its failure is ours too.
            overlapped = self._begun if self._running else None
            while self._finished < mine:
                if self._running:
                    self._changed.wait()
                    continue
                self._running = True
                self._begun += 1
                number = self._begun
                self._changed.release()
                failure: OSError | None = None
                try:
                    fd = os.open(self._root, os.O_RDONLY | os.O_DIRECTORY)
                    try:
                        _syncfs(fd)
                    finally:
                        os.close(fd)
                except OSError as exc:
                    failure = exc
                finally:
                    self._changed.acquire()
                    self._running = False
                    self._finished = number
                    if failure is not None:
                        self._failures[number] = failure
                        for old in [n for n in self._failures if n < number - 64]:
                            del self._failures[old]
                    self._changed.notify_all()
            failure = self._failures.get(mine) or (self._failures.get(overlapped) if overlapped else None)
        if failure is not None:
            raise OSError(failure.errno, failure.strerror, str(self._root))


#: Most page cache, dirty or under writeback (all filesystems), with which :class:`_DirectorySync` uses a
#: ``syncfs``: what the call may have to write besides the commit's own directories, ~0.3 s of a disk
#: writing 200 MB/s. A store receiving radiographs has at most a megabyte or so dirty per association
#: (``pacs_node.dicom.spooling.WRITEBACK_BYTES``).
SYNCFS_DIRTY_LIMIT = 64 * 1024 * 1024
_MEMINFO = "/proc/meminfo"

#: How long :class:`_DirectorySync` trusts a look at ``/proc/meminfo`` that found little dirty (seconds):
#: the page cache can gain at most what the machine writes meanwhile.
DIRTY_RECHECK_S = 0.05


def _little_is_dirty() -> bool:
    """Whether the page cache holds less than :data:`SYNCFS_DIRTY_LIMIT` dirty or under writeback
    (``False`` where ``/proc/meminfo`` cannot be read)."""
    try:
        with open(_MEMINFO, "rb", buffering=0) as meminfo:
            text = meminfo.read(8192)
    except OSError:
        return False
    total = 0
    for name in (b"\nDirty:", b"\nWriteback:"):
        at = text.find(name)
        if at < 0:
            return False
        total += int(text[at + len(name):text.index(b"kB", at)]) * 1024
    return total < SYNCFS_DIRTY_LIMIT


#: Threads that run the fsyncs of :meth:`InstanceStore.begin_commit` (each waits in the kernel; a
#: received instance needs two to six of them at once).
_SYNC_THREADS = 8


class _SyncThreads:
    """Threads that fsync what they are given and tell its :class:`Filing`. Lighter than a
    ``ThreadPoolExecutor`` (no future, condition and work item per fsync: a received instance has up to
    six of them)."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self._work: queue.SimpleQueue[tuple[Callable[[Any], None], Any, Filing]] = queue.SimpleQueue()
        for n in range(_SYNC_THREADS):
            threading.Thread(target=self._run, name=f"fsync-{n}", daemon=True).start()

    def submit(self, sync: Callable[[Any], None], target: Any, filing: Filing) -> None:
        self._work.put((sync, target, filing))

    def _run(self) -> None:
        while True:
            sync, target, filing = self._work.get()
            try:
                sync(target)
            except BaseException as exc:  # noqa: BLE001 (handed to the waiting caller)
                filing._synced(exc)
            else:
                filing._synced(None)


_sync_threads: _SyncThreads | None = None
_sync_threads_lock = threading.Lock()


def _fsync_threads() -> _SyncThreads:
    """The process's fsync threads, started when first needed (and again in a forked child, which has
    none of its parent's threads)."""
    global _sync_threads
    with _sync_threads_lock:
        if _sync_threads is None or _sync_threads.pid != os.getpid():
            _sync_threads = _SyncThreads()
        return _sync_threads


def _fsync_fd(fd: int) -> None:
    os.fsync(fd)  # looked up when it runs (tests replace it)


class Filing:
    """An :meth:`InstanceStore.begin_commit` in flight: the file has its name, its fsync and its
    directories' run in the fsync threads (:data:`_SYNC_THREADS`). :meth:`wait` returns once all of them
    are done."""

    def __init__(self, store: InstanceStore, temp: BinaryIO | None, final: Path, directories: list[Path]) -> None:
        self._store = store
        self._temp = temp
        self._final = final
        self._error: BaseException | None = None
        self._waited = False
        # Held until the last fsync is over; the fsync threads count down without a lock of their own
        # (``next`` of an ``itertools.count`` is atomic): one lock hand-off per filing instead of an
        # ``Event``'s condition, lock and waiter lock, on the path of every received instance.
        self._all_synced = threading.Lock()
        self._sync_error: BaseException | None = None
        targets = store._directory_sync.syncs(directories)
        if temp is not None:  # else fsync-then-rename: the file is durable already
            targets.insert(0, (_fsync_fd, temp.fileno()))
        self._left = itertools.count(len(targets) - 1, -1)  # fsyncs still running after the next is over
        if targets:
            self._all_synced.acquire()
            threads = _fsync_threads()
            for sync, target in targets:
                threads.submit(sync, target, self)

    def _synced(self, error: BaseException | None) -> None:
        """One fsync is over (``error``: how it failed)."""
        if error is not None and self._sync_error is None:
            self._sync_error = error  # before the count: the waiter reads it once the last one is over
        if next(self._left) == 0:
            self._all_synced.release()

    def wait(self) -> Path:
        """The file's path, once it and its name are durable; on a failure the new name and the temp
        file are removed and the error is raised (again on every call; a full disk as ``StoreFullError``)."""
        if self._error is not None:
            raise self._error
        if not self._waited:
            self._waited = True
            with self._all_synced:
                pass
            try:
                if self._sync_error is not None:
                    raise self._sync_error
                if self._temp is not None:
                    self._temp.close()
            except OSError as exc:
                if self._temp is not None:
                    self._store._undo(self._temp, self._final)
                try:
                    _raise_full_or(exc, self._final)
                except OSError as raised:
                    self._error = raised
                    raise
            except BaseException as exc:
                if self._temp is not None:
                    self._store._undo(self._temp, self._final)
                self._error = exc
                raise
        return self._final


def _libc_function(name: str) -> Any:
    """The C library's function ``name`` (errno kept for ``ctypes.get_errno``) on Linux; ``None``
    elsewhere or where the library lacks it."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True), name)
    except (OSError, AttributeError):
        return None


def _load_sync_file_range() -> Callable[[int], None] | None:
    """Linux ``sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE)``: start writing a file's dirty pages
    without waiting for them. ``None`` where the C library does not have it."""
    call = _libc_function("sync_file_range")
    if call is None:
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    call.restype = ctypes.c_int
    return lambda fd: call(fd, 0, 0, 2)  # 2 = SYNC_FILE_RANGE_WRITE


_sync_file_range = _load_sync_file_range()


def start_writeback(fd: int) -> None:
    """Start writing the dirty pages of the file open as ``fd`` to disk now, without waiting.

    Files arriving over the network are written by a thread we do not control (pynetdicom's); left
    alone, the kernel writes them only at ``commit``'s fsync, so the sender waits for the whole image to
    be received *and then* for the whole image to reach the disk. Called as each few megabytes arrive
    (:class:`pacs_node.dicom.spooling.SpoolFile`), this overlaps the two, and the fsync finds little
    left to do. Durability does not depend on it. A no-op where ``sync_file_range`` is unavailable."""
    if _sync_file_range is not None:
        _sync_file_range(fd)


def _link_if_absent(temp: str, final: Path) -> bool:
    """Give the file at ``temp`` the name ``final`` unless that name exists; ``False`` (nothing done)
    if it exists or the filesystem has no hard links. The temp name is dropped once linked: were this
    process to die in between, it is a leftover of a dead writer, removed as any other."""
    try:
        os.link(temp, final)
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
            return False
        raise
    os.unlink(temp)
    return True


def _kernel_version() -> tuple[int, int]:
    """The running kernel's major and minor version, ``(0, 0)`` if it cannot be read."""
    match = re.match(r"(\d+)\.(\d+)", os.uname().release)
    return (int(match[1]), int(match[2])) if match else (0, 0)


def _load_syncfs() -> Callable[[int], None] | None:
    """Linux ``syncfs(fd)``: write back and commit everything dirty on ``fd``'s filesystem, and wait (its
    write errors are reported since Linux 5.8). ``None`` where the C library does not have it, and on
    older kernels: there a failed writeback would be a silent success, and fsync is what reports it."""
    call = _libc_function("syncfs") if _kernel_version() >= (5, 8) else None
    if call is None:
        return None
    call.argtypes = [ctypes.c_int]
    call.restype = ctypes.c_int

    def syncfs(fd: int) -> None:
        if call(fd) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, os.strerror(errno))

    return syncfs


_syncfs = _load_syncfs()


def _safe_name(uid: str) -> str:
    if len(uid) <= 64 and _UID.match(uid):
        return uid
    return "x" + hashlib.sha256(uid.encode("utf-8", "surrogatepass")).hexdigest()[:40]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _raise_full_or(exc: OSError, path: Path) -> NoReturn:
    """Raise ``StoreFullError`` for a no-space error, ``exc`` itself otherwise."""
    if exc.errno in _FULL_ERRNOS and not isinstance(exc, StoreFullError):
        raise StoreFullError(exc.errno, f"instance store is full ({os.strerror(exc.errno)})", str(path)) from exc
    raise exc


def writer_prefix() -> str:
    """How every temp file written by this process starts: its host and process id, so that the doctor
    and housekeeping can tell a live writer from a dead one (``tempfile`` names need it as ``prefix``)."""
    return f"{_HOST}-{os.getpid()}-"


def _writer_is_gone(name: str) -> bool:
    """Whether the temp file ``name`` (made with :func:`writer_prefix`) was opened by a process on this
    host that no longer exists."""
    match = re.fullmatch(r"(?P<host>.+)-(?P<pid>\d+)-[0-9A-Za-z_]+\.[a-z]+", name)
    if match is None or match["host"] != _HOST:
        return False
    pid = int(match["pid"])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


__all__ = ["Filing", "InstanceStore", "StoreFullError", "TempLeftover", "ORPHAN_DIR", "TEMP_DIR", "start_writeback",
           "writer_prefix"]
