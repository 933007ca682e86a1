"""GroupCommit: concurrent callers share a commit, each returns only after its own unit committed, and
one unit's failure is its own."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, event, text
from sqlalchemy.orm import Session

from storage.db import GroupCommit, make_engine, make_sessionmaker, sqlite_url


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = make_engine(sqlite_url(tmp_path / "db.sqlite3"))
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE t (k INTEGER PRIMARY KEY)"))
    yield engine
    engine.dispose()


def _rows(engine: Engine) -> list[int]:
    with engine.connect() as connection:
        return [k for (k,) in connection.execute(text("SELECT k FROM t ORDER BY k"))]


def test_units_queued_during_a_commit_share_the_next_one(engine: Engine) -> None:
    commits: list[int] = []
    event.listen(engine, "commit", lambda connection: commits.append(1))
    group = GroupCommit(make_sessionmaker(engine, immediate=True).begin)
    release_first = threading.Event()
    outcomes: dict[int, object] = {}

    def insert(k: int) -> None:
        def work(session: Session) -> int:
            if k == 0:
                assert release_first.wait(10)
            if k == 3:
                raise ValueError("unit 3 is broken")
            session.execute(text("INSERT INTO t (k) VALUES (:k)"), {"k": k})
            return k
        try:
            outcomes[k] = group.run(work)
            assert k in _rows(engine)  # committed by the time run returned
        except ValueError as exc:
            outcomes[k] = exc

    first = threading.Thread(target=insert, args=(0,))
    first.start()
    while not group._turn.locked():
        time.sleep(0.001)
    others = [threading.Thread(target=insert, args=(k,)) for k in range(1, 6)]
    for thread in others:
        thread.start()
    while len(group._pending) < 5:  # all five queued behind the first caller's commit
        time.sleep(0.001)
    release_first.set()
    for thread in [first, *others]:
        thread.join(10)

    assert _rows(engine) == [0, 1, 2, 4, 5]
    assert {k: v for k, v in outcomes.items() if k != 3} == {0: 0, 1: 1, 2: 2, 4: 4, 5: 5}
    assert isinstance(outcomes[3], ValueError)
    # the first alone, then the batch of five failed (unit 3) and went again one by one: 4 commits
    assert len(commits) == 1 + 4


def test_a_caller_alone_commits_at_once(engine: Engine) -> None:
    group = GroupCommit(make_sessionmaker(engine, immediate=True).begin)
    assert group.run(lambda session: session.execute(text("INSERT INTO t (k) VALUES (7)")).rowcount) == 1
    assert _rows(engine) == [7]
