"""``pacs-node results`` and ``pacs-node stats``: what the node holds and what it made of it."""

from __future__ import annotations

from typing import Annotated

import typer
from pydicom.uid import UID
from rich.table import Table

from pacs_node.cli.common import JsonOpt, db_errors, fail, out, print_json, runtime, settings
from storage.repository import instance_counts, instances_for_study
from storage.studies import get_study


@db_errors
def stats(as_json: JsonOpt = False) -> None:
    """Instances by origin and disposition, jobs by kind and state, store space."""
    s = settings()
    rt = runtime(s)
    with rt.read_session() as session:
        instances = instance_counts(session)
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


@db_errors
def results(study_uid: Annotated[str, typer.Argument(help="Study Instance UID.")], as_json: JsonOpt = False) -> None:
    """A study: the images received, which was analysed and why, which were set aside and why, the content
    gate's score, and the result objects made (with their exports)."""
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
