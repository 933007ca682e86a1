"""Periodic upkeep inside ``serve`` (apscheduler's BackgroundScheduler): reclaim the jobs of dead
workers, remove the temp files they left, apply the retention period to instances and results, forget finished jobs.

Each task catches and logs its own errors: a database hiccup must not stop the scheduler, and the
next run simply tries again.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from apscheduler.schedulers.background import BackgroundScheduler

from pacs_node.config import Settings
from pacs_node.ops.context import ServerContext
from storage.queue import FINISHED_STATES
from storage.repository import delete_instance, instances_older_than

log = logging.getLogger(__name__)

#: Instances deleted per transaction by retention (keeps each transaction short).
RETENTION_BATCH = 500
#: A temp file untouched this long is abandoned even if its writer cannot be checked (a writer on another
#: host sharing the store, pynetdicom's receive files whose names carry no writer). Every live writer
#: touches its file far more often: the listener drops a peer that stalls for ``idle_timeout_s`` (60 s),
#: and the store's own writers finish a file in seconds.
TEMP_ABANDONED_S = 600.0


def reclaim_leases(runtime: ServerContext) -> int:
    n = runtime.queue.reclaim_expired()
    if n:
        log.warning("reclaimed %d job(s) whose worker stopped heartbeating", n)
    return n


def purge_instances(settings: Settings, runtime: ServerContext) -> int:
    """Delete instances (received and results) older than ``retention.days``: rows first, then files,
    so a crash in between leaves orphan files (the doctor's business), never rows without files."""
    if settings.retention.days <= 0:
        return 0
    total = 0
    while True:
        with runtime.write_session() as session, session.begin():
            old = instances_older_than(session, timedelta(days=settings.retention.days), limit=RETENTION_BATCH)
            paths = [delete_instance(session, row.sop_instance_uid) for row in old]
        for relpath in paths:
            if relpath:
                try:
                    runtime.store.delete(relpath)
                except OSError:
                    log.warning("retention: could not delete file %s", relpath)
        total += len(old)
        if len(old) < RETENTION_BATCH:
            break
    if total:
        log.info("retention: deleted %d instance(s) older than %d days", total, settings.retention.days)
    return total


def purge_jobs(settings: Settings, runtime: ServerContext) -> int:
    """Forget done and cancelled jobs after ``retention.job_days`` (dead ones wait for a person)."""
    states = [state for state in FINISHED_STATES if state.value != "dead"]
    n = runtime.queue.purge(timedelta(days=settings.retention.job_days), states)
    if n:
        log.info("purged %d finished job(s)", n)
    return n


def remove_dead_temp_files(runtime: ServerContext) -> int:
    """Delete the store's temp files whose writer on this host is gone (a worker or listener killed
    mid-write) or that are untouched for :data:`TEMP_ABANDONED_S`: never committed, never acknowledged,
    so nothing refers to them, and without this they would wait for a person running ``doctor --repair``.
    ``serve`` runs it at start and housekeeping every ``retention.interval_s``."""
    n = 0
    for leftover in runtime.store.temp_leftovers(older_than_s=TEMP_ABANDONED_S):
        try:
            leftover.path.unlink()
        except FileNotFoundError:
            continue
        n += 1
    if n:
        log.warning("removed %d temp file(s) left by writers that died", n)
    return n


def forget_gone_processes(runtime: ServerContext) -> int:
    """Drop the liveness rows of processes long gone (each restarted worker leaves one)."""
    from pacs_node.ops.liveness import FORGET_AFTER
    from storage.processes import forget_older_than
    from storage.schema import utcnow

    with runtime.write_session() as session, session.begin():
        return forget_older_than(session, FORGET_AFTER, utcnow())


def probe_destinations(settings: Settings, runtime: ServerContext) -> int:
    """C-ECHO the destinations marked down; one that answers has its waiting results sent at once."""
    from pacs_node.work.destinations import DestinationMonitor

    return DestinationMonitor(settings, runtime).probe()


def _guarded(name: str, fn, *args) -> None:  # noqa: ANN001
    try:
        fn(*args)
    except Exception:
        log.exception("housekeeping task %s failed; will run again", name)


def start_housekeeping(settings: Settings, runtime: ServerContext) -> BackgroundScheduler:
    scheduler = BackgroundScheduler(daemon=True)
    every = settings.retention.interval_s
    scheduler.add_job(_guarded, "interval", seconds=every, args=("reclaim_leases", reclaim_leases, runtime),
                      id="reclaim_leases", max_instances=1, coalesce=True)
    scheduler.add_job(_guarded, "interval", seconds=every,
                      args=("remove_dead_temp_files", remove_dead_temp_files, runtime),
                      id="remove_dead_temp_files", max_instances=1, coalesce=True)
    scheduler.add_job(_guarded, "interval", seconds=settings.export.probe_interval_s,
                      args=("probe_destinations", probe_destinations, settings, runtime),
                      id="probe_destinations", max_instances=1, coalesce=True)
    scheduler.add_job(_guarded, "interval", seconds=max(every, 60.0),
                      args=("purge_instances", purge_instances, settings, runtime),
                      id="purge_instances", max_instances=1, coalesce=True)
    scheduler.add_job(_guarded, "interval", seconds=max(every, 300.0),
                      args=("purge_jobs", purge_jobs, settings, runtime),
                      id="purge_jobs", max_instances=1, coalesce=True)
    scheduler.add_job(_guarded, "interval", seconds=max(every, 300.0),
                      args=("forget_gone_processes", forget_gone_processes, runtime),
                      id="forget_gone_processes", max_instances=1, coalesce=True)
    scheduler.start()
    return scheduler
