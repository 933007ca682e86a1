"""The instance store: nothing half-written ever appears, a full disk is a clear error, paths are safe."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storage.store import ORPHAN_DIR, TEMP_DIR, InstanceStore, StoreFullError
from tests.support import mounted_tmpfs

STUDY, SERIES, SOP = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.1.1", "1.2.826.0.1.3680043.8.498.1.1.1"


def _all_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.fixture
def store(tmp_path: Path) -> InstanceStore:
    return InstanceStore(tmp_path / "store")


def test_write_commit_and_read_back(store: InstanceStore) -> None:
    relpath = store.relpath_for(STUDY, SERIES, SOP)
    assert relpath.endswith(f"/{STUDY}/{SERIES}/{SOP}.dcm")
    with store.temp() as temp:
        temp.write(b"DICM" * 1000)
        final = store.commit(temp, relpath)
    assert final == store.path(relpath)
    assert final.read_bytes() == b"DICM" * 1000
    assert list(store.iter_files()) == [(relpath, 4000, final.stat().st_mtime)]
    assert os.listdir(store.root / TEMP_DIR) == []


def test_commit_replaces_atomically(store: InstanceStore) -> None:
    relpath = store.relpath_for(STUDY, SERIES, SOP)
    store.write_bytes(relpath, b"old")
    store.write_bytes(relpath, b"new")
    assert store.path(relpath).read_bytes() == b"new"


def test_exception_mid_write_leaves_nothing(store: InstanceStore) -> None:
    relpath = store.relpath_for(STUDY, SERIES, SOP)
    with pytest.raises(RuntimeError, match="association aborted"), store.temp() as temp:
        temp.write(b"partial")
        raise RuntimeError("association aborted")
    assert _all_files(store.root) == []
    assert not store.path(relpath).exists()


def test_temp_not_committed_is_discarded(store: InstanceStore) -> None:
    with store.temp() as temp:
        temp.write(b"never committed")
    assert _all_files(store.root) == []


@pytest.mark.parametrize("naming", ["link", "replace"])
def test_failure_inside_commit_leaves_nothing(store: InstanceStore, naming: str) -> None:
    # A new path is named by a hard link, an existing one by a rename: either failing leaves what was there.
    relpath = store.relpath_for(STUDY, SERIES, SOP)
    if naming == "replace":
        store.write_bytes(relpath, b"old")
    temp = store.open_temp()
    temp.write(b"x" * 10)
    with mock.patch(f"storage.store.os.{naming}", side_effect=OSError(errno.EIO, "I/O error")), \
            pytest.raises(OSError, match="I/O error") as raised:
        store.commit(temp, relpath)
    assert not isinstance(raised.value, StoreFullError)
    assert _all_files(store.root) == ([] if naming == "link" else [relpath])
    if naming == "replace":
        assert store.path(relpath).read_bytes() == b"old"


def _commit_recording(store: InstanceStore, relpath: str, data: bytes) -> list[str]:
    """Commit ``data`` to ``relpath``; the temp file's fsync and its naming (a hard link to a new path, a
    rename onto an existing one), in the order they happened."""
    calls: list[str] = []
    real_fsync, real_replace, real_link = os.fsync, os.replace, os.link
    temp = store.open_temp()
    temp.write(data)
    temp_fd = temp.fileno()

    def fsync(fd: int) -> None:
        if fd == temp_fd and not temp.closed:  # once it is closed, a directory's fd may get its number
            calls.append("fsync")
        real_fsync(fd)

    def replace(source: str, target: object) -> None:
        calls.append("rename")
        real_replace(source, target)

    def link(source: str, target: object) -> None:
        calls.append("link")
        real_link(source, target)

    with mock.patch("storage.store.os.fsync", side_effect=fsync), \
            mock.patch("storage.store.os.replace", side_effect=replace), \
            mock.patch("storage.store.os.link", side_effect=link):
        store.commit(temp, relpath)
    return calls


def test_a_file_that_a_row_may_reference_is_replaced_only_by_one_already_durable(store: InstanceStore) -> None:
    # A new path has no row yet: it is linked first, then one fsync commits data and name together. An
    # existing path may have a row: the new content must be on disk before it takes the name.
    relpath = store.relpath_for(STUDY, SERIES, SOP)
    assert _commit_recording(store, relpath, b"first") == ["link", "fsync"]
    # The name exists (a concurrent writer may have committed and recorded it): the link refuses, the
    # content is made durable, then renamed onto it.
    assert _commit_recording(store, relpath, b"second") == ["link", "fsync", "rename"]
    assert store.path(relpath).read_bytes() == b"second"


def test_a_new_file_whose_fsync_fails_after_its_naming_is_not_left_at_its_path(store: InstanceStore) -> None:
    relpath = store.relpath_for(STUDY, SERIES, SOP)
    temp = store.open_temp()
    temp.write(b"x" * 10)
    with mock.patch("storage.store.os.fsync", side_effect=OSError(errno.EIO, "I/O error")), \
            pytest.raises(OSError, match="I/O error"):
        store.commit(temp, relpath)
    assert not store.path(relpath).exists()
    assert _all_files(store.root) == []


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_no_space_at_fsync_is_store_full_and_removes_the_temp(store: InstanceStore, code: int) -> None:
    temp = store.open_temp()
    temp.write(b"x" * 10)
    with mock.patch("storage.store.os.fsync", side_effect=OSError(code, os.strerror(code))), \
            pytest.raises(StoreFullError) as raised:
        store.commit(temp, store.relpath_for(STUDY, SERIES, SOP))
    assert raised.value.errno == code
    assert isinstance(raised.value, OSError)
    assert _all_files(store.root) == []


def test_no_space_while_the_caller_writes_is_store_full(store: InstanceStore) -> None:
    with pytest.raises(StoreFullError), store.temp() as temp:
        temp.write(b"abc")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert _all_files(store.root) == []


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A real 2 MiB filesystem, so "disk full" is the kernel's ENOSPC and not a mock."""
    with mounted_tmpfs(tmp_path / "tiny", "2m") as mountpoint:
        yield mountpoint


def test_real_disk_full_leaves_nothing_and_recovers(tiny_tmpfs: Path) -> None:
    store = InstanceStore(tiny_tmpfs / "store", min_free_bytes=256 * 1024)
    first = store.relpath_for(STUDY, SERIES, SOP)
    store.write_bytes(first, os.urandom(1024 * 1024))
    assert not store.has_room(1024 * 1024)  # the watermark would have refused this one up front
    with pytest.raises(StoreFullError) as raised:
        store.write_bytes(store.relpath_for(STUDY, SERIES, SOP + ".2"), os.urandom(1536 * 1024))
    assert raised.value.errno == errno.ENOSPC
    assert [relpath for relpath, _size, _mtime in store.iter_files()] == [first]
    assert os.listdir(store.root / TEMP_DIR) == []
    # space comes back: the next image is stored whole
    assert store.delete(first)
    second = store.relpath_for(STUDY, SERIES, SOP + ".3")
    data = os.urandom(1024 * 1024)
    store.write_bytes(second, data)
    assert store.path(second).read_bytes() == data
    assert store.has_room(0)


_KILLED_WRITER = """
import os, signal, sys
from storage.store import InstanceStore
store = InstanceStore(sys.argv[1])
temp = store.open_temp()
temp.write(b"half an image" * 1000)
temp.flush()
print(temp.name, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_writer_killed_mid_file_leaves_only_a_recognisable_temp(store: InstanceStore) -> None:
    result = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(store.root)], capture_output=True,
                            text=True, cwd=Path(__file__).resolve().parents[2], timeout=60)
    assert result.returncode == -signal.SIGKILL
    temp_name = result.stdout.strip()
    assert list(store.iter_files()) == []
    leftovers = store.temp_leftovers(older_than_s=3600)
    assert [str(leftover.path) for leftover in leftovers] == [temp_name]
    # a temp file of a live writer (this process) is not a leftover
    live = store.open_temp()
    try:
        assert [str(leftover.path) for leftover in store.temp_leftovers(older_than_s=3600)] == [temp_name]
    finally:
        store.discard(live)


@pytest.mark.parametrize(
    "uid", ["../../../etc/passwd", "/etc/passwd", "1.2.3/../../x", "..", ".", "1.2\x00.3", "1" * 65, "01.2", ""]
)
def test_hostile_uids_never_become_path_parts(store: InstanceStore, uid: str) -> None:
    relpath = store.relpath_for(uid, uid, uid)
    parts = relpath.split("/")
    assert len(parts) == 5
    assert all(part and part not in (".", "..") and "\x00" not in part for part in parts)
    assert store.path(relpath).is_relative_to(store.root)
    store.write_bytes(relpath, b"x")
    assert store.path(relpath).read_bytes() == b"x"


def test_distinct_hostile_uids_get_distinct_paths(store: InstanceStore) -> None:
    assert store.relpath_for(STUDY, SERIES, "../a") != store.relpath_for(STUDY, SERIES, "../b")


@pytest.mark.parametrize("relpath", ["../x", "/etc/passwd", "a/../../x", "a//b", f"{TEMP_DIR}/x",
                                     f"{ORPHAN_DIR}/x", "", "a\\..\\b", "a/./b"])
def test_path_refuses_anything_outside_the_store(store: InstanceStore, relpath: str) -> None:
    with pytest.raises(ValueError, match="not a path inside the instance store"):
        store.path(relpath)


def test_delete_prunes_empty_directories_but_keeps_the_root(store: InstanceStore) -> None:
    relpath = store.relpath_for(STUDY, SERIES, SOP)
    store.write_bytes(relpath, b"x")
    assert store.delete(relpath)
    assert not store.delete(relpath)
    leftover_dirs = [p for p in store.root.rglob("*") if p.is_dir() and p.name != TEMP_DIR]
    assert all(len(p.relative_to(store.root).parts) <= 1 for p in leftover_dirs)


def test_watermark(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path / "s", min_free_bytes=0)
    assert store.free_bytes() > 0
    assert store.has_room(1)
    # other processes change the free space between two calls: ask for far more than there is
    assert not InstanceStore(tmp_path / "s", min_free_bytes=2 * store.free_bytes() + 2**40).has_room(0)
    with pytest.raises(ValueError, match="min_free_bytes"):
        InstanceStore(tmp_path / "s", min_free_bytes=-1)


@settings(max_examples=300, deadline=None)
@given(study=st.text(max_size=80), series=st.text(max_size=80), sop=st.text(max_size=80),
       other=st.text(max_size=80))
def test_any_uid_text_maps_inside_the_store_and_distinct_sops_stay_distinct(
    tmp_path_factory: pytest.TempPathFactory, study: str, series: str, sop: str, other: str
) -> None:
    store = InstanceStore(tmp_path_factory.getbasetemp() / "property-store")
    relpath = store.relpath_for(study, series, sop)
    assert store.path(relpath).is_relative_to(store.root)  # path() refuses anything else
    assert len(relpath.split("/")) == 5
    if other != sop:
        assert store.relpath_for(study, series, other) != relpath



@pytest.mark.parametrize("syncfs", [True, False], ids=["syncfs", "fsync each"])
def test_write_many_puts_every_file_in_place_and_leaves_no_temp(store: InstanceStore, syncfs: bool,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import storage.store as store_module

    if not syncfs:
        monkeypatch.setattr(store_module, "_syncfs", None)
    elif store_module._syncfs is None:
        pytest.skip("no syncfs here")
    files = [(store.relpath_for(STUDY, f"{SERIES}.{i}", f"{SOP}.{i}"), bytes([i]) * 100) for i in range(5)]
    paths = store.write_many(files)
    assert [p.read_bytes() for p in paths] == [data for _, data in files]
    assert paths == [store.path(relpath) for relpath, _ in files]
    assert not list((store.root / TEMP_DIR).iterdir())
    store.write_many(files[:1])  # written again (a job run twice): replaced, not doubled
    assert _all_files(store.root).count(files[0][0]) == 1


def test_write_many_that_fails_removes_its_temp_files(store: InstanceStore, monkeypatch: pytest.MonkeyPatch) -> None:
    files = [(store.relpath_for(STUDY, SERIES, f"{SOP}.{i}"), b"x" * 100) for i in range(3)]
    real_replace = os.replace
    calls = []

    def full_after_one(src, dst):  # noqa: ANN001, ANN202
        calls.append(dst)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", full_after_one)
    with pytest.raises(StoreFullError):
        store.write_many(files)
    assert not list((store.root / TEMP_DIR).iterdir())
    assert _all_files(store.root) == [files[0][0]]  # the first is in place (whole); the rest never appeared


def test_concurrent_commits_share_the_syncfs_that_makes_their_names_durable(
        store: InstanceStore, monkeypatch: pytest.MonkeyPatch) -> None:
    # Each commit returns only after a syncfs that began after its name was given; those waiting at the
    # same time share one (on ext4 every directory fsync is a journal commit of its own).
    import threading
    import time

    import storage.store as store_module

    began: list[float] = []

    def slow_syncfs(fd: int) -> None:
        began.append(time.monotonic())
        time.sleep(0.2)

    monkeypatch.setattr(store_module, "_syncfs", slow_syncfs)
    monkeypatch.setattr(store_module, "_little_is_dirty", lambda: True)
    named: dict[int, float] = {}
    real_link = os.link

    def link(source: str, target: object) -> None:
        real_link(source, target)
        named[threading.get_ident()] = time.monotonic()

    returned: dict[int, float] = {}

    def commit(i: int) -> None:
        with store.temp() as temp:
            temp.write(bytes([i]) * 1000)
            store.commit(temp, store.relpath_for(f"{STUDY}.{i}", SERIES, SOP))
        returned[threading.get_ident()] = time.monotonic()

    with mock.patch("storage.store.os.link", side_effect=link):
        threads = [threading.Thread(target=commit, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    assert len(returned) == 8
    assert 1 <= len(began) <= 3  # one, or one running and one for all who came meanwhile (and a straggler)
    for ident, at in named.items():
        covering = [b for b in began if b >= at]
        assert covering and covering[0] + 0.2 <= returned[ident] + 0.01
    assert sorted(store.path(store.relpath_for(f"{STUDY}.{i}", SERIES, SOP)).read_bytes()[0] for i in range(8)) \
        == list(range(8))


def test_a_failed_syncfs_fails_the_commits_it_covered_and_leaves_nothing(
        store: InstanceStore, monkeypatch: pytest.MonkeyPatch) -> None:
    import storage.store as store_module

    def failing_syncfs(fd: int) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(store_module, "_syncfs", failing_syncfs)
    monkeypatch.setattr(store_module, "_little_is_dirty", lambda: True)
    relpath = store.relpath_for(STUDY, SERIES, SOP)
    with store.temp() as temp:
        temp.write(b"x" * 10)
        with pytest.raises(OSError, match="I/O error"):
            store.commit(temp, relpath)
    assert _all_files(store.root) == []
    monkeypatch.setattr(store_module, "_syncfs", lambda fd: None)
    store.write_bytes(relpath, b"again")  # the next one is not answered with the old failure
    assert store.path(relpath).read_bytes() == b"again"


@pytest.mark.parametrize("why", ["no syncfs", "much is dirty"])
def test_without_syncfs_every_new_directory_is_fsynced(store: InstanceStore, monkeypatch: pytest.MonkeyPatch,
                                                       why: str) -> None:
    import storage.store as store_module

    if why == "no syncfs":
        monkeypatch.setattr(store_module, "_syncfs", None)
    else:  # a syncfs would have to write out all of it: not for one commit's directories
        monkeypatch.setattr(store_module, "_syncfs", mock.Mock(side_effect=AssertionError("syncfs called")))
        monkeypatch.setattr(store_module, "_little_is_dirty", lambda: False)
    synced: list[Path] = []
    real = store_module._fsync_dir
    monkeypatch.setattr(store_module, "_fsync_dir", lambda d: (synced.append(d), real(d)))
    relpath = store.relpath_for(STUDY, SERIES, SOP)
    final = store.write_bytes(relpath, b"x")
    # the file's directory and each new directory's parent, up to the root (fsynced at once, in any order)
    assert sorted(synced) == sorted([final.parent, *list(final.parents)[1:5]])


@pytest.mark.parametrize(("dirty_kb", "writeback_kb", "little"), [(684, 0, True), (40000, 30000, False), (None, 0, False)])
def test_how_much_is_dirty_is_read_from_meminfo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                dirty_kb: int | None, writeback_kb: int, little: bool) -> None:
    import storage.store as store_module

    meminfo = tmp_path / "meminfo"
    lines = ["MemTotal:       24684000 kB", f"Writeback:      {writeback_kb:8d} kB", "Shmem:  70000 kB"]
    if dirty_kb is not None:  # a kernel that does not say: assume the worst
        lines.insert(1, f"Dirty:          {dirty_kb:8d} kB")
    meminfo.write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(store_module, "_MEMINFO", str(meminfo))
    assert store_module._little_is_dirty() is little
    monkeypatch.setattr(store_module, "_MEMINFO", str(tmp_path / "absent"))
    assert store_module._little_is_dirty() is False


def test_a_failed_commit_leaves_the_file_a_concurrent_writer_put_at_its_name(store: InstanceStore) -> None:
    # A names its file first; B, finding the name taken, renames its own durable file over it (and records
    # it); A's fsync then fails: A's undo must not remove what is now B's file.
    relpath = store.relpath_for(STUDY, SERIES, SOP)
    temp = store.open_temp()
    temp.write(b"from A")
    with mock.patch("storage.store.os.fsync", side_effect=OSError(errno.EIO, "I/O error")):
        filing = store.begin_commit(temp, relpath)
        other = store.path(relpath).with_suffix(".b")
        other.write_bytes(b"from B")
        os.replace(other, store.path(relpath))
        with pytest.raises(OSError, match="I/O error"):
            filing.wait()
    assert store.path(relpath).read_bytes() == b"from B"


def test_a_commit_that_arrived_while_a_failing_syncfs_ran_fails_too(
        store: InstanceStore, monkeypatch: pytest.MonkeyPatch) -> None:
    # The running call may have written the late commit's entries and kept the error to itself: the next
    # call succeeding proves nothing for them.
    import threading
    import time

    import storage.store as store_module

    calls: list[int] = []

    def syncfs(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 1:
            time.sleep(0.3)
            raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(store_module, "_syncfs", syncfs)
    monkeypatch.setattr(store_module, "_little_is_dirty", lambda: True)
    outcomes: dict[str, object] = {}

    def commit(name: str) -> None:
        try:
            with store.temp() as temp:
                temp.write(name.encode())
                store.commit(temp, store.relpath_for(f"{STUDY}.{name}", SERIES, SOP))
            outcomes[name] = "ok"
        except OSError as exc:
            outcomes[name] = exc.errno

    first = threading.Thread(target=commit, args=("1",))
    first.start()
    while not calls:
        time.sleep(0.01)
    commit("2")  # arrives while the first call runs
    first.join(10)
    assert outcomes == {"1": errno.EIO, "2": errno.EIO}


def test_a_look_that_found_little_dirty_is_trusted_for_a_moment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import storage.store as store_module

    if store_module._syncfs is None:
        monkeypatch.setattr(store_module, "_syncfs", lambda fd: None)
    meminfo = tmp_path / "meminfo"
    monkeypatch.setattr(store_module, "_MEMINFO", str(meminfo))
    clock = [1000.0]
    monkeypatch.setattr(store_module.time, "monotonic", lambda: clock[0])
    sync = store_module._DirectorySync(tmp_path)

    def uses_syncfs(dirty_kb: int) -> bool:
        meminfo.write_text(f"MemTotal: 24684000 kB\nDirty: {dirty_kb:8d} kB\nWriteback: 0 kB\n")
        return [call for call, _ in sync.syncs([tmp_path])] == [sync._shared_syncfs]

    assert uses_syncfs(100)
    clock[0] += store_module.DIRTY_RECHECK_S / 2
    assert uses_syncfs(10_000_000)  # not read again (before: read for every commit)
    clock[0] += store_module.DIRTY_RECHECK_S
    assert not uses_syncfs(10_000_000)  # read again: too much dirty, each directory fsynced
    assert uses_syncfs(100)  # a look that found much dirty is not kept: read again at once
