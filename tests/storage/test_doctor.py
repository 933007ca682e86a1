"""The doctor finds each kind of inconsistency a crash (or a person) can leave, and repairs it safely."""

from __future__ import annotations

import os
import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from storage.doctor import Doctor, MissingFile, SizeMismatch
from storage.queue import JobQueue
from storage.repository import add_instance, get_instance
from storage.schema import utcnow
from storage.store import ORPHAN_DIR, InstanceStore

STUDY, SERIES = "1.2.826.0.1.3680043.8.498.20", "1.2.826.0.1.3680043.8.498.20.1"


def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def _register(session: Session, store: InstanceStore, queue: JobQueue, sop: str, data: bytes = b"DICM") -> str:
    relpath = store.relpath_for(STUDY, SERIES, sop)
    store.write_bytes(relpath, data)
    add_instance(session, sop_instance_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
                 transfer_syntax_uid="1.2.840.10008.1.2.1", study_instance_uid=STUDY, series_instance_uid=SERIES,
                 path=relpath, size_bytes=len(data), disposition="queued")
    queue.enqueue(session, kind="analyse", sop_instance_uid=sop, dedupe_key=f"analyse:{sop}")
    return relpath


@pytest.fixture
def setup(sessions: sessionmaker[Session], tmp_path: Path):
    store = InstanceStore(tmp_path / "store")
    hour_ago = JobQueue(sessions, clock=lambda: utcnow() - timedelta(hours=1))
    return sessions, store, JobQueue(sessions), hour_ago


def test_a_consistent_node_is_healthy(setup) -> None:
    sessions, store, queue, _ = setup
    with sessions.begin() as session:
        _register(session, store, queue, f"{SERIES}.1")
        # an instance recorded but not kept (discarded by policy) has no file on purpose
        add_instance(session, sop_instance_uid=f"{SERIES}.2", sop_class_uid="1.2.840.10008.5.1.4.1.1.7",
                     transfer_syntax_uid="1.2.840.10008.1.2.1", study_instance_uid=STUDY,
                     series_instance_uid=SERIES, path="", size_bytes=0, disposition="not_processed")
    report = Doctor(sessions, store, queue).check()
    assert report.ok, report
    assert Doctor(sessions, store, queue).repair().actions == []


def test_finds_and_repairs_every_kind_of_damage(setup) -> None:
    sessions, store, queue, hour_ago = setup
    with sessions.begin() as session:
        kept = _register(session, store, queue, f"{SERIES}.1")
        vanished = _register(session, store, queue, f"{SERIES}.2")
        resized = _register(session, store, queue, f"{SERIES}.3")
        hour_ago.enqueue(session, kind="export", sop_instance_uid=f"{SERIES}.1", dedupe_key="export:x:pacs")
    [stuck] = hour_ago.claim("dead-worker", ["export"])
    store.path(vanished).unlink()
    store.path(resized).write_bytes(b"DICM and more")
    old_orphan = store.relpath_for(STUDY, SERIES, f"{SERIES}.9")
    store.write_bytes(old_orphan, b"acknowledged? nobody knows")
    _age(store.path(old_orphan), 7200)
    fresh = store.relpath_for(STUDY, SERIES, f"{SERIES}.10")
    store.write_bytes(fresh, b"row about to be committed")  # a listener between rename and commit
    temp = store.open_temp()
    temp.write(b"half")
    temp.close()
    _age(Path(temp.name), 7200)

    doctor = Doctor(sessions, store, queue, grace_s=3600)
    report = doctor.check()
    assert report.orphan_files == [old_orphan]
    assert report.missing_files == [MissingFile(f"{SERIES}.2", vanished)]
    assert report.size_mismatches == [SizeMismatch(f"{SERIES}.3", resized, 4, 13)]
    assert report.temp_leftovers == [temp.name]
    assert report.stuck_jobs == [stuck.id]
    assert not report.ok

    repaired = doctor.repair()
    assert len(repaired.actions) == 4
    assert (store.root / ORPHAN_DIR / old_orphan).read_bytes() == b"acknowledged? nobody knows"
    assert not store.path(old_orphan).exists()
    assert store.path(fresh).exists() and store.path(kept).exists()
    assert not Path(temp.name).exists()
    with sessions() as session:
        assert get_instance(session, f"{SERIES}.2") is None
    [job] = queue.for_instance(f"{SERIES}.2")
    assert (job.state, job.last_error) == ("cancelled", "instance file missing from the store (doctor)")
    assert queue.get(stuck.id).state == "failed"

    after = doctor.check()
    assert after.size_mismatches == [SizeMismatch(f"{SERIES}.3", resized, 4, 13)]  # left for a person
    assert (after.orphan_files, after.missing_files, after.temp_leftovers, after.stuck_jobs) == ([], [], [], [])
