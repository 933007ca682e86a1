"""Engine configuration: SQLite durability settings, write transactions that lock up front, fork safety."""

from __future__ import annotations

import multiprocessing
import sqlite3
import threading
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from storage.db import make_engine, make_sessionmaker, sqlite_url, upgrade


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
