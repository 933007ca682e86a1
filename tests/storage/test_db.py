"""Engine configuration: SQLite durability settings, write transactions that lock up front, writers' turns
across processes, fork safety."""

from __future__ import annotations

import errno
import fcntl
import multiprocessing
import multiprocessing.synchronize
import os
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

import storage.db
from storage.db import (WriterTurns, driver_transaction, make_engine, make_sessionmaker, sqlite_url, upgrade,
                        write_engine)


def test_sqlite_url_is_absolute_and_make_engine_creates_the_directory(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    url = sqlite_url("data/node.sqlite3")
    assert url == f"sqlite:///{tmp_path}/data/node.sqlite3"
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    finally:
        engine.dispose()
    assert (tmp_path / "data" / "node.sqlite3").is_file()


def test_unsupported_database_is_refused_without_leaking_the_password() -> None:
    with pytest.raises(ValueError, match="unsupported database URL") as raised:
        make_engine("mysql://admin:s3cret@db/pacs")
    assert "s3cret" not in str(raised.value)
    with pytest.raises(ValueError, match="not a database URL") as raised:
        make_engine("postgres ql://admin:s3cret@db/pacs")
    assert "s3cret" not in str(raised.value)


def test_sqlite_engine_is_configured_for_durability(sqlite_db: str) -> None:
    engine = make_engine(sqlite_db)
    try:
        with engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
            assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 1000
    finally:
        engine.dispose()


def test_first_connections_at_the_same_moment_all_open_a_new_database(tmp_path: Path) -> None:
    """Six first connections to each of many new files, released together: without the retry around the
    switch to WAL about one new database in twenty refused a connection with "database is locked"."""
    failures: list[BaseException] = []
    for i in range(150):
        engines = [make_engine(sqlite_url(tmp_path / f"new{i}.sqlite3")) for _ in range(6)]
        barrier = threading.Barrier(len(engines))

        def connect(engine: Engine) -> None:
            barrier.wait()
            try:
                with engine.connect() as connection:
                    assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            except BaseException as exc:  # noqa: BLE001 (collected for the assertion)
                failures.append(exc)

        threads = [threading.Thread(target=connect, args=(engine,)) for engine in engines]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for engine in engines:
            engine.dispose()
    assert failures == []


def test_immediate_sessions_take_the_write_lock_at_begin(sqlite_db: str) -> None:
    upgrade(sqlite_db)
    engine = make_engine(sqlite_db)
    path = sqlite_db.removeprefix("sqlite:///")
    try:
        writer = make_sessionmaker(engine, immediate=True)
        reader = make_sessionmaker(engine)
        with reader.begin() as session:
            session.execute(text("SELECT count(*) FROM jobs"))
            _assert_writable(path)  # a read transaction holds up nobody
        with writer.begin() as session:
            session.execute(text("SELECT count(*) FROM jobs"))  # no write yet, but the lock is taken
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                _assert_writable(path)
        _assert_writable(path)
    finally:
        engine.dispose()


def _turn_is_free(path: str) -> bool:
    """Whether no write transaction holds the writers' turn of the SQLite database at ``path``."""
    fd = os.open(f"{path}-writers", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def test_sqlite_writers_hold_their_turn_from_begin_to_after_commit_or_rollback(sqlite_db: str) -> None:
    upgrade(sqlite_db)
    engine = make_engine(sqlite_db)
    path = sqlite_db.removeprefix("sqlite:///")
    try:
        writer, reader = make_sessionmaker(engine, immediate=True), make_sessionmaker(engine)
        with reader.begin() as session:
            session.execute(text("SELECT count(*) FROM jobs"))
            assert _turn_is_free(path)  # a read transaction takes no turn
        with writer.begin() as session:
            session.execute(text("SELECT count(*) FROM jobs"))
            assert not _turn_is_free(path)
        assert _turn_is_free(path)
        with pytest.raises(RuntimeError), writer.begin() as session:
            session.execute(text("SELECT count(*) FROM jobs"))
            assert not _turn_is_free(path)
            raise RuntimeError("rolled back")
        assert _turn_is_free(path)
        with driver_transaction(write_engine(engine)) as connection:
            connection.cursor().execute("SELECT 1")
            assert not _turn_is_free(path)
        assert _turn_is_free(path)
        with pytest.raises(RuntimeError), driver_transaction(write_engine(engine)):
            raise RuntimeError("rolled back")
        assert _turn_is_free(path)
    finally:
        engine.dispose()


def _hold_the_write_lock(url: str, holding: multiprocessing.synchronize.Event,
                         release: multiprocessing.synchronize.Event) -> None:
    """Another process of the node: a write transaction open until ``release``."""
    engine = make_engine(url)
    try:
        with driver_transaction(engine) as connection:
            connection.cursor().execute("INSERT INTO turns (key) VALUES ('holder')")
            holding.set()
            release.wait(60)
    finally:
        engine.dispose()


def test_a_writer_of_another_process_waits_for_its_turn_and_is_woken_by_the_commit(
        sqlite_db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two listener processes writing at once: the second waits in the kernel for the first's turn and
    is woken when it commits, not in SQLite's busy handler (which sleeps 1, 2, 5, ... 100 ms between
    tries). Its connection's busy timeout is 0, so a wait in SQLite's handler would fail at once with
    "database is locked"; its rechecks are an hour apart, so only the holder's wake-up ends the wait."""
    engine = make_engine(sqlite_db)
    with engine.begin() as setup:
        setup.exec_driver_sql("CREATE TABLE turns (key TEXT)")
    monkeypatch.setattr(storage.db, "_TURN_RECHECK_S", 3600.0, raising=False)
    context = multiprocessing.get_context("spawn")
    holding, release = context.Event(), context.Event()
    holder = context.Process(target=_hold_the_write_lock, args=(sqlite_db, holding, release))
    holder.start()
    try:
        assert holding.wait(60)
        raw = engine.raw_connection()
        raw.cursor().execute("PRAGMA busy_timeout=0")
        raw.close()  # back to the pool, which hands it out next (last in, first out)
        outcome: list[object] = []

        def write() -> None:
            try:
                with driver_transaction(engine) as connection:
                    connection.cursor().execute("INSERT INTO turns (key) VALUES ('waiter')")
                outcome.append("committed")
            except Exception as exc:  # noqa: BLE001 (reported by the assertion below)
                outcome.append(exc)

        waiter = threading.Thread(target=write)
        waiter.start()
        waiter.join(0.5)
        assert outcome == []  # waiting for the holder's turn, not failed by SQLite's lock
        release.set()
        waiter.join(30)
        assert outcome == ["committed"]
        holder.join(30)
        assert holder.exitcode == 0
        with engine.connect() as connection:
            keys = connection.execute(text("SELECT key FROM turns"))
            assert sorted(keys.scalars()) == ["holder", "waiter"]
    finally:
        release.set()
        holder.join(30)
        engine.dispose()


def test_a_waiting_writer_is_woken_with_its_descriptors_past_fd_setsize(tmp_path: Path) -> None:
    # A busy listener holds sockets and files: the FIFO's descriptor may be past select()'s 1024.
    turns = WriterTurns(str(tmp_path / "node.sqlite3"))
    holder, waiter = turns.open_lock(), turns.open_lock()
    assert holder is not None and waiter is not None
    filler = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        assert turns.take(holder)
        outcome: list[object] = []

        def wait() -> None:
            try:
                outcome.append(turns.take(waiter))
            except Exception as exc:  # noqa: BLE001 (reported by the assertion below)
                outcome.append(exc)

        thread = threading.Thread(target=wait)
        thread.start()
        thread.join(0.3)
        assert outcome == []  # waiting: the turn is held
        turns.give_back(holder)
        thread.join(30)
        assert outcome == [True]
        turns.give_back(waiter)
    finally:
        for fd in [*filler, holder, waiter]:
            os.close(fd)


def test_a_filesystem_without_flock_leaves_writers_to_sqlites_lock(sqlite_db: str, monkeypatch: pytest.MonkeyPatch
                                                                    ) -> None:
    # Some network filesystems answer flock with ENOLCK (not causable here for real: a mock of that fault).
    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    engine = make_engine(sqlite_db)
    try:
        with engine.begin() as setup:
            setup.exec_driver_sql("CREATE TABLE turns (key TEXT)")
        monkeypatch.setattr(fcntl, "flock", no_locks)
        with driver_transaction(engine) as connection:
            connection.cursor().execute("INSERT INTO turns (key) VALUES ('written')")
        with make_sessionmaker(engine, immediate=True).begin() as session:
            session.execute(text("INSERT INTO turns (key) VALUES ('by a session')"))
        with engine.connect() as connection:
            assert connection.execute(text("SELECT count(*) FROM turns")).scalar_one() == 2
    finally:
        engine.dispose()


def _assert_writable(path: str) -> None:
    other = sqlite3.connect(path, timeout=0.05, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        other.execute("ROLLBACK")
    finally:
        other.close()


def test_a_forked_child_gets_its_own_connections(pg_url: str) -> None:
    """A worker forked from a process with pooled connections must open its own, not talk over the
    parent's socket (PostgreSQL tells them apart by backend pid)."""
    engine = make_engine(pg_url)
    try:
        with engine.connect() as connection:  # the parent's pool now holds a live connection
            parent_backend = connection.execute(text("SELECT pg_backend_pid()")).scalar_one()
        context = multiprocessing.get_context("fork")
        result = context.Queue()

        def child() -> None:
            with engine.connect() as connection:
                result.put(connection.execute(text("SELECT pg_backend_pid()")).scalar_one())

        process = context.Process(target=child)
        process.start()
        process.join(timeout=60)
        assert process.exitcode == 0
        assert result.get(timeout=5) != parent_backend
        with engine.connect() as connection:  # the parent's own connection is untouched
            assert connection.execute(text("SELECT pg_backend_pid()")).scalar_one() == parent_backend
    finally:
        engine.dispose()


def test_a_writer_that_waits_too_long_for_its_turn_fails_as_sqlite_would(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # Not the turn's wait and then SQLite's busy handler's as long again: one timeout, then "locked".
    monkeypatch.setattr(storage.db, "SQLITE_BUSY_TIMEOUT_S", 0.3)
    turns = WriterTurns(str(tmp_path / "node.sqlite3"))
    holder, waiter = turns.open_lock(), turns.open_lock()
    assert holder is not None and waiter is not None
    try:
        assert turns.take(holder)
        started = time.monotonic()
        with pytest.raises(sqlite3.OperationalError, match="database is locked"):
            turns.take(waiter)
        assert 0.3 <= time.monotonic() - started < 5
        turns.give_back(holder)
    finally:
        os.close(holder)
        os.close(waiter)
