"""Databases for the storage tests: a SQLite file per test, and a private schema in the PostgreSQL
database ``test`` (dropped afterwards, so parallel runs never see each other's rows)."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from storage.db import make_engine, make_sessionmaker, sqlite_url, upgrade

PG_SERVER = os.environ.get("PACS_NODE_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def _pg_reachable() -> str | None:
    """``None`` when PostgreSQL answers, else the reason it does not."""
    import psycopg
    from sqlalchemy.engine import make_url

    url = make_url(PG_SERVER)
    try:
        with psycopg.connect(host=url.host, port=url.port or 5432, user=url.username, dbname=url.database,
                             password=url.password, connect_timeout=3):
            return None
    except psycopg.Error as exc:
        return f"PostgreSQL at {url.render_as_string(hide_password=True)} is unreachable: {exc}"


@pytest.fixture(scope="session")
def pg_server() -> str:
    reason = _pg_reachable()
    if reason is not None:
        pytest.skip(reason)
    return PG_SERVER


@pytest.fixture
def pg_url(pg_server: str) -> Iterator[str]:
    """An empty schema of its own, made the first entry of ``search_path`` for every connection."""
    import psycopg
    from sqlalchemy.engine import make_url

    schema = f"t_{secrets.token_hex(6)}"
    url = make_url(pg_server)
    conninfo = dict(host=url.host, port=url.port or 5432, user=url.username, dbname=url.database,
                    password=url.password, autocommit=True)
    with psycopg.connect(**conninfo) as connection:
        connection.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield f"{pg_server}?options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(**conninfo) as connection:
            connection.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture
def sqlite_db(tmp_path: Path) -> str:
    return sqlite_url(tmp_path / "db" / "node.sqlite3")


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str:
    """An empty database of each kind (PostgreSQL skipped with its reason when unreachable)."""
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_db")
    return request.getfixturevalue("pg_url")


@pytest.fixture
def sessions(db_url: str):
    """A session factory on an upgraded database of each kind."""
    upgrade(db_url)
    engine = make_engine(db_url)
    yield make_sessionmaker(engine, immediate=True)
    engine.dispose()
