"""The node's long-lived resources, built once per process from the settings: database engine and
sessions, the instance store, the job queue and its doorbells.

Every process (listener, each worker, a CLI command) builds its own :class:`ServerContext`; nothing here is
shared across ``fork``, which is what lets a worker crash without touching the listener's connections.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from pacs_node.config import Settings
from pacs_node.ops import metrics
from pacs_node.work.wakeups import Doorbell
from storage.db import make_engine, make_sessionmaker, upgrade
from storage.queue import JobQueue
from storage.schema import JobKind
from storage.store import TEMP_DIR, InstanceStore


@dataclass
class ServerContext:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    write_sessions: sessionmaker[Session]
    store: InstanceStore
    queue: JobQueue

    @classmethod
    def open(cls, settings: Settings, *, migrate: bool = True) -> ServerContext:
        """Connect to the database (bringing its schema to head first, unless ``migrate`` is off) and
        open the instance store."""
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        if migrate:
            upgrade(settings.database_url)
        engine = make_engine(settings.database_url)
        sessions = make_sessionmaker(engine)
        queue = JobQueue(
            sessions,
            lease_seconds=settings.worker.lease_seconds,
            policy=settings.worker.retry.policy(),  # exports name their destination's policy when they fail
        )
        return cls(settings, engine, sessions, make_sessionmaker(engine, immediate=True),
                   InstanceStore(settings.store_path, min_free_bytes=settings.store.min_free_bytes), queue)

    @contextmanager
    def read_session(self) -> Iterator[Session]:
        with self.sessions() as session:
            yield session

    @contextmanager
    def write_session(self) -> Iterator[Session]:
        with self.write_sessions() as session:
            yield session

    @property
    def incoming_dir(self) -> Path:
        """The store's temp directory, where pynetdicom writes C-STORE datasets as they arrive."""
        return self.store.root / TEMP_DIR

    def queue_depth(self) -> list[tuple[str, str, int]]:
        """(kind, state, count) for every kind and state present: the ``pacs_node_queue_jobs`` gauge."""
        return self.queue.depth()

    def doorbell(self, kind: JobKind) -> Doorbell:
        """The bell of ``kind``'s jobs on this host: ring it after committing such a job, wait on it when idle."""
        return Doorbell(self.settings.data_dir / "run" / "doorbells", kind.value)

    def close(self) -> None:
        self.engine.dispose()


def prepare_metrics_dir(settings: Settings, *, fresh: bool) -> Path:
    """Point prometheus_client's multiprocess mode at ``<data_dir>/metrics`` (``fresh``: empty it first,
    as ``serve`` does at start, so counters of a previous run do not leak into this one)."""
    path = Path(os.environ.get("PROMETHEUS_MULTIPROC_DIR") or settings.data_dir / "metrics")
    if fresh and path.is_dir():
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    metrics.use_multiprocess_dir(path)
    return path
