"""``pacs-node results`` and ``pacs-node stats``: what the node holds and what it made of it."""

from __future__ import annotations

from typing import Annotated

import typer
from pydicom.uid import UID
from rich.table import Table

from pacs_node.cli.common import JsonOpt, db_errors, fail, out, print_json, runtime, settings
from storage.repository import instance_counts, instances_for_study


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
    """A study's received instances, what happened to each, and the result objects made from them."""
    rt = runtime(settings())
    with rt.read_session() as session:
        rows = instances_for_study(session, study_uid)
    if not rows:
        fail(f"no instances of study {study_uid}")
    received = [row for row in rows if row.origin == "received"]
    produced = [row for row in rows if row.origin == "result"]
    data = []
    for row in received:
        jobs = rt.queue.for_instance(row.sop_instance_uid)
        mine = [r for r in produced if r.source_sop_instance_uid == row.sop_instance_uid]
        data.append({
            "sop_instance_uid": row.sop_instance_uid,
            "modality": row.modality,
            "disposition": row.disposition,
            "reason": row.reason,
            "analysis": [{"id": j.id, "state": j.state, "attempts": j.attempts, "last_error": j.last_error}
                         for j in jobs],
            "results": [
                {"sop_instance_uid": r.sop_instance_uid, "sop_class_uid": r.sop_class_uid, "path": r.path,
                 "exports": [{"id": j.id, "destination": j.destination, "state": j.state}
                             for j in rt.queue.for_instance(r.sop_instance_uid)]}
                for r in mine
            ],
        })
    if as_json:
        print_json(data)
        return
    table = Table("received instance", "disposition", "analysis", "result", "class", "exports")
    for item in data:
        analysis = ", ".join(f"#{j['id']} {j['state']}" for j in item["analysis"]) or (item["reason"] or "")
        if not item["results"]:
            table.add_row(item["sop_instance_uid"], item["disposition"], analysis, "", "", "")
        for i, r in enumerate(item["results"]):
            exports = ", ".join(f"{e['destination']}: {e['state']}" for e in r["exports"]) or "-"
            table.add_row(item["sop_instance_uid"] if i == 0 else "", item["disposition"] if i == 0 else "",
                          analysis if i == 0 else "", r["sop_instance_uid"], UID(r["sop_class_uid"]).name, exports)
    out.print(table)
