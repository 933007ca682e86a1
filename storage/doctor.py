"""Consistency check between the database and the instance store, and its safe repair.

The write order of the node makes every crash leave a *recognisable* inconsistency, never a silent one:
the listener writes the file before committing the row (a crash between leaves an **orphan file**);
retention deletes the row before the file (same); a writer that dies mid-file leaves a **temp leftover**;
a worker that dies leaves a **stuck lease** (expired), and before it expires an **orphaned lease**: a
running job whose lease holder is gone (a ``host:pid`` owner on this host with no such process, or an
owner elsewhere whose liveness row in ``node_processes`` is no longer renewed). A **row without a file** or a **size mismatch** means
something outside the node touched the store (a person, a failing disk) and is always worth a look.

``repair`` fixes each kind conservatively: orphan files are *moved* to ``root/.orphans/`` (only a
person can tell whether one is an image to re-import), temp leftovers are deleted, stuck leases are
reclaimed, and rows without files are removed together with cancelling their unfinished jobs (the data
is gone; keeping the row would make query/retrieve promise an image it cannot deliver). Files younger
than ``grace_s`` are never called orphans: between its rename and its commit a fresh file has no row yet.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass, field

from sqlalchemy import delete, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from storage.queue import JobQueue
from storage.schema import Instance, Job, JobState, NodeProcess, utcnow
from storage.store import InstanceStore

log = logging.getLogger(__name__)

#: ``Instance.path`` of a row whose file was not kept on purpose (an instance discarded by policy).
_NO_FILE = ""
_UNFINISHED = (JobState.QUEUED.value, JobState.RUNNING.value, JobState.FAILED.value, JobState.DEAD.value)


@dataclass(frozen=True)
class MissingFile:
    sop_instance_uid: str
    path: str


@dataclass(frozen=True)
class SizeMismatch:
    sop_instance_uid: str
    path: str
    expected_bytes: int
    actual_bytes: int


@dataclass
class DoctorReport:
    """What ``check`` found and, after ``repair``, what was done about it (``actions``)."""

    orphan_files: list[str] = field(default_factory=list)
    missing_files: list[MissingFile] = field(default_factory=list)
    size_mismatches: list[SizeMismatch] = field(default_factory=list)
    temp_leftovers: list[str] = field(default_factory=list)
    #: Younger temp files whose writer may be alive: a receive or a write in progress, or (were the
    #: node stopped) a leak. Reported, never repaired, not counted against ``ok``.
    temp_in_flight: list[str] = field(default_factory=list)
    stuck_jobs: list[int] = field(default_factory=list)
    #: Lease holder (``host:pid``) that is gone -> the running jobs it still holds.
    orphaned_leases: dict[str, list[int]] = field(default_factory=dict)
    actions: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing needs attention."""
        return not (self.orphan_files or self.missing_files or self.size_mismatches
                    or self.temp_leftovers or self.stuck_jobs or self.orphaned_leases)


class Doctor:
    def __init__(
        self, sessionmaker: sessionmaker[Session], store: InstanceStore, queue: JobQueue, *, grace_s: float = 3600.0,
        stale_after_s: float = 60.0,
    ) -> None:
        self._sessions = sessionmaker
        self.store = store
        self.queue = queue
        self.grace_s = grace_s
        #: A lease holder on another host counts as gone when its liveness row is older than this.
        self.stale_after_s = stale_after_s

    def check(self) -> DoctorReport:
        """Find every inconsistency; changes nothing. Memory stays bounded by one hash shard of the store,
        not the whole store: files are matched to rows shard by shard, and rows are checked for their
        file as a stream."""
        report = DoctorReport()
        young = time.time() - self.grace_s
        with self._sessions() as session:
            for shard in self.store.top_level():
                known = {
                    path: (uid, size)
                    for uid, path, size in session.execute(
                        select(Instance.sop_instance_uid, Instance.path, Instance.size_bytes).where(
                            or_(Instance.path == shard, Instance.path.startswith(f"{shard}/", autoescape=True))
                        )
                    )
                }
                for relpath, size, mtime in self.store.iter_files(shard):
                    row = known.get(relpath)
                    if row is None:
                        if mtime < young:
                            report.orphan_files.append(relpath)
                    elif size != row[1]:
                        report.size_mismatches.append(SizeMismatch(row[0], relpath, row[1], size))
            rows = session.execute(
                select(Instance.sop_instance_uid, Instance.path)
                .where(Instance.path != _NO_FILE)
                .order_by(Instance.path)
                .execution_options(yield_per=1000)
            )
            report.missing_files = [MissingFile(uid, path) for uid, path in rows if not _exists(self.store, path)]
            report.stuck_jobs = list(session.scalars(
                select(Job.id).where(Job.state == JobState.RUNNING.value, Job.lease_expires_at < utcnow())
                .order_by(Job.id)
            ))
            report.orphaned_leases = self._gone_holders(session)
        report.temp_leftovers = [str(leftover.path) for leftover in self.store.temp_leftovers(self.grace_s)]
        report.temp_in_flight = [str(temp.path) for temp in self.store.temp_files()
                                 if str(temp.path) not in report.temp_leftovers]
        return report

    def _gone_holders(self, session: Session) -> dict[str, list[int]]:
        """Running jobs by lease holder, for holders that no longer exist. Owners are ``host:pid`` (a
        worker) or ``host:pid/thread`` (an exporter thread of ``serve``); others cannot be judged."""
        seen = {name: at for name, at in session.execute(select(NodeProcess.name, NodeProcess.seen_at))}
        gone: dict[str, list[int]] = {}
        held: dict[str, list[int]] = {}
        for owner, job_id in session.execute(select(Job.lease_owner, Job.id)
                                             .where(Job.state == JobState.RUNNING.value).order_by(Job.id)):
            held.setdefault(owner or "", []).append(job_id)
        for owner, job_ids in held.items():
            holder = owner.split("/", 1)[0]
            host, _, pid = holder.rpartition(":")
            if not pid.isdigit():
                continue
            if host == socket.gethostname():
                alive = _pid_alive(int(pid))
            else:
                at = seen.get(holder)
                alive = at is not None and (utcnow() - at).total_seconds() <= self.stale_after_s
            if not alive:
                gone.setdefault(holder, []).extend(job_ids)
        return gone

    def repair(self) -> DoctorReport:
        """Check, then fix what can be fixed safely (see the module docstring). Size mismatches are only
        reported: whether the row or the file is wrong needs a person."""
        report = self.check()
        for relpath in report.orphan_files:
            target = self.store.move_to_orphans(relpath)
            report.actions.append(f"moved orphan file {relpath} to {target}")
        for leftover in report.temp_leftovers:
            try:
                os.unlink(leftover)
            except FileNotFoundError:
                continue
            report.actions.append(f"deleted temp leftover {leftover}")
        if report.missing_files:
            self._forget(report.missing_files)
            report.actions.extend(
                f"removed row of {missing.sop_instance_uid} (file {missing.path} missing) and cancelled its jobs"
                for missing in report.missing_files
            )
        if report.stuck_jobs:
            reclaimed = self.queue.reclaim_expired()
            report.actions.append(f"reclaimed {reclaimed} job(s) with expired leases")
        for holder in report.orphaned_leases:
            released = self.queue.release_owner(holder)
            report.actions.append(f"released {released} job(s) held by {holder}, which is gone")
        for action in report.actions:
            log.warning("doctor: %s", action)
        return report

    def _forget(self, missing: list[MissingFile]) -> None:
        # Look again: a file reported missing may have been restored (or its row retired) meanwhile.
        uids = [item.sop_instance_uid for item in missing if not _exists(self.store, item.path)]
        if not uids:
            return
        with self._sessions.begin() as session:
            now = utcnow()
            session.execute(delete(Instance).where(Instance.sop_instance_uid.in_(uids)))
            session.execute(
                update(Job)
                .where(Job.sop_instance_uid.in_(uids), Job.state.in_(_UNFINISHED))
                .values(state=JobState.CANCELLED.value, lease_owner=None, lease_expires_at=None,
                        last_error="instance file missing from the store (doctor)", finished_at=now, updated_at=now)
                .execution_options(synchronize_session=False)
            )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _exists(store: InstanceStore, relpath: str) -> bool:
    try:
        return store.path(relpath).is_file()
    except ValueError:
        return False  # a row whose path points outside the store has no file we would trust
