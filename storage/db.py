"""Database engines, sessions and schema upgrades for SQLite and PostgreSQL.

SQLite is the embedded default (one machine); PostgreSQL is for several listeners and workers sharing one
database. The engine is configured here, once, so that every part of the node gets the same durability
guarantees:

* SQLite runs in WAL mode with ``synchronous=FULL`` (a committed row survives power loss, which is what
  lets the listener answer 0x0000 after its commit) and a ``busy_timeout`` so that writers wait for each
  other instead of failing.
* SQLite writers of one database file take turns (:class:`WriterTurns`): a write transaction waits for its
  turn in the kernel and is woken when the previous writer's ``COMMIT`` is done, instead of sleeping in
  SQLite's busy handler, which matters once several processes write (``node.listener_processes``, workers).
* pysqlite's own transaction handling is switched off (it delays ``BEGIN`` until the first write, which
  breaks isolation) and SQLAlchemy's ``begin`` event emits the ``BEGIN`` itself. Sessions made with
  ``make_sessionmaker(engine, immediate=True)`` start with ``BEGIN IMMEDIATE``: they take the write lock
  up front, so a read-then-write transaction (a queue claim) can never fail half-way with
  ``SQLITE_BUSY`` when it tries to upgrade its lock, and concurrent claimers are serialised.
* PostgreSQL connections are checked with ``pool_pre_ping`` so a restarted database server costs one
  reconnect, not a failed job.
* No engine ever puts a statement's parameters in an error or a log line (``hide_parameters``): an
  instance row's are a patient's name and ID.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Generic, TypeVar, cast

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, CursorResult, Engine, Result, Table, create_engine, event, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from storage.schema import Base

#: How long a SQLite writer waits for the lock before giving up (seconds).
SQLITE_BUSY_TIMEOUT_S = 60.0

#: How long connecting to PostgreSQL may take before it counts as down (seconds).
PG_CONNECT_TIMEOUT_S = 10

#: Execution option that makes the SQLite ``begin`` handler emit ``BEGIN IMMEDIATE``.
_IMMEDIATE = "storage_sqlite_immediate"

_USAGE = "use sqlite:///PATH or postgresql+psycopg://USER[:PASSWORD]@HOST[:PORT]/DATABASE"

_MIGRATIONS = Path(__file__).resolve().parent / "migrations"

#: Arbitrary constant key for the PostgreSQL advisory lock that serialises concurrent ``upgrade`` calls.
_UPGRADE_LOCK_KEY = 0x5AC5_0DE0


def sqlite_url(path: str | os.PathLike[str]) -> str:
    """The SQLAlchemy URL of a SQLite database file (made absolute, so a later ``chdir`` cannot move it)."""
    return f"sqlite:///{Path(path).expanduser().resolve()}"


def make_engine(url: str) -> Engine:
    """An engine for ``url`` configured for durability (see the module docstring).

    For a SQLite file the parent directory is created. The engine's connection pool is dropped in a
    forked child process (without closing the parent's connections), so a worker forked from the
    listener opens its own connections instead of sharing the parent's sockets or file handles.
    """
    try:
        parsed = make_url(url)
    except ArgumentError:
        # SQLAlchemy's message repeats the whole string, password included.
        raise ValueError(f"not a database URL: {_USAGE}") from None
    if parsed.get_backend_name() == "sqlite":
        engine = _make_sqlite_engine(url, parsed.database)
    elif parsed.get_backend_name() == "postgresql":
        # A database host that stopped answering must cost an error after seconds, not a hung worker
        # (unless the URL sets its own ?connect_timeout=).
        timeout = {} if "connect_timeout" in parsed.query else {"connect_timeout": PG_CONNECT_TIMEOUT_S}
        engine = create_engine(url, pool_pre_ping=True, connect_args=timeout, hide_parameters=True)
    else:
        raise ValueError(f"unsupported database URL {parsed.render_as_string(hide_password=True)!r}: {_USAGE}")
    _dispose_after_fork(engine)
    return engine


def _make_sqlite_engine(url: str, database: str | None) -> Engine:
    in_memory = not database or database == ":memory:" or database.startswith("file::memory:")
    if database and not in_memory:
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    # The connection returned last is handed out next: SQLite drops a connection's page cache whenever
    # another connection wrote since its last transaction, so connections taken in turn read their
    # B-tree pages again every time (~40 preads per received instance).
    connect_args: dict[str, Any] = {"timeout": SQLITE_BUSY_TIMEOUT_S}
    if not in_memory:
        connect_args["factory"] = TurnTakingConnection
    engine = create_engine(url, connect_args=connect_args, hide_parameters=True, pool_use_lifo=True)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:  # noqa: ANN001 (DBAPI connection)
        # Autocommit at the driver level: SQLAlchemy's "begin" handler below issues BEGIN itself.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            if not in_memory:
                _switch_to_wal(cursor)
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
            cursor.execute("PRAGMA foreign_keys=ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        if not conn.get_execution_options().get(_IMMEDIATE, False):
            conn.exec_driver_sql("BEGIN")
            return
        dbapi_connection = conn.connection.dbapi_connection
        if isinstance(dbapi_connection, TurnTakingConnection):
            try:
                dbapi_connection.begin_immediate()
            except sqlite3.Error as exc:
                raise _translated(conn.dialect, "BEGIN IMMEDIATE", exc) from exc
        else:  # in memory: one connection, no other writer to take turns with
            conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


class WriterTurns:
    """The turns of the writers of one SQLite database file, across threads and processes: an ``flock`` on
    ``<database>-writers`` held from before ``BEGIN IMMEDIATE`` to after ``COMMIT`` or ``ROLLBACK``, and a
    FIFO ``<database>-writers.wake`` that the writer leaving its turn writes a byte into.

    Why: SQLite lets one writer in; the others retry in its busy handler, which sleeps 1, 2, 5, 10, 15, 20,
    25, ... 100 ms between tries whether or not the lock was freed meanwhile. Within one process
    :class:`GroupCommit` queues writers on a lock instead, but a second process (``node.listener_processes``
    > 1, a worker) slept: with two listener processes committing every few milliseconds, ``strace`` showed
    their committing threads in those sleeps (~40 a second, 1-25 ms each) while the other process's
    associations queued behind them. Here a waiter sleeps in ``poll`` on the FIFO and is woken by the
    byte of the writer whose turn ended, so it takes its turn within microseconds of the ``COMMIT``.

    Each connection has its own descriptor of the lock file (an ``flock`` belongs to an open file, so two
    connections of one process exclude each other too). The wait is bounded like SQLite's: after
    :data:`SQLITE_BUSY_TIMEOUT_S` it fails as SQLite's would; where the files cannot be made a writer goes
    to SQLite's own lock and busy handler, which stay the guarantee; a writer that died mid-turn loses its ``flock`` with its process
    and wakes nobody, so waiters also look again every :data:`_TURN_RECHECK_S`."""

    def __init__(self, database: str) -> None:
        self.lock_path = f"{database}-writers"
        self.wake_path = f"{database}-writers.wake"
        self._wake_fd: int | None = None
        self._wake_lock = threading.Lock()

    def open_lock(self) -> int | None:
        """A new descriptor of the lock file (one per connection); None where it cannot be made."""
        try:
            return os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError:
            return None

    def _wake(self) -> int | None:
        """This process's descriptor of the FIFO (read and write, non-blocking: opening it never waits for
        a peer, and a full FIFO drops the byte, which waiters' rechecks make harmless)."""
        with self._wake_lock:
            if self._wake_fd is None:
                try:
                    os.mkfifo(self.wake_path, 0o600)
                except FileExistsError:
                    pass
                except OSError:
                    return None
                try:
                    self._wake_fd = os.open(self.wake_path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
                except OSError:
                    return None
            return self._wake_fd

    def take(self, lock_fd: int) -> bool:
        """Wait for the turn on ``lock_fd``; whether it was taken (False: the FIFO cannot be used, or the
        filesystem has no ``flock``; the caller goes on to SQLite's own lock). A wait of
        :data:`SQLITE_BUSY_TIMEOUT_S` ends as SQLite's busy handler ends: "database is locked" (going on
        to SQLite's lock then would wait as long again, past a sender's DIMSE timeout)."""
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            pass
        except OSError:  # ENOLCK and the like (some network filesystems): no turns there
            return False
        wake = self._wake()
        if wake is None:
            return False
        deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_S
        woken = select.poll()  # not select(): a busy listener's descriptors may be past FD_SETSIZE
        woken.register(wake, select.POLLIN)
        while True:
            # Empty the FIFO before trying: a byte written after the try (the holder leaving) wakes us.
            with suppress(BlockingIOError):
                while os.read(wake, 512):
                    pass
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                pass
            left = deadline - time.monotonic()
            if left <= 0:
                raise sqlite3.OperationalError("database is locked (another writer held its turn too long)")
            woken.poll(min(left, _TURN_RECHECK_S) * 1000)

    def give_back(self, lock_fd: int) -> None:
        """End the turn held on ``lock_fd`` and wake the waiters."""
        fcntl.flock(lock_fd, fcntl.LOCK_UN)
        wake = self._wake()
        if wake is not None:
            try:
                os.write(wake, b"\0")
            except OSError as exc:  # full: waiters are woken already
                if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                    raise


#: How often a writer waiting for its turn looks again without being woken (a holder that died).
_TURN_RECHECK_S = 0.005

_TURNS: dict[str, WriterTurns] = {}
_TURNS_LOCK = threading.Lock()


def writer_turns(database: str) -> WriterTurns:
    """The :class:`WriterTurns` of the SQLite file ``database``, one per file and process."""
    key = os.path.abspath(database)
    with _TURNS_LOCK:
        turns = _TURNS.get(key)
        if turns is None:
            turns = _TURNS[key] = WriterTurns(key)
        return turns


class TurnTakingConnection(sqlite3.Connection):
    """A SQLite file connection whose write transactions take their :class:`WriterTurns` turn:
    :meth:`begin_immediate` waits for it, and ``commit``, ``rollback`` and ``close`` give it back once
    SQLite's lock is released (SQLAlchemy commits and rolls back through these; its pool rolls back a
    connection given back open)."""

    def __init__(self, database: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(database, *args, **kwargs)
        # A ``file:`` URI names no plain path to put the turn's files beside: SQLite's lock alone there.
        self._turns = None if kwargs.get("uri") else writer_turns(os.fsdecode(database))
        self._lock_fd: int | None = None
        self._in_turn = False

    def begin_immediate(self) -> None:
        """``BEGIN IMMEDIATE`` in this connection's turn."""
        if self._lock_fd is None and self._turns is not None:
            self._lock_fd = self._turns.open_lock()
        self._in_turn = self._lock_fd is not None and self._turns is not None and self._turns.take(self._lock_fd)
        try:
            self.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._end_turn()
            raise

    def _end_turn(self) -> None:
        if self._in_turn:
            self._in_turn = False
            assert self._lock_fd is not None and self._turns is not None
            self._turns.give_back(self._lock_fd)

    def commit(self) -> None:
        # A COMMIT that raises leaves the transaction (and SQLite's lock) held: the turn ends with the
        # rollback that follows (SQLAlchemy's, driver_transaction's, the pool's).
        super().commit()
        self._end_turn()

    def rollback(self) -> None:
        try:
            super().rollback()
        finally:
            self._end_turn()

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._end_turn()
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None


def _switch_to_wal(cursor: sqlite3.Cursor) -> None:
    """``PRAGMA journal_mode=WAL``, retried while "database is locked". On a new database file the first
    connections of several processes (``serve`` and a worker started at once) all try to switch it; each
    holds a shared lock and wants the exclusive one, and SQLite answers all but one at once, without waiting
    in its busy handler (that wait could deadlock). By the retry the winner has switched the file to WAL,
    which needs no exclusive lock any more."""
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_S
    delay = 0.005
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.25)


def _dispose_after_fork(engine: Engine) -> None:
    ref = weakref.ref(engine)

    def _in_child() -> None:
        alive = ref()
        if alive is not None:
            alive.dispose(close=False)

    os.register_at_fork(after_in_child=_in_child)


def write_engine(engine: Engine) -> Engine:
    """``engine`` for transactions that will write: on SQLite each one starts with ``BEGIN IMMEDIATE``.

    Elsewhere the option is ignored, so callers need not know which database they talk to."""
    return engine.execution_options(**{_IMMEDIATE: True})


def make_sessionmaker(engine: Engine, *, immediate: bool = False) -> sessionmaker[Session]:
    """A session factory for ``engine``.

    ``immediate=True`` is for sessions that write (ingest, claims): on SQLite they take the write lock
    at ``BEGIN``. Leave it off for sessions that only read (C-FIND, the CLI) or that stay open a long
    time, so they never hold up writers. ``expire_on_commit=False`` because the node hands committed
    rows to other code (result builders, the CLI) after the session is gone.
    """
    bind = write_engine(engine) if immediate else engine
    return sessionmaker(bind=bind, expire_on_commit=False)


def ping(engine: Engine) -> None:
    """One round trip to the database (``SELECT 1``); raises what the driver raises when it is down."""
    with engine.connect() as connection:
        connection.execute(text("SELECT 1"))


def insert_if_absent(session: Session, model: type[Base], values: dict[str, Any], key: str) -> bool:
    """``INSERT ... ON CONFLICT (key) DO NOTHING`` for ``model`` in the caller's transaction; whether a row
    was inserted (see :func:`insert_returning_id`)."""
    return insert_returning_id(session, model, values, key) is not None


def insert_returning_id(session: Session, model: type[Base], values: dict[str, Any], key: str) -> Any | None:
    """``INSERT ... ON CONFLICT (key) DO NOTHING`` for ``model`` in the caller's transaction; the new row's
    primary key, or None when a row with ``key`` existed.

    A duplicate neither raises nor aborts the transaction (after an IntegrityError PostgreSQL refuses
    every further statement in it), and two processes inserting the same key at once cannot both win.
    The statement is built once per table and dialect and executed with ``values`` as its parameters,
    so SQLAlchemy compiles it once too (a statement built with ``.values(...)`` is a new statement with
    new literals every time: building and cache-keying it cost more than the insert itself). It runs on
    the session's connection, so the session's pending ORM changes are not flushed before it.
    """
    table = cast(Table, model.__table__)
    connection = session.connection(bind_arguments={"mapper": model})
    dialect = connection.dialect
    statement = idempotent_insert(table, dialect.name, key, bool(dialect.insert_returning))
    if dialect.insert_returning:  # rowcount of an INSERT is not reliable on every driver
        row = connection.execute(statement, values).first()
        return None if row is None else row[0]
    result = connection.execute(statement, values)  # SQLite before 3.35
    return result.inserted_primary_key[0] if rowcount(result) == 1 else None  # type: ignore[attr-defined]


@lru_cache(maxsize=None)
def idempotent_insert(table: Table, dialect_name: str, key: str, returning: bool) -> Any:
    """``INSERT ... ON CONFLICT (key) DO NOTHING`` into ``table`` (``RETURNING`` its primary key), built
    once per table and dialect."""
    dialect_insert = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}.get(dialect_name)
    if dialect_insert is None:
        raise NotImplementedError(f"no idempotent insert for the {dialect_name!r} dialect")
    statement = dialect_insert(table).on_conflict_do_nothing(index_elements=[key])
    return statement.returning(*table.primary_key.columns) if returning else statement


def insert_many_if_absent(session: Session, model: type[Base], rows: list[dict[str, Any]], key: str) -> None:
    """:func:`insert_if_absent` for many rows: one ``INSERT ... ON CONFLICT (key) DO NOTHING`` compiled
    once and executed for every row (the driver's executemany), on the session's connection like
    :func:`insert_returning_id`. Rows are grouped by the columns they name, as one statement binds one
    set of columns."""
    table = cast(Table, model.__table__)
    connection = session.connection(bind_arguments={"mapper": model})
    statement = idempotent_insert(table, connection.dialect.name, key, False)
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(sorted(row)), []).append(row)
    for group in groups.values():
        connection.execute(statement, group)


def upsert(session: Session, model: type[Base], values: dict[str, Any], keys: list[str],
           update: dict[str, Any]) -> None:
    """``INSERT ... ON CONFLICT (keys) DO UPDATE SET update`` for ``model`` in the caller's transaction:
    one statement, so two writers of the same key cannot both insert."""
    table = cast(Table, model.__table__)
    dialect = session.get_bind(model).dialect
    dialect_insert = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}.get(dialect.name)
    if dialect_insert is None:
        raise NotImplementedError(f"no upsert for the {dialect.name!r} dialect")
    statement = dialect_insert(table).values(**values)
    session.execute(statement.on_conflict_do_update(index_elements=keys, set_=update))  # type: ignore[attr-defined]


def upsert_many(session: Session, model: type[Base], rows: list[dict[str, Any]], keys: list[str],
                update: list[str]) -> None:
    """:func:`upsert` for many rows with the same columns: one ``INSERT ... ON CONFLICT (keys) DO UPDATE``
    whose ``update`` columns take the inserted row's values, executed for every row on the session's
    connection (pending ORM changes are not flushed first: they are flushed at the commit)."""
    table = cast(Table, model.__table__)
    connection = session.connection(bind_arguments={"mapper": model})
    connection.execute(_upsert_many_statement(table, connection.dialect.name, tuple(keys), tuple(update)), rows)


@lru_cache(maxsize=None)
def _upsert_many_statement(table: Table, dialect_name: str, keys: tuple[str, ...], update: tuple[str, ...]) -> Any:
    """:func:`upsert_many`'s statement, built once per table, dialect and columns (and so compiled once:
    the job history runs it in every batch's commit)."""
    dialect_insert = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}.get(dialect_name)
    if dialect_insert is None:
        raise NotImplementedError(f"no upsert for the {dialect_name!r} dialect")
    statement = dialect_insert(table)
    return statement.on_conflict_do_update(  # type: ignore[attr-defined]
        index_elements=list(keys), set_={column: statement.excluded[column] for column in update})


def _translated(dialect: Any, statement: str, exc: Exception) -> DBAPIError:
    """The driver's ``exc`` as SQLAlchemy's error (``OperationalError``, ``DataError``, ...), without
    parameters."""
    return DBAPIError.instance(statement, None, exc, dialect.loaded_dbapi.Error, hide_parameters=True, dialect=dialect)


@contextmanager
def driver_connection(engine: Engine) -> Iterator[Any]:
    """A pooled DBAPI connection (``Engine.raw_connection()``) for :class:`DriverStatement`, given back to
    the pool (which rolls back what is left open) afterwards; a failure to connect is SQLAlchemy's error."""
    try:
        connection = engine.raw_connection()
    except engine.dialect.loaded_dbapi.Error as exc:
        raise _translated(engine.dialect, "CONNECT", exc) from exc
    try:
        yield connection
    finally:
        connection.close()


@contextmanager
def driver_transaction(engine: Engine) -> Iterator[Any]:
    """A write transaction on a :func:`driver_connection`, begun and committed on it directly (on SQLite
    with ``BEGIN IMMEDIATE``, as :func:`write_engine`'s transactions), for units of
    :class:`DriverStatement`: ~200 us less per transaction than a ``Connection`` and its ``begin``
    event. Rolled back if the block raises; the driver's errors at ``BEGIN`` and ``COMMIT`` are raised as
    SQLAlchemy's."""
    dbapi = engine.dialect.loaded_dbapi
    with driver_connection(engine) as connection:
        if engine.dialect.name == "sqlite":  # elsewhere the driver begins with the first statement
            raw = connection.dbapi_connection
            try:
                if isinstance(raw, TurnTakingConnection):
                    raw.begin_immediate()
                else:
                    connection.cursor().execute("BEGIN IMMEDIATE")
            except dbapi.Error as exc:
                raise _translated(engine.dialect, "BEGIN IMMEDIATE", exc) from exc
        try:
            yield connection
        except BaseException:
            with suppress(dbapi.Error):
                connection.rollback()
            raise
        try:
            connection.commit()
        except dbapi.Error as exc:
            with suppress(dbapi.Error):
                connection.rollback()
            raise _translated(engine.dialect, "COMMIT", exc) from exc


def rowcount(result: Result[Any]) -> int:
    """Rows an UPDATE or DELETE matched. (``Session.execute`` is typed as returning a plain ``Result``;
    for those statements it is a ``CursorResult``.)"""
    return cast(CursorResult[Any], result).rowcount


class DriverStatement:
    """A Core statement compiled once for one dialect and executed straight on a DBAPI cursor of a pooled
    connection (:func:`driver_connection`, :func:`driver_transaction`).

    For statements run for every received instance: SQLAlchemy's own execution of a cached statement
    costs ~50 us of Python per statement (execution context, parameter processing, result wrapping),
    the driver's ~5 us (sqlite3 keeps the statement prepared). The SQL and the parameters' conversion
    (the column types' bind processors: SQLite's datetime strings, JSON) are SQLAlchemy's, so a row
    written this way is the row ``Connection.execute`` would write. The driver's errors are raised as
    SQLAlchemy's (``DBAPIError.instance``: ``OperationalError``, ``DataError``, ...), without their
    parameters. Parameters are named; columns without a value in them are not inserted (no Python-side
    defaults are applied: the caller gives every value)."""

    def __init__(self, statement: Any, dialect: Any, column_keys: list[str] | None = None) -> None:
        compiled = statement.compile(dialect=dialect, column_keys=column_keys)
        self.sql: str = compiled.string
        self._dialect = dialect
        self._names: tuple[str, ...] | None = tuple(compiled.positiontup) if compiled.positional else None
        self._processors: dict[str, Callable[[Any], Any]] = {}
        #: The values the statement itself holds (literals, ``LIMIT``), converted once.
        self._static: dict[str, Any] = {}
        for name, bind in compiled.binds.items():
            if name not in compiled.bind_names.values():
                continue  # a bind's anonymous alias
            processor = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if not bind.required and bind.value is not None and bind.callable is None:
                self._static[name] = bind.value if processor is None else processor(bind.value)
            elif processor is not None:
                self._processors[name] = processor

    def execute(self, connection: Any, params: dict[str, Any]) -> Any:
        """Run with ``params`` on ``connection`` (a pooled DBAPI connection: ``Engine.raw_connection()``,
        :func:`driver_transaction`); the DBAPI cursor (``fetchone``, ``rowcount``). A parameter missing
        from ``params`` raises ``KeyError``."""
        values = {**self._static, **params}
        for name, processor in self._processors.items():
            values[name] = processor(values[name])
        bound: Any = tuple(values[name] for name in self._names) if self._names is not None else values
        cursor = connection.cursor()
        try:
            cursor.execute(self.sql, bound)
        except self._dialect.loaded_dbapi.Error as exc:
            raise _translated(self._dialect, self.sql, exc) from exc
        return cursor


def _alembic_config(connection: Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS))
    # The live connection travels in ``attributes`` rather than as a URL option, so that passwords and
    # '%' characters in the URL never go through configparser (see migrations/env.py).
    config.attributes["connection"] = connection
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database at ``url`` to ``revision`` (Alembic, with the migrations shipped in this package).

    Safe to call from several processes at once: SQLite serialises them with ``BEGIN IMMEDIATE``,
    PostgreSQL with a transaction-scoped advisory lock, and the loser finds nothing left to do. The
    whole upgrade is one transaction on both databases, so a failed migration leaves the old schema.
    """
    _migrate(url, command.upgrade, revision)


def downgrade(url: str, revision: str) -> None:
    """Take the database at ``url`` back to ``revision`` (``"base"``: no tables at all)."""
    _migrate(url, command.downgrade, revision)


def _migrate(url: str, step, revision: str) -> None:  # noqa: ANN001 (an alembic.command function)
    engine = make_engine(url)
    try:
        with write_engine(engine).begin() as connection:
            if connection.dialect.name == "postgresql":
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _UPGRADE_LOCK_KEY})
            step(_alembic_config(connection), revision)
    finally:
        engine.dispose()


def current_revision(url: str) -> str | None:
    """The Alembic revision the database at ``url`` is at; ``None`` for a database never upgraded."""
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()


def head_revision() -> str | None:
    """The newest revision shipped with this package (what ``upgrade`` goes to)."""
    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS))
    return ScriptDirectory.from_config(config).get_current_head()


T = TypeVar("T")
C = TypeVar("C")


@dataclass
class _Unit(Generic[T]):
    work: Callable[[Any], T]
    ready: Callable[[], object] | None = None
    result: T | None = None
    error: BaseException | None = None
    done: bool = False


@dataclass
class GroupCommit(Generic[C]):
    """Transactions of many threads committed together: one durable commit (one WAL fsync on SQLite)
    for every unit of work that arrived while the previous commit was in flight.

    ``begin`` opens one transaction and commits it on leaving (``sessionmaker.begin`` gives units a
    ``Session``; :func:`driver_transaction` a ``Connection``, for units that run driver statements,
    :class:`DriverStatement`). :meth:`run` returns only once the transaction holding its own unit has
    committed, so a caller that answers after it (the listener's 0x0000) still answers after its own
    durable commit. There is no committer thread and no waiting for company: a caller alone commits at
    once, itself; callers that arrive while a commit is in flight queue their units, and the first of
    them to get the turn commits all that are queued. A batch that fails is retried one unit per
    transaction, so one unit's error (it is raised to its own caller) never fails the others."""

    begin: Callable[[], AbstractContextManager[C]]
    _pending: list[_Unit[Any]] = field(default_factory=list)
    _queue_lock: threading.Lock = field(default_factory=threading.Lock)
    _turn: threading.Lock = field(default_factory=threading.Lock)

    def run(self, work: Callable[[C], T], ready: Callable[[], object] | None = None) -> T:
        """``work(transaction)`` inside a committed transaction (shared with other callers'); its result.

        ``ready`` is called after ``work`` and before the commit; what it raises fails the unit as
        ``work``'s errors do. The listener waits there for its file's fsyncs, so they overlap its
        statements and the row is still committed only once the file is durable."""
        unit: _Unit[T] = _Unit(work, ready)
        with self._queue_lock:
            self._pending.append(unit)
        with self._turn:
            if not unit.done:  # not committed by the caller before us: commit all that is queued
                with self._queue_lock:
                    batch, self._pending = self._pending, []
                self._commit(batch)
        if unit.error is not None:
            raise unit.error
        return cast(T, unit.result)

    def _commit(self, batch: list[_Unit[Any]]) -> None:
        try:
            with self.begin() as transaction:
                for unit in batch:
                    unit.result = unit.work(transaction)
                for unit in batch:
                    if unit.ready is not None:
                        unit.ready()
        except Exception as exc:
            if len(batch) > 1:
                for unit in batch:
                    self._commit([unit])
                return
            batch[0].result, batch[0].error = None, exc
        except BaseException as exc:  # the waiting callers must not wait for a commit that never comes
            for unit in batch:
                unit.error, unit.done = exc, True
            raise
        for unit in batch:
            unit.done = True
