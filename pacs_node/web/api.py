"""The admin API under ``/api``: the operations of :mod:`pacs_node.ops.admin` over HTTP, described by
the OpenAPI schema the application serves. Reading needs any token; changing anything (retry, cancel,
purge, re-analyse, resend) needs an admin token. Look-ups by AccessionNumber or PatientID are POSTs with
a JSON body, so no patient identifier ends up in a URL, a proxy's log or the browser's history.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, HTTPException, Path, Query, Request
from pydantic import BaseModel, Field

from pacs_node.ops import admin as ops
from pacs_node.ops.context import ServerContext
from pacs_node.web.roles import admin
from storage.schema import JobKind, JobState

router = APIRouter(prefix="/api", tags=["admin"])

JobId = Annotated[int, Path(ge=1, le=2**62)]
Uid = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[0-9.]+$")]


def runtime(request: Request) -> ServerContext:
    return request.app.state.runtime


Runtime = Annotated[ServerContext, Depends(runtime)]


def _guard(call: Any, *args: Any, **kwargs: Any) -> Any:
    """Run an admin operation, its refusals as HTTP errors: 404 not found, 409 cannot, 422 bad value."""
    try:
        return call(*args, **kwargs)
    except ops.NotFound as exc:
        raise HTTPException(404, str(exc)) from None
    except ops.AdminError as exc:
        raise HTTPException(409, str(exc)) from None
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None


class Done(BaseModel):
    ok: bool
    count: int = 0


class StudyQuery(BaseModel):
    study_instance_uid: str | None = Field(None, max_length=64)
    accession_number: str | None = Field(None, max_length=16)
    patient_id: str | None = Field(None, max_length=64)
    limit: int = Field(50, ge=1, le=500)
    offset: int = Field(0, ge=0, le=10**9)


class Resend(BaseModel):
    peer: str = Field(min_length=1, max_length=64)


@router.get("/queue", summary="Jobs, newest first, filtered by state, kind and destination")
def queue_list(rt: Runtime, state: JobState | None = None, kind: JobKind | None = None,
               destination: Annotated[str | None, Query(max_length=64)] = None,
               limit: Annotated[int, Query(ge=1, le=1000)] = 100,
               offset: Annotated[int, Query(ge=0, le=10**9)] = 0) -> list[dict[str, Any]]:
    jobs = _guard(ops.list_jobs, rt, state=state.value if state else None, kind=kind.value if kind else None,
                  destination=destination, limit=limit, offset=offset)
    return [ops.job_dict(job) for job in jobs]


@router.get("/queue/counts", summary="Jobs in each state")
def queue_counts(rt: Runtime) -> dict[str, int]:
    return rt.queue.counts()


@router.get("/queue/{job_id}", summary="One job")
def queue_show(rt: Runtime, job_id: JobId) -> dict[str, Any]:
    return ops.job_dict(_guard(ops.get_job, rt, job_id))


@router.post("/queue/{job_id}/retry", summary="Run a job again (failed, dead, cancelled or done)",
             dependencies=[Depends(admin)])
def queue_retry(rt: Runtime, job_id: JobId) -> Done:
    ok = _guard(ops.retry_job, rt, job_id)
    return Done(ok=ok, count=int(ok))


@router.post("/queue/{job_id}/cancel", summary="Cancel a job that has not finished", dependencies=[Depends(admin)])
def queue_cancel(rt: Runtime, job_id: JobId) -> Done:
    ok = _guard(ops.cancel_job, rt, job_id)
    return Done(ok=ok, count=int(ok))


@router.post("/queue/retry-failed", summary="Run every failed and dead job again", dependencies=[Depends(admin)])
def queue_retry_failed(rt: Runtime) -> Done:
    return Done(ok=True, count=ops.retry_all_failed(rt))


@router.post("/queue/purge", summary="Delete finished jobs older than the given hours", dependencies=[Depends(admin)])
def queue_purge(rt: Runtime, older_than_hours: Annotated[float, Query(ge=0, le=24 * 3650)]) -> Done:
    return Done(ok=True, count=ops.purge_jobs(rt, timedelta(hours=older_than_hours)))


@router.get("/destinations", summary="Export jobs per destination, with the newest error of failing ones")
def destinations(rt: Runtime) -> list[dict[str, Any]]:
    return ops.destinations(rt)


@router.post("/studies/find", summary="Studies by StudyInstanceUID, AccessionNumber and/or PatientID")
def studies_find(rt: Runtime, query: StudyQuery) -> list[dict[str, Any]]:
    return ops.find(rt, study_instance_uid=query.study_instance_uid, accession_number=query.accession_number,
                    patient_id=query.patient_id, limit=query.limit, offset=query.offset)


@router.get("/studies/{study}", summary="A study's instances, their analyses, results and exports")
def study_show(rt: Runtime, study: Uid) -> list[dict[str, Any]]:
    return _guard(ops.study_report, rt, study)


@router.post("/studies/{study}/reanalyse", summary="Analyse a study's images again", dependencies=[Depends(admin)])
def study_reanalyse(rt: Runtime, study: Uid) -> Done:
    return Done(ok=True, count=_guard(ops.reanalyse, rt, study))


@router.post("/studies/{study}/resend", summary="Send a study's results to a peer again", dependencies=[Depends(admin)])
def study_resend(rt: Runtime, study: Uid, body: Annotated[Resend, Body()]) -> Done:
    return Done(ok=True, count=_guard(ops.resend, rt, study, body.peer))


@router.get("/stats", summary="Instances, jobs and store space")
def stats(rt: Runtime) -> dict[str, Any]:
    return ops.stats(rt)


@router.get("/peers", summary="Configured peers (no credentials)")
def peers(rt: Runtime) -> list[dict[str, Any]]:
    return [{"name": name, "kind": "dicomweb" if peer.is_dicomweb else "dimse", "address": peer.describe()}
            for name, peer in sorted(rt.settings.peers.items())]


@router.post("/peers/{name}/echo", summary="C-ECHO a peer (a DICOMweb peer: a QIDO-RS request)")
def peer_echo(rt: Runtime, name: Annotated[str, Path(max_length=64)]) -> dict[str, Any]:
    return _guard(ops.echo_peer, rt.settings, name)
