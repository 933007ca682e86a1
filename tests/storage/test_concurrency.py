"""Acceptance: 4 worker processes drain 200 jobs on SQLite and on PostgreSQL; every job is claimed and
done exactly once, and jobs whose worker died (expired leases) come back and are done too."""

from __future__ import annotations

import multiprocessing
import queue as stdlib_queue
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from storage.queue import JobQueue
from storage.schema import utcnow
from tests.storage.claim_worker import work

JOBS, WORKERS, ORPHANED = 200, 4, 50


def test_four_worker_processes_do_every_job_exactly_once(db_url: str, sessions: sessionmaker[Session]) -> None:
    queue = JobQueue(sessions)
    # jobs enqueued an hour ago, 50 of them claimed then by a worker that died: their leases long expired
    hour_ago = JobQueue(sessions, clock=lambda: utcnow() - timedelta(hours=1))
    with sessions.begin() as session:
        for n in range(JOBS):
            uid = f"1.2.826.0.1.3680043.8.498.{n + 1}"
            assert hour_ago.enqueue(session, kind="analyse", sop_instance_uid=uid, dedupe_key=f"analyse:{uid}",
                                    priority=n % 3)
    orphaned = {job.id for job in hour_ago.claim("dead-worker", ["analyse"], limit=ORPHANED)}
    assert len(orphaned) == ORPHANED

    context = multiprocessing.get_context("spawn")
    start, results = context.Event(), context.Queue()
    processes = [context.Process(target=work, args=(db_url, f"worker-{n}", start, results)) for n in range(WORKERS)]
    for process in processes:
        process.start()
    start.set()
    reports = []
    try:
        for _ in processes:
            reports.append(results.get(timeout=120))
    except stdlib_queue.Empty:
        raise AssertionError(f"only {len(reports)} of {WORKERS} workers finished") from None
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
                process.join()
    assert all(process.exitcode == 0 for process in processes)

    claims = [job_id for _worker, claimed, _completed, _lost in reports for job_id in claimed]
    completions = [job_id for _worker, _claimed, completed, _lost in reports for job_id in completed]
    assert len(claims) == len(set(claims)) == JOBS, "a job was claimed twice or never"
    assert sorted(completions) == sorted(claims), "a claimed job was not completed by its claimer"
    assert all(not lost for _worker, _claimed, _completed, lost in reports)
    assert sum(1 for _worker, claimed, _completed, _lost in reports if claimed) >= 2, "no concurrency happened"

    jobs = queue.list(limit=JOBS + 1)
    assert len(jobs) == JOBS
    owner = {job_id: worker for worker, _claimed, completed, _lost in reports for job_id in completed}
    for job in jobs:
        assert job.state == "done"
        assert job.payload == {"done_by": owner[job.id]}
        assert job.attempts == (2 if job.id in orphaned else 1)
    assert queue.counts()["done"] == JOBS


_DIES_HOLDING_THE_CLAIM_LOCK = """
import os, signal, sys, time
from storage.db import make_engine, make_sessionmaker
from storage.schema import Job
from sqlalchemy import select
sessions = make_sessionmaker(make_engine(sys.argv[1]), immediate=True)
with sessions.begin() as session:
    session.scalars(select(Job).with_for_update()).all()  # holds the SQLite write lock / the PostgreSQL row locks
    print("holding", flush=True)
    time.sleep(120)
"""


def test_a_worker_killed_inside_its_claim_transaction_blocks_nobody(
    db_url: str, sessions: sessionmaker[Session]
) -> None:
    queue = JobQueue(sessions)
    with sessions.begin() as session:
        queue.enqueue(session, kind="analyse", sop_instance_uid="1.2.3", dedupe_key="analyse:1.2.3")
    holder = subprocess.Popen([sys.executable, "-c", _DIES_HOLDING_THE_CLAIM_LOCK, db_url], stdout=subprocess.PIPE,
                              text=True, cwd=Path(__file__).resolve().parents[2])
    try:
        assert holder.stdout.readline().strip() == "holding"
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        [job] = queue.claim("survivor", ["analyse"])
        assert job.attempts == 1
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        holder.stdout.close()
