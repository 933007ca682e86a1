"""The loop the analysis worker and every exporter thread run: claim due jobs, keep their leases while
they are worked on, and sleep on the kind's doorbell when there is nothing to do.

A claim that fails (the database is restarting) is retried after :data:`CLAIM_RETRY_S`, never fatal: a
worker outlives a database failover. An idle loop waits at most ``worker.poll_interval_s`` on the doorbell
(:mod:`pacs_node.work.wakeups`), so a ring that never comes (the job was queued on another host) costs one
poll interval. Leases (:mod:`pacs_node.work.leases`) are renewed for the jobs in hand until each is
released or the batch is over.

Work can come in two stages: the work function does the first (the analysis worker: load the images and
run the model) and returns the second (build, store and record the results), which the loop runs on its
own thread while it claims the next batch and does its first stage. So the GPU is fed batch N+1 while the
CPU writes batch N's results. Second stages run one at a time, in the order of their batches, and one is
handed over only once the previous one has finished: results are never reordered, at most two batches
are in hand, and a second stage that raises stops the loop as a first stage would (the jobs it had not
settled come back when their leases run out).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from pacs_node.ops import metrics
from pacs_node.ops.context import ServerContext
from pacs_node.work.leases import LeaseKeeper
from pacs_node.work.wakeups import Waiter
from storage.queue import ClaimedJob, JobRecord
from storage.schema import JobKind

log = logging.getLogger(__name__)

#: Pause before claiming again after a claim failed.
CLAIM_RETRY_S = 5.0

#: The second stage of a batch's work (see the module docstring).
SecondStage = Callable[[], None]


@dataclass
class JobLoop:
    """Claims ``kind`` jobs as ``owner`` with ``claim`` and hands each batch to the work function."""

    runtime: ServerContext
    owner: str
    kind: JobKind
    claim: Callable[[], list[ClaimedJob]]
    #: seconds an idle loop sleeps on the doorbell (default ``worker.poll_interval_s``); the analysis
    #: worker wakes sooner when a study settles before then
    idle_wait: Callable[[], float] | None = None
    #: the most jobs ``claim`` takes: a claim that got fewer found none left due, so the loop waits on the
    #: doorbell (which a job queued since rings) instead of claiming again at once, only to find nothing.
    #: None: unknown, claim again after every batch
    claim_limit: int | None = None

    def run(self, stop: threading.Event, work: Callable[[list[ClaimedJob], LeaseKeeper], SecondStage | None]) -> None:
        """Until ``stop`` is set (the batches in progress are finished first): claim, ``work(jobs, leases)``,
        run the second stage it returns (if any) beside the next batch's first, and wait on the doorbell
        when nothing more is due. The work releases each job's lease when the job is settled; whatever a
        batch leaves held is released when its last stage returns.

        The doorbell's rings are consumed before each claim, which answers them: a wait returns at once
        only for a job queued after the last claim looked, so a burst of rings costs one claim, not one
        each. A loop rung while it worked on a short batch claims again without working out how long it
        would sleep (``idle_wait``: the analysis worker asks the database when the next study settles).
        A second stage that raises wakes the loop, which stops with its error."""
        settings = self.runtime.settings
        pending: Future[None] | None = None  # the second stage of the previous batch, running
        with LeaseKeeper(self.runtime, self.owner, settings.worker.lease_seconds) as leases, \
                self.runtime.doorbell(self.kind).waiter() as waiter, \
                ThreadPoolExecutor(1, thread_name_prefix=f"{self.kind.value}-record") as second_stages:
            try:
                while not stop.is_set():
                    pending = _unless_done(pending)
                    waiter.drain()
                    try:
                        jobs = self.claim()
                    except Exception:
                        log.exception("%s: cannot claim jobs; retrying", self.kind.value)
                        stop.wait(CLAIM_RETRY_S)
                        continue
                    if jobs:
                        pending = self._batch(jobs, work, leases, pending, second_stages, waiter)
                        if self.claim_limit is None or len(jobs) >= self.claim_limit:
                            continue  # more may be due already
                    elif pending is not None and self.claim_limit is None:
                        pending, finishing = None, pending  # finish the last batch, then look again
                        finishing.result()
                        continue
                    pending = _unless_done(pending)  # (its wake-up may have been drained above)
                    if waiter.drain():
                        continue  # rung since the claim looked (a job queued during the batch): claim it now
                    waiter.wait(self.idle_wait() if self.idle_wait else settings.worker.poll_interval_s, stop)
            finally:
                if pending is not None:
                    pending.result()

    @staticmethod
    def _batch(jobs: list[ClaimedJob], work: Callable[[list[ClaimedJob], LeaseKeeper], SecondStage | None],
               leases: LeaseKeeper, pending: Future[None] | None, second_stages: ThreadPoolExecutor,
               waiter: Waiter) -> Future[None] | None:
        """The first stage of a claimed batch, then its second handed over once the previous batch's has
        finished (batches are recorded in the order they were claimed); the second stage now running."""
        ids = [job.id for job in jobs]
        leases.hold(ids)
        try:
            rest = work(jobs, leases)
        except BaseException:
            leases.release_all(ids)
            raise
        if pending is not None:
            pending.result()  # batch N is recorded before batch N+1 is handed over
        if rest is None:
            leases.release_all(ids)
            return None
        running = second_stages.submit(_finish, rest, ids, leases)
        running.add_done_callback(lambda done: waiter.wake() if done.exception() is not None else None)
        return running


def _unless_done(pending: Future[None] | None) -> Future[None] | None:
    """``pending`` while it runs; None once it has finished; what it raised, raised."""
    if pending is not None and pending.done():
        pending.result()
        return None
    return pending


def _finish(rest: SecondStage, ids: list[int], leases: LeaseKeeper) -> None:
    try:
        rest()
    finally:
        leases.release_all(ids)


def complete_job(runtime: ServerContext, job: ClaimedJob, owner: str, result: Mapping[str, Any]) -> bool:
    """Mark ``job`` done with ``result`` and observe its latency (creation to completion) in
    ``pacs_node_job_seconds``; ``False`` when the lease was lost (another owner has the job now)."""
    return complete_jobs(runtime, [(job, result)], owner) == [True]


def complete_jobs(runtime: ServerContext, done: Sequence[tuple[ClaimedJob, Mapping[str, Any]]],
                  owner: str) -> list[bool]:
    """:func:`complete_job` for several jobs in one transaction (one commit for a batch); per job,
    whether it was completed."""
    if not done:
        return []
    with runtime.write_session() as session, session.begin():
        records = runtime.queue.complete_in(session, [(job.id, dict(result)) for job, result in done], owner)
    for record in records:
        observe_done(record)
    return [record is not None for record in records]


def observe_done(record: JobRecord | None) -> None:
    """The latency of a job just completed (creation to completion) in ``pacs_node_job_seconds``."""
    if record is not None and record.finished_at is not None:
        metrics.JOB_SECONDS.labels(record.kind).observe((record.finished_at - record.created_at).total_seconds())
