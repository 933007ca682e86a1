"""``pacs-node queue``: inspect and steer the job queue (list, show, retry, cancel, purge)."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Annotated, Any

import typer
from rich.table import Table

from pacs_node.cli.common import (JsonOpt, db_errors, fail, jsonable, out, parse_duration, print_json, print_outcome,
                                   runtime, settings)
from pacs_node.ops import admin

app = typer.Typer(help="Inspect and steer the job queue.", no_args_is_help=True)

_JOB_COLUMNS = ("id", "kind", "state", "sop_instance_uid", "destination", "attempts", "updated_at", "last_error")


def _job_table(jobs: list[Any]) -> Table:
    table = Table(*_JOB_COLUMNS)
    for job in jobs:
        table.add_row(
            str(job.id), job.kind, job.state, job.sop_instance_uid, job.destination or "",
            f"{job.attempts}/{job.max_attempts}", job.updated_at.strftime("%Y-%m-%d %H:%M:%SZ"),
            (job.last_error or "")[:60],
        )
    return table


@app.command("ls")
@db_errors
def queue_ls(
    state: Annotated[str | None, typer.Option(
        help="Only jobs in this state (queued, running, done, failed, dead, cancelled).")] = None,
    kind: Annotated[str | None, typer.Option(help="Only jobs of this kind (analyse, export).")] = None,
    limit: Annotated[int, typer.Option(help="Newest N jobs.")] = 100,
    as_json: JsonOpt = False,
) -> None:
    """List jobs, newest first."""
    rt = runtime(settings())
    try:
        jobs = admin.list_jobs(rt, state=state, kind=kind, limit=limit)
    except ValueError as exc:
        fail(str(exc), 2)
    if as_json:
        print_json(jobs)
    else:
        out.print(_job_table(jobs))


@app.command("show")
@db_errors
def queue_show(job_id: int, as_json: JsonOpt = False) -> None:
    """Everything about one job."""
    rt = runtime(settings())
    job = rt.queue.get(job_id)
    if job is None:
        fail(f"no job {job_id}")
    if as_json:
        print_json(job)
        return
    table = Table("field", "value", show_header=False)
    for key, value in asdict(job).items():
        table.add_row(key, json.dumps(jsonable(value)) if isinstance(value, dict) else str(value))
    out.print(table)


@app.command("retry")
@db_errors
def queue_retry(
    job_id: Annotated[int | None, typer.Argument(help="The job to retry.")] = None,
    all_failed: Annotated[bool, typer.Option("--all-failed", help="Retry every failed and dead job.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Run a job again — a failed, dead, cancelled or done one — or every failed and dead job."""
    if (job_id is None) == (not all_failed):
        fail("give a job ID or --all-failed (not both)", 2)
    rt = runtime(settings())
    try:
        n = admin.retry_all_failed(rt) if all_failed else int(admin.retry_job(rt, job_id))
    except admin.NotFound as exc:
        fail(str(exc))
    print_outcome(as_json, {"retried": n}, f"{n} job(s) queued again")
    if job_id is not None and n == 0:
        raise typer.Exit(1)


@app.command("cancel")
@db_errors
def queue_cancel(job_id: int, as_json: JsonOpt = False) -> None:
    """Cancel a job that has not finished (a running one stops: its worker loses the job)."""
    rt = runtime(settings())
    try:
        ok = admin.cancel_job(rt, job_id)
    except admin.NotFound:
        ok = False
    print_outcome(as_json, {"cancelled": ok},
                  "cancelled" if ok else f"job {job_id} is not cancellable (unknown or already finished)")
    raise typer.Exit(0 if ok else 1)


@app.command("purge")
@db_errors
def queue_purge(
    older_than: Annotated[str, typer.Option("--older-than", help="Age like 12h, 7d, 2w.")],
    as_json: JsonOpt = False,
) -> None:
    """Delete finished jobs (done, cancelled, dead) last changed before the given age."""
    age = parse_duration(older_than)
    rt = runtime(settings())
    n = admin.purge_jobs(rt, age)
    print_outcome(as_json, {"purged": n}, f"{n} job(s) purged")
