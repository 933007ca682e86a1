"""A queue worker process for the concurrency test (a module, so ``spawn`` can import it)."""

from __future__ import annotations

import random
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event

from storage.db import make_engine, make_sessionmaker
from storage.queue import JobQueue


def work(url: str, worker_id: str, start: Event, results: Queue) -> None:
    """Claim and complete jobs until none is left; report ``(claimed ids, completed ids, lost ids)``."""
    engine = make_engine(url)
    queue = JobQueue(make_sessionmaker(engine))
    rng = random.Random(worker_id)
    claimed, completed, lost = [], [], []
    start.wait()
    try:
        while jobs := queue.claim(worker_id, ["analyse"], limit=rng.choice([1, 2, 3])):
            for job in jobs:
                claimed.append(job.id)
                if queue.heartbeat(job.id, worker_id) and queue.complete(job.id, worker_id, {"done_by": worker_id}):
                    completed.append(job.id)
                else:
                    lost.append(job.id)
    finally:
        engine.dispose()
        results.put((worker_id, claimed, completed, lost))
