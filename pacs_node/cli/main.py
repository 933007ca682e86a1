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
from datetime import datetime, timedelta
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

out = Console()
err = Console(stderr=True)

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
    if isinstance(value, datetime):
        return value.isoformat()
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
            f"{job.attempts}/{job.max_attempts}", job.updated_at.strftime("%Y-%m-%d %H:%M:%S"),
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

    from storage.schema import Instance

    s = settings()
    rt = runtime(s)
    with rt.read_session() as session:
        instances = session.execute(
            select(Instance.origin, Instance.disposition, func.count(), func.coalesce(func.sum(Instance.size_bytes), 0))
            .group_by(Instance.origin, Instance.disposition)
        ).all()
    data = {
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
    table = Table("kind", "state", "count", title="jobs")
    for row in data["jobs"]:
        table.add_row(row["kind"], row["state"], str(row["count"]))
    out.print(table)
    out.print(f"store {data['store']['path']}: {data['store']['free_bytes'] / 1e9:.1f} GB free")


@app.command()
@_db_errors
def results(study_uid: Annotated[str, typer.Argument(help="Study Instance UID.")], as_json: JsonOpt = False) -> None:
    """A study: the images received, which was analysed and why, which were set aside and why, the content
    gate's score, and the result objects made (with their exports)."""
    from storage.repository import instances_for_study
    from storage.studies import get_study

    rt = runtime(settings())
    with rt.read_session() as session:
        rows = instances_for_study(session, study_uid)
        study = get_study(session, study_uid)
        analysis = dict(study.analysis or {}) if study is not None else {}
        summary = {"state": study.state if study else None, "version": study.version if study else 0,
                   "settle_due": study.settle_due if study else None,
                   "analysed_at": study.analysed_at if study else None}
    if not rows:
        fail(f"no instances of study {study_uid}")
    images = {i["sop_instance_uid"]: i for i in analysis.get("images", [])}
    received = [row for row in rows if row.origin == "received"]
    produced = [row for row in rows if row.origin == "result"]
    instances = []
    for row in received:
        image = images.get(row.sop_instance_uid, {})
        instances.append({
            "sop_instance_uid": row.sop_instance_uid,
            "modality": row.modality,
            "disposition": row.disposition,
            "view": image.get("view"),
            "role": image.get("role") or ("not analysed" if row.disposition != "queued" else "waiting"),
            "reason": image.get("reason") or row.reason,
            "analysis": [{"id": j.id, "state": j.state, "attempts": j.attempts, "last_error": j.last_error}
                         for j in rt.queue.for_instance(row.sop_instance_uid)],
        })
    data = {
        "study_instance_uid": study_uid, **summary,
        "model": analysis.get("model"), "analysed": analysis.get("analysed"),
        "interpreted": analysis.get("interpreted"), "not_interpreted_reason": analysis.get("not_interpreted_reason"),
        "gate_score": analysis.get("gate_score"), "gate_threshold": analysis.get("gate_threshold"),
        "instances": instances,
        "results": [
            {"sop_instance_uid": r.sop_instance_uid, "sop_class_uid": r.sop_class_uid, "path": r.path,
             "current": r.sop_instance_uid in analysis.get("results", {}).values(),
             "exports": [{"id": j.id, "destination": j.destination, "state": j.state}
                         for j in rt.queue.for_instance(r.sop_instance_uid)]}
            for r in produced
        ],
    }
    if as_json:
        print_json(data)
        return
    from pydicom.uid import UID

    gate = ("no content gate" if data["gate_score"] is None
            else f"content gate score {data['gate_score']:.2f} (threshold {data['gate_threshold']:.2f})")
    out.print(f"study {study_uid}: {data['state'] or 'not collected'}, version {data['version']}"
              + (f", {'interpreted' if data['interpreted'] else 'NOT interpreted'} by {data['model']}; {gate}"
                 if data["model"] else ""), highlight=False)
    if data["not_interpreted_reason"]:
        out.print(f"not interpreted: {data['not_interpreted_reason']}", highlight=False)
    table = Table("received instance", "view", "role", "why", "analysis jobs")
    for item in instances:
        jobs = ", ".join(f"#{j['id']} {j['state']}" for j in item["analysis"])
        table.add_row(item["sop_instance_uid"], item["view"] or "", item["role"], item["reason"] or "", jobs)
    out.print(table)
    made = Table("result", "class", "current", "exports")
    for r in data["results"]:
        exports = ", ".join(f"{e['destination']}: {e['state']}" for e in r["exports"]) or "-"
        made.add_row(r["sop_instance_uid"], UID(r["sop_class_uid"]).name, "yes" if r["current"] else "superseded",
                     exports)
    out.print(made)


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
    """Validate the configuration and print the effective values (exit 2 with the bad key if invalid)."""
    s = settings()
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
