"""``pacs-node results`` and ``pacs-node stats``: what the node holds and what it made of it."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from pydicom.uid import UID
from rich.table import Table

from pacs_node.cli.common import JsonOpt, db_errors, fail, jsonable, out, print_json, runtime, settings
from pacs_node.ops.context import ServerContext
from storage.history import analysis_counts, analysis_of, deliveries_of
from storage.repository import instance_counts, instances_for_study
from storage.schema import Analysis, Delivery


@db_errors
def stats(as_json: JsonOpt = False) -> None:
    """Instances by origin and disposition, jobs by kind and state, store space."""
    s = settings()
    rt = runtime(s)
    with rt.read_session() as session:
        instances = instance_counts(session)
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


def _analysis(rt: ServerContext, sop_instance_uid: str, history: Analysis | None) -> list[dict[str, Any]]:
    """An instance's analysis: its lasting record (kept after ``queue purge``), else the job in flight."""
    if history is not None:
        return jsonable([{"id": history.job_id, "state": history.state, "attempts": history.attempts,
                          "finished_at": history.finished_at, "last_error": history.last_error}])
    return jsonable([{"id": j.id, "state": j.state, "attempts": j.attempts, "finished_at": j.finished_at,
                      "last_error": j.last_error} for j in rt.queue.for_instance(sop_instance_uid)])


def _deliveries(rt: ServerContext, sop_instance_uid: str, history: list[Delivery]) -> list[dict[str, Any]]:
    """A result's deliveries: each destination's lasting record, plus jobs not attempted yet."""
    rows = [{"id": d.job_id, "destination": d.destination, "state": d.state, "attempts": d.attempts,
             "first_attempt_at": d.first_attempt_at, "last_attempt_at": d.last_attempt_at,
             "delivered_at": d.delivered_at, "last_error": d.last_error, "commitment": d.commitment,
             "committed_at": d.committed_at} for d in history]
    recorded = {d.destination for d in history}
    rows += [{"id": j.id, "destination": j.destination, "state": j.state, "attempts": j.attempts,
              "first_attempt_at": None, "last_attempt_at": None, "delivered_at": None, "last_error": j.last_error,
              "commitment": None, "committed_at": None}
             for j in rt.queue.for_instance(sop_instance_uid) if j.destination not in recorded]
    return jsonable(rows)


@db_errors
def results(study_uid: Annotated[str, typer.Argument(help="Study Instance UID.")], as_json: JsonOpt = False) -> None:
    """A study's received instances, what happened to each, and the result objects made from them."""
    rt = runtime(settings())
    with rt.read_session() as session:
        rows = instances_for_study(session, study_uid)
    if not rows:
        fail(f"no instances of study {study_uid}")
    received = [row for row in rows if row.origin == "received"]
    produced = [row for row in rows if row.origin == "result"]
    with rt.read_session() as session:
        analyses = {row.sop_instance_uid: analysis_of(session, row.sop_instance_uid) for row in received}
        deliveries = deliveries_of(session, [row.sop_instance_uid for row in produced])
    data = []
    for row in received:
        data.append({
            "sop_instance_uid": row.sop_instance_uid,
            "modality": row.modality,
            "disposition": row.disposition,
            "reason": row.reason,
            "analysis": _analysis(rt, row.sop_instance_uid, analyses[row.sop_instance_uid]),
            "results": [
                {"sop_instance_uid": r.sop_instance_uid, "sop_class_uid": r.sop_class_uid, "path": r.path,
                 "exports": _deliveries(rt, r.sop_instance_uid,
                                        [d for d in deliveries if d.sop_instance_uid == r.sop_instance_uid])}
                for r in produced if r.source_sop_instance_uid == row.sop_instance_uid
            ],
        })
    if as_json:
        print_json(data)
        return
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
                                + (f", commitment {e['commitment']}" if e["commitment"] else "")
                                for e in r["exports"]) or "-"
            table.add_row(item["sop_instance_uid"] if i == 0 else "", item["disposition"] if i == 0 else "",
                          analysis if i == 0 else "", r["sop_instance_uid"], UID(r["sop_class_uid"]).name, exports)
    out.print(table)
