"""``pacs-node``: run the node and administer it.

Every command reads the same configuration (``--config``, else ``$PACS_NODE_CONFIG``, else
``./pacs-node.toml`` when present, else the built-in defaults; ``PACS_NODE__SECTION__KEY`` environment
variables override any of it). Output is a table for people and, with ``--json``, one JSON document for
scripts. Exit codes: 0 success, 1 the operation failed, 2 bad configuration or usage.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from dataclasses import asdict, is_dataclass
from datetime import datetime, timedelta, timezone
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from pacs_node.config import EXAMPLE_TOML, ConfigError, Peer, Settings, config_path_from_env, load_settings

log = logging.getLogger("pacs_node.cli")

app = typer.Typer(
    name="pacs-node",
    help="A DICOM node that reports chest radiographs and sends the results back to the PACS.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
queue_app = typer.Typer(help="Inspect and steer the job queue.", no_args_is_help=True)
config_app = typer.Typer(help="Write or check the configuration file.", no_args_is_help=True)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
app.add_typer(queue_app, name="queue")
app.add_typer(config_app, name="config")
app.add_typer(db_app, name="db")

#: Piped output (``| grep``, a log file) is not cut or wrapped at 80 columns: a UID is 64 characters.
_PIPED_WIDTH = 100_000
out = Console(width=None if sys.stdout.isatty() else _PIPED_WIDTH)
err = Console(stderr=True, width=None if sys.stderr.isatty() else _PIPED_WIDTH)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


class _State:
    config_path: Path | None = None


def fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[red]error:[/red] {message}", highlight=False, markup=True)
    raise typer.Exit(code)


@app.callback()
def main(
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="TOML configuration file.", envvar="PACS_NODE_CONFIG")
    ] = None,
) -> None:
    _State.config_path = config


def settings() -> Settings:
    try:
        return load_settings(config_path_from_env(_State.config_path))
    except ConfigError as exc:
        err.print(str(exc), markup=False, highlight=False)
        raise typer.Exit(2) from None


def runtime(s: Settings):  # noqa: ANN201 (ServerContext; imported lazily to keep `--help` fast)
    from pacs_node.ops.context import ServerContext

    try:
        return ServerContext.open(s, migrate=False)
    except Exception as exc:
        fail(f"cannot open the database or store: {exc}")


def _jsonable(value: Any) -> Any:
    if is_dataclass(value):
        return _jsonable(asdict(value))
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, datetime):  # the database's naive datetimes are UTC: say so
        return (value if value.tzinfo else value.replace(tzinfo=timezone.utc)).isoformat()
    if isinstance(value, Enum):
        return value.value
    return value


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(_jsonable(value), indent=2) + "\n")


def _db_errors(fn):  # noqa: ANN001, ANN202 (decorator)
    """Turn a database error into one line that says what to do, instead of a traceback."""
    import functools

    from sqlalchemy.exc import OperationalError, ProgrammingError

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (OperationalError, ProgrammingError) as exc:
            fail(f"database error: {exc.orig} (has the schema been created? run `pacs-node db upgrade`)")

    return wrapper


# -- running ---------------------------------------------------------------------------------------


@app.command()
def serve() -> None:
    """Run the node: DICOM listener, worker processes, exporter, housekeeping, /healthz and /metrics."""
    from pacs_node.ops.logs import setup_logging
    from pacs_node.ops.context import prepare_metrics_dir

    s = settings()
    setup_logging(s.logging.level, process="serve")
    prepare_metrics_dir(s, fresh=True)
    from pacs_node.ops.serve import serve as run

    config_path = config_path_from_env(_State.config_path)
    raise typer.Exit(run(s, config_path.resolve() if config_path else None))


@app.command()
def worker(
    parent_pid: Annotated[int | None, typer.Option(hidden=True, help="Set by `serve`.")] = None,
) -> None:
    """Run one analysis worker process (``serve`` starts ``worker.count`` of these itself)."""
    from pacs_node.ops.logs import setup_logging
    from pacs_node.ops.context import prepare_metrics_dir

    s = settings()
    setup_logging(s.logging.level, process="worker")
    if parent_pid is not None:
        prepare_metrics_dir(s, fresh=False)
    from pacs_node.work.worker import PipelineUnavailable, run_worker

    try:
        code = run_worker(s, parent_pid=parent_pid)
    except PipelineUnavailable as exc:
        fail(str(exc))
    raise typer.Exit(code)


# -- talking to peers ------------------------------------------------------------------------------

_AD_HOC_PEER = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>[^:]+):(?P<port>\d+)$")


def resolve_peer(s: Settings, name: str) -> Peer:
    """A configured peer by name, or an ad-hoc ``AE@host:port``."""
    if name in s.peers:
        return s.peers[name]
    match = _AD_HOC_PEER.match(name)
    if match:
        return Peer(ae_title=match["ae"], host=match["host"], port=int(match["port"]))
    known = ", ".join(sorted(s.peers)) or "none configured"
    fail(f"unknown peer {name!r} (configured: {known}; or give AE@host:port)", 2)


@app.command()
def echo(peer: Annotated[str, typer.Argument(help="Peer name from the config, or AE@host:port.")],
         as_json: JsonOpt = False) -> None:
    """C-ECHO a peer."""
    from pacs_node.work.export import ExportError
    from pacs_node.work.export import echo as c_echo

    s = settings()
    target = resolve_peer(s, peer)
    try:
        status = c_echo(s, target)
    except ExportError as exc:
        if as_json:
            print_json({"peer": peer, "ok": False, "error": str(exc)})
            raise typer.Exit(1) from None
        fail(str(exc))
    if as_json:
        print_json({"peer": peer, "ok": status == 0, "status": status})
    else:
        out.print(f"C-ECHO {target.ae_title}@{target.host}:{target.port}: status 0x{status:04X}")
    raise typer.Exit(0 if status == 0 else 1)


@app.command()
def send(peer: Annotated[str, typer.Argument(help="Peer name from the config, or AE@host:port.")],
         files: Annotated[list[Path], typer.Argument(help="DICOM files to C-STORE.", exists=True, dir_okay=False)],
         as_json: JsonOpt = False) -> None:
    """C-STORE DICOM files to a peer (one association, each file as stored)."""
    import pydicom

    from pacs_node.work.export import ExportError, send_datasets

    s = settings()
    target = resolve_peer(s, peer)
    datasets = []
    for path in files:
        try:
            datasets.append(pydicom.dcmread(path))
        except Exception as exc:
            fail(f"{path}: not a readable DICOM file ({exc})", 2)
    try:
        outcomes = send_datasets(s, target, datasets)
    except ExportError as exc:
        fail(str(exc))
    rows = [{"file": str(path), "status": None if isinstance(outcome, ExportError) else outcome,
             "error": str(outcome) if isinstance(outcome, ExportError) else None}
            for path, outcome in zip(files, outcomes, strict=True)]
    if as_json:
        print_json(rows)
    else:
        table = Table("file", "status")
        for row in rows:
            table.add_row(row["file"], row["error"] or f"0x{row['status']:04X}")
        out.print(table)
    raise typer.Exit(0 if all(row["status"] == 0 for row in rows) else 1)


# -- the queue -------------------------------------------------------------------------------------

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


@queue_app.command("ls")
@_db_errors
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
        jobs = rt.queue.list(state=state, kind=kind, limit=limit)
    except ValueError as exc:
        fail(str(exc), 2)
    if as_json:
        print_json(jobs)
    else:
        out.print(_job_table(jobs))


@queue_app.command("show")
@_db_errors
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
        table.add_row(key, json.dumps(_jsonable(value)) if isinstance(value, dict) else str(value))
    out.print(table)


@queue_app.command("retry")
@_db_errors
def queue_retry(
    job_id: Annotated[int | None, typer.Argument(help="The job to retry.")] = None,
    all_failed: Annotated[bool, typer.Option("--all-failed", help="Retry every failed and dead job.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Put a failed, dead or cancelled job (or all failed and dead ones) back in the queue."""
    if (job_id is None) == (not all_failed):
        fail("give a job ID or --all-failed (not both)", 2)
    rt = runtime(settings())
    n = rt.queue.retry_all_failed() if all_failed else int(rt.queue.retry(job_id))
    if n:
        from storage.schema import JobKind

        for kind in JobKind:  # a running node on this host takes them now, not at its next poll
            rt.doorbell(kind).ring()
    if as_json:
        print_json({"retried": n})
    else:
        out.print(f"{n} job(s) queued again")
    if job_id is not None and n == 0:
        raise typer.Exit(1)


@queue_app.command("cancel")
@_db_errors
def queue_cancel(job_id: int, as_json: JsonOpt = False) -> None:
    """Cancel a job that has not finished."""
    rt = runtime(settings())
    ok = rt.queue.cancel(job_id)
    if as_json:
        print_json({"cancelled": ok})
    else:
        out.print("cancelled" if ok else f"job {job_id} is not cancellable (unknown or already finished)")
    raise typer.Exit(0 if ok else 1)


_DURATION = re.compile(r"^(?P<n>\d+(?:\.\d+)?)(?P<unit>[smhdw])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> timedelta:
    match = _DURATION.match(text.strip())
    if not match:
        fail(f"--older-than: {text!r} is not a duration like 30m, 12h, 7d or 2w", 2)
    return timedelta(seconds=float(match["n"]) * _UNIT_SECONDS[match["unit"]])


@queue_app.command("purge")
@_db_errors
def queue_purge(
    older_than: Annotated[str, typer.Option("--older-than", help="Age like 12h, 7d, 2w.")],
    as_json: JsonOpt = False,
) -> None:
    """Delete finished jobs (done, cancelled, dead) last changed before the given age."""
    age = parse_duration(older_than)
    rt = runtime(settings())
    n = rt.queue.purge(age)
    if as_json:
        print_json({"purged": n})
    else:
        out.print(f"{n} job(s) purged")


# -- looking at what the node holds ------------------------------------------------------------------


@app.command()
@_db_errors
def stats(as_json: JsonOpt = False) -> None:
    """Instances by origin and disposition, jobs by kind and state, store space."""
    from sqlalchemy import func, select

    from storage.history import analysis_counts
    from storage.schema import Instance

    s = settings()
    rt = runtime(s)
    with rt.read_session() as session:
        instances = session.execute(
            select(Instance.origin, Instance.disposition, func.count(), func.coalesce(func.sum(Instance.size_bytes), 0))
            .group_by(Instance.origin, Instance.disposition)
        ).all()
        analyses = analysis_counts(session)
    data = {
        "analyses": analyses,
        "instances": [{"origin": o, "disposition": d, "count": n, "bytes": int(b)} for o, d, n, b in instances],
        "jobs": [{"kind": k, "state": st, "count": n} for k, st, n in rt.queue_depth()],
        "store": {"path": str(rt.store.root), "free_bytes": rt.store.free_bytes(),
                  "min_free_bytes": rt.store.min_free_bytes},
    }
    if as_json:
        print_json(data)
        return
    table = Table("origin", "disposition", "count", "bytes", title="instances")
    for row in data["instances"]:
        table.add_row(row["origin"], row["disposition"], str(row["count"]), str(row["bytes"]))
    out.print(table)
    table = Table("outcome", "count", title="analyses (kept after jobs are purged)")
    for outcome, n in sorted(data["analyses"].items()):
        table.add_row(outcome, str(n))
    out.print(table)
    table = Table("kind", "state", "count", title="jobs")
    for row in data["jobs"]:
        table.add_row(row["kind"], row["state"], str(row["count"]))
    out.print(table)
    out.print(f"store {data['store']['path']}: {data['store']['free_bytes'] / 1e9:.1f} GB free")


def _analysis_of(rt: Any, sop_instance_uid: str, history: Any) -> list[dict[str, Any]]:
    """An instance's analysis: its lasting record (kept after ``queue purge``), else the job in flight."""
    if history is not None:
        return [{"id": history.job_id, "state": history.state, "attempts": history.attempts,
                 "finished_at": history.finished_at, "last_error": history.last_error}]
    return [{"id": j.id, "state": j.state, "attempts": j.attempts, "finished_at": j.finished_at,
             "last_error": j.last_error} for j in rt.queue.for_instance(sop_instance_uid)]


def _deliveries_of(rt: Any, sop_instance_uid: str, history: list[Any]) -> list[dict[str, Any]]:
    """A result's deliveries: each destination's lasting record, plus jobs not attempted yet."""
    rows = [{"id": d.job_id, "destination": d.destination, "state": d.state, "attempts": d.attempts,
             "first_attempt_at": d.first_attempt_at, "last_attempt_at": d.last_attempt_at,
             "delivered_at": d.delivered_at, "last_error": d.last_error} for d in history]
    recorded = {d.destination for d in history}
    rows += [{"id": j.id, "destination": j.destination, "state": j.state, "attempts": j.attempts,
              "first_attempt_at": None, "last_attempt_at": None, "delivered_at": None, "last_error": j.last_error}
             for j in rt.queue.for_instance(sop_instance_uid) if j.destination not in recorded]
    return _jsonable(rows)


@app.command()
@_db_errors
def results(study_uid: Annotated[str, typer.Argument(help="Study Instance UID.")], as_json: JsonOpt = False) -> None:
    """A study's received instances, what happened to each, and the result objects made from them."""
    from storage.history import analysis_of, deliveries_of
    from storage.repository import instances_for_study

    rt = runtime(settings())
    with rt.read_session() as session:
        rows = instances_for_study(session, study_uid)
    if not rows:
        fail(f"no instances of study {study_uid}")
    received = [row for row in rows if row.origin == "received"]
    produced = [row for row in rows if row.origin == "result"]
    with rt.read_session() as session:
        analyses = {uid: analysis_of(session, uid) for uid in (row.sop_instance_uid for row in received)}
        deliveries = deliveries_of(session, [row.sop_instance_uid for row in produced])
    data = []
    for row in received:
        data.append({
            "sop_instance_uid": row.sop_instance_uid,
            "modality": row.modality,
            "disposition": row.disposition,
            "reason": row.reason,
            "analysis": _analysis_of(rt, row.sop_instance_uid, analyses.get(row.sop_instance_uid)),
            "results": [
                {"sop_instance_uid": r.sop_instance_uid, "sop_class_uid": r.sop_class_uid, "path": r.path,
                 "exports": _deliveries_of(rt, r.sop_instance_uid,
                                           [d for d in deliveries if d.sop_instance_uid == r.sop_instance_uid])}
                for r in produced if r.source_sop_instance_uid == row.sop_instance_uid
            ],
        })
    if as_json:
        print_json(data)
        return
    from pydicom.uid import UID

    table = Table("received instance", "disposition", "analysis", "result", "class", "exports")
    for item in data:
        analysis = ", ".join(f"#{j['id']} {j['state']}" + (f" ({j['attempts']} attempts)" if j["attempts"] > 1 else "")
                             for j in item["analysis"]) or (item["reason"] or "")
        if not item["results"]:
            table.add_row(item["sop_instance_uid"], item["disposition"], analysis, "", "", "")
        for i, r in enumerate(item["results"]):
            exports = ", ".join(f"{e['destination']}: {e['state']}"
                                + (f" {e['delivered_at'][:19]}Z" if e["delivered_at"] else "")
                                + (f" ({e['attempts']} attempts)" if e["attempts"] > 1 else "")
                                for e in r["exports"]) or "-"
            table.add_row(item["sop_instance_uid"] if i == 0 else "", item["disposition"] if i == 0 else "",
                          analysis if i == 0 else "", r["sop_instance_uid"], UID(r["sop_class_uid"]).name, exports)
    out.print(table)


# -- configuration and schema ----------------------------------------------------------------------


@config_app.command("init")
def config_init(
    path: Annotated[Path, typer.Argument(help="Where to write the example.")] = Path("pacs-node.toml"),
    force: Annotated[bool, typer.Option(help="Overwrite an existing file.")] = False,
) -> None:
    """Write a commented example configuration (every key, with its default)."""
    if path.exists() and not force:
        fail(f"{path} exists (use --force to overwrite)", 2)
    path.write_text(EXAMPLE_TOML)
    out.print(f"wrote {path}")


@config_app.command("check")
def config_check(as_json: JsonOpt = False) -> None:
    """Validate the configuration, the bundle, TLS files, database URL and peers' addresses, and print the
    effective values (exit 2, naming each bad key, if anything would keep the node from working)."""
    from pacs_node.ops.preflight import check_settings

    s = settings()
    problems = check_settings(s)
    if problems:
        for problem in problems:
            err.print(str(problem), markup=False, highlight=False)
        raise typer.Exit(2)
    if as_json:
        print_json(json.loads(s.model_dump_json()))
        return
    out.print(f"configuration OK ({config_path_from_env(_State.config_path) or 'defaults'})")
    out.print(f"  AE {s.node.ae_title} on {s.node.bind}:{s.node.port}")
    out.print(f"  database {s.database_url}")
    out.print(f"  store {s.store_path}")
    out.print(f"  pipeline {s.bundle_path or 'fake'} on {s.pipeline.device.value}, {s.worker.count} worker(s)")
    out.print(f"  peers: {', '.join(sorted(s.peers)) or 'none'}")


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Create or migrate the database schema to the version this release needs."""
    from storage.db import current_revision, upgrade

    s = settings()
    s.data_dir.mkdir(parents=True, exist_ok=True)
    try:
        upgrade(s.database_url)
        out.print(f"database at revision {current_revision(s.database_url)}")
    except Exception as exc:
        fail(f"upgrade failed: {exc}")


# -- sub-apps written beside this module -------------------------------------------------------------


def _register_optional(module: str, names: tuple[str, ...]) -> None:
    """Add the typer apps ``names`` from ``module`` when it is installed; a missing or broken module
    costs only its commands (logged), never the rest of the CLI."""
    import importlib

    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name != module:
            log.warning("`%s` commands unavailable: %s", "/".join(names), exc)
        return
    except ImportError as exc:
        log.warning("`%s` commands unavailable: %s", "/".join(names), exc)
        return
    for name in names:
        sub = getattr(mod, f"{name}_app", None)
        if sub is None and len(names) == 1:
            sub = getattr(mod, "app", None)
        if isinstance(sub, typer.Typer):
            app.add_typer(sub, name=name)
        else:
            log.warning("%s has no typer app for `%s`", module, name)


_register_optional("pacs_node.cli.models", ("models",))
_register_optional("pacs_node.cli.training", ("train", "evaluate", "phantoms"))
_register_optional("pacs_node.cli.doctor", ("doctor",))
