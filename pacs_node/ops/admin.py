"""What an administrator does to a running node — the one implementation behind both the ``pacs-node``
CLI and the HTTP admin API (and so the console): look at the queue and steer it, find a study and what
happened to each of its images, re-analyse it, send its results again, check a peer.

Every function takes the process's :class:`ServerContext`; results are plain, JSON-ready data. Work that
is queued rings the local doorbell, so a node running on this host takes it at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from datetime import datetime, timedelta, timezone
from typing import Any

from pacs_node.config import Peer, Settings
from pacs_node.ops.context import ServerContext
from storage.history import analysis_counts, analysis_of, deliveries_of
from storage.queue import JobRecord
from storage.repository import find_studies, instance_counts, instances_for_study
from storage.schema import Analysis, Delivery, Disposition, Instance, JobKind, Origin
from storage.studies import get_study


class AdminError(Exception):
    """The operation cannot be done as asked; ``str()`` says why (for a person, no patient data)."""


class NotFound(AdminError):
    """The study, job or peer named does not exist."""


def job_dict(job: JobRecord) -> dict[str, Any]:
    data = asdict(job)
    for key, value in data.items():
        if hasattr(value, "isoformat"):
            data[key] = value.isoformat()
    return data


def _ring(rt: ServerContext, *kinds: JobKind) -> None:
    for kind in kinds or tuple(JobKind):
        rt.doorbell(kind).ring()


# -- the queue -------------------------------------------------------------------------------------

def list_jobs(rt: ServerContext, *, state: str | None = None, kind: str | None = None,
              destination: str | None = None, limit: int = 100, offset: int = 0) -> list[JobRecord]:
    """Jobs newest first; ``ValueError`` names an unknown state or kind."""
    return rt.queue.list(state=state, kind=kind, limit=limit, destination=destination, offset=offset)


def get_job(rt: ServerContext, job_id: int) -> JobRecord:
    job = rt.queue.get(job_id)
    if job is None:
        raise NotFound(f"no job {job_id}")
    return job


def retry_job(rt: ServerContext, job_id: int) -> bool:
    """Run a job again: a failed, dead or cancelled one, or a done one (analysed or sent anew)."""
    get_job(rt, job_id)
    retried = rt.queue.retry(job_id)
    if retried:
        _ring(rt)
    return retried


def retry_all_failed(rt: ServerContext) -> int:
    retried = rt.queue.retry_all_failed()
    if retried:
        _ring(rt)
    return retried


def cancel_job(rt: ServerContext, job_id: int) -> bool:
    """Cancel a job that has not finished (a running one loses its lease; see ``JobQueue.cancel``)."""
    get_job(rt, job_id)
    return rt.queue.cancel(job_id)


def purge_jobs(rt: ServerContext, older_than: timedelta) -> int:
    """Delete finished jobs (done, cancelled, dead) last changed before ``older_than`` ago."""
    return rt.queue.purge(older_than)


def destinations(rt: ServerContext) -> list[dict[str, Any]]:
    """Export jobs per destination, with the newest error where some are failing."""
    return rt.queue.destinations()


# -- what the node holds ---------------------------------------------------------------------------

def stats(rt: ServerContext) -> dict[str, Any]:
    """Instances by origin and disposition, jobs by kind and state, store space."""
    with rt.read_session() as session:
        instances = [{"origin": o, "disposition": d, "count": n, "bytes": b}
                     for o, d, n, b in instance_counts(session)]
        analyses = analysis_counts(session)
    return {
        "analyses": analyses,  # outcomes from the lasting history: kept after jobs are purged
        "instances": instances,
        "jobs": [{"kind": k, "state": st, "count": n} for k, st, n in rt.queue_depth()],
        "store": {"path": str(rt.store.root), "free_bytes": rt.store.free_bytes(),
                  "min_free_bytes": rt.store.min_free_bytes},
    }


def find(rt: ServerContext, *, study_instance_uid: str | None = None, accession_number: str | None = None,
         patient_id: str | None = None, limit: int = 50, offset: int = 0) -> list[dict[str, Any]]:
    """Studies by StudyInstanceUID, AccessionNumber and/or PatientID (newest first)."""
    with rt.read_session() as session:
        found = find_studies(session, study_instance_uid=study_instance_uid, accession_number=accession_number,
                             patient_id=patient_id, limit=limit, offset=offset)
    for study in found:
        study["last_received_at"] = study["last_received_at"].isoformat() if study["last_received_at"] else None
    return found


def _study_rows(rt: ServerContext, study_instance_uid: str) -> Sequence[Instance]:
    with rt.read_session() as session:
        rows = instances_for_study(session, study_instance_uid)
    if not rows:
        raise NotFound(f"no instances of study {study_instance_uid}")
    return rows


def _utc(value: datetime | None) -> str | None:
    return value.replace(tzinfo=timezone.utc).isoformat() if value is not None else None


def _analysis(jobs: list[JobRecord], history: Analysis | None) -> list[dict[str, Any]]:
    """An instance's analysis jobs, or, once they are purged, its lasting record."""
    if jobs or history is None:
        return [{"id": j.id, "state": j.state, "attempts": j.attempts, "max_attempts": j.max_attempts,
                 "last_error": j.last_error} for j in jobs]
    return [{"id": history.job_id, "state": history.state, "attempts": history.attempts, "max_attempts": None,
             "last_error": history.last_error, "finished_at": _utc(history.finished_at)}]


def _exports(jobs: list[JobRecord], history: list[Delivery]) -> list[dict[str, Any]]:
    """Per destination: the export job in flight, else the lasting delivery record; either way with when
    it was delivered and what storage commitment said."""
    recorded = {d.destination: d for d in history}
    out = []
    for destination in dict.fromkeys([*(j.destination for j in jobs), *recorded]):
        job = next((j for j in reversed(jobs) if j.destination == destination), None)
        delivery = recorded.get(destination)
        entry: dict[str, Any] = (
            {"id": job.id, "destination": destination, "state": job.state, "attempts": job.attempts,
             "max_attempts": job.max_attempts, "last_error": job.last_error} if job is not None else
            {"id": delivery.job_id, "destination": destination, "state": delivery.state,
             "attempts": delivery.attempts, "max_attempts": None, "last_error": delivery.last_error})
        entry |= {"delivered_at": _utc(delivery.delivered_at) if delivery else None,
                  "commitment": delivery.commitment if delivery else None,
                  "committed_at": _utc(delivery.committed_at) if delivery else None}
        out.append(entry)
    return out


def study_report(rt: ServerContext, study_instance_uid: str) -> list[dict[str, Any]]:
    """A study's received instances, what happened to each (its analysis jobs), the result objects made
    from it and each result's exports per destination."""
    rows = _study_rows(rt, study_instance_uid)
    received = [row for row in rows if row.origin == Origin.RECEIVED.value]
    produced = [row for row in rows if row.origin == Origin.RESULT.value]
    jobs_by_uid: dict[str, list[JobRecord]] = {}
    for job in rt.queue.list(limit=100_000, sop_instance_uids=[row.sop_instance_uid for row in rows]):
        jobs_by_uid.setdefault(job.sop_instance_uid, []).append(job)
    for jobs in jobs_by_uid.values():
        jobs.sort(key=lambda job: job.id)
    images = {i["sop_instance_uid"]: i for i in study_analysis(rt, study_instance_uid).get("images", [])}
    with rt.read_session() as session:  # the lasting history: what purged jobs did
        analyses = {row.sop_instance_uid: analysis_of(session, row.sop_instance_uid) for row in received}
        deliveries: dict[str, list[Delivery]] = {}
        for delivery in deliveries_of(session, [row.sop_instance_uid for row in produced]):
            deliveries.setdefault(delivery.sop_instance_uid, []).append(delivery)
    report = []
    for row in received:
        mine = [r for r in produced if r.source_sop_instance_uid == row.sop_instance_uid]
        report.append({
            "sop_instance_uid": row.sop_instance_uid,
            "series_instance_uid": row.series_instance_uid,
            "sop_class_uid": row.sop_class_uid,
            "modality": row.modality,
            "rows": row.rows,
            "columns": row.columns,
            "disposition": row.disposition,
            "reason": row.reason,
            "view": images.get(row.sop_instance_uid, {}).get("view"),
            "role": images.get(row.sop_instance_uid, {}).get("role"),
            "why": images.get(row.sop_instance_uid, {}).get("reason"),
            "analysis": _analysis(jobs_by_uid.get(row.sop_instance_uid, []), analyses[row.sop_instance_uid]),
            "results": [
                {"sop_instance_uid": r.sop_instance_uid, "series_instance_uid": r.series_instance_uid,
                 "sop_class_uid": r.sop_class_uid, "path": r.path,
                 "exports": _exports(jobs_by_uid.get(r.sop_instance_uid, []), deliveries.get(r.sop_instance_uid, []))}
                for r in mine
            ],
        })
    return report


def study_analysis(rt: ServerContext, study_instance_uid: str) -> dict[str, Any]:
    """The study's collection state and its last analysis: which image was read and why, which were set
    aside and why (``images``), interpreted or not, the content gate's score, the results and those they
    replaced; empty for a study never collected."""
    with rt.read_session() as session:
        study = get_study(session, study_instance_uid)
        if study is None:
            return {}
        return {"state": study.state, "version": study.version, "settle_due": study.settle_due,
                "analysed_at": study.analysed_at, **(study.analysis or {})}


# -- actions ---------------------------------------------------------------------------------------

def reanalyse(rt: ServerContext, study_instance_uid: str) -> int:
    """Analyse a study's chest radiographs again (their results are rebuilt with the same UIDs, so a
    PACS sees updates, not copies). Returns how many analyses were queued."""
    rows = _study_rows(rt, study_instance_uid)
    analysable = [row.sop_instance_uid for row in rows if row.disposition == Disposition.QUEUED.value]
    if not analysable:
        raise AdminError(f"study {study_instance_uid} holds no image the node analyses")
    queued = rt.queue.requeue_for(JobKind.ANALYSE, analysable)
    if queued:
        _ring(rt, JobKind.ANALYSE)
    return queued


def resend(rt: ServerContext, study_instance_uid: str, peer: str) -> int:
    """Send a study's result objects to the configured ``peer`` again (or for the first time).
    Returns how many export jobs were queued."""
    if peer not in rt.settings.peers:
        raise NotFound(f"no peer {peer!r} is configured")
    results = [row.sop_instance_uid for row in _study_rows(rt, study_instance_uid)
               if row.origin == Origin.RESULT.value]
    if not results:
        raise AdminError(f"study {study_instance_uid} has no result objects yet")
    queued = rt.queue.requeue_for(JobKind.EXPORT, results, destination=peer)  # sent or tried before
    with rt.write_session() as session, session.begin():
        queued += sum(
            rt.queue.enqueue(session, kind=JobKind.EXPORT, sop_instance_uid=uid, destination=peer,
                             dedupe_key=f"export:{uid}:{peer}",
                             max_attempts=rt.settings.export_retry(peer).attempts) is not None
            for uid in results
        )
    if queued:
        _ring(rt, JobKind.EXPORT)
    return queued


def echo_peer(settings: Settings, name: str, peer: Peer | None = None) -> dict[str, Any]:
    """C-ECHO a configured peer (or the ad-hoc ``peer`` given); a DICOMweb peer is asked for a QIDO-RS
    of no studies instead. ``{"peer", "address", "ok", "status" | "error"}``."""
    from pacs_node.dicom.scu import ScuError, echo

    target = peer or settings.peers.get(name)
    if target is None:
        raise NotFound(f"no peer {name!r} is configured")
    try:
        if target.is_dicomweb:
            from pacs_node.work.dicomweb_export import ping

            status = ping(settings, target)
        else:
            status = echo(settings, target)
    except ScuError as exc:
        return {"peer": name, "address": target.describe(), "ok": False, "error": str(exc)}
    return {"peer": name, "address": target.describe(), "ok": status == 0, "status": status}
