"""``pacs-node results``, ``stats``, ``reanalyse`` and ``resend``: what the node holds, what it made of
it, and doing that again (the operations live in :mod:`pacs_node.ops.admin`, shared with the HTTP API)."""

from __future__ import annotations

from typing import Annotated

import typer
from pydicom.uid import UID
from rich.table import Table

from pacs_node.cli.common import JsonOpt, db_errors, fail, out, print_json, print_outcome, runtime, settings
from pacs_node.ops import admin


@db_errors
def stats(as_json: JsonOpt = False) -> None:
    """Instances by origin and disposition, jobs by kind and state, store space."""
    data = admin.stats(runtime(settings()))
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


@db_errors
def results(
    study_uid: Annotated[str | None, typer.Argument(help="Study Instance UID.")] = None,
    accession: Annotated[str | None, typer.Option("--accession", help="Find the study by Accession Number.")] = None,
    patient_id: Annotated[str | None, typer.Option("--patient-id", help="Find the studies of a Patient ID.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """A study's received instances, what happened to each, and the result objects made from them (the
    study by its UID, or every study with the Accession Number or Patient ID given)."""
    if sum(v is not None for v in (study_uid, accession, patient_id)) != 1:
        fail("give a Study Instance UID, --accession or --patient-id (one of them)", 2)
    rt = runtime(settings())
    if study_uid is None:
        studies = [s["study_instance_uid"] for s in admin.find(rt, accession_number=accession,
                                                                patient_id=patient_id, limit=500)]
        if not studies:
            fail("no study matches")
    else:
        studies = [study_uid]
    try:
        reports = {uid: admin.study_report(rt, uid) for uid in studies}
    except admin.NotFound as exc:
        fail(str(exc))
    summaries = {uid: {"study_instance_uid": uid, **_summary(admin.study_analysis(rt, uid)), "instances": report}
                 for uid, report in reports.items()}
    if as_json:  # one study: its instances, each with the study's analysis beside it; several: per study
        if study_uid is not None:
            study = {k: v for k, v in summaries[study_uid].items() if k != "instances"}
            print_json([{**item, "study": study} for item in reports[study_uid]])
        else:
            print_json(list(summaries.values()))
        return
    for uid, data in summaries.items():
        gate = ("" if data["gate_score"] is None
                else f"; content gate score {data['gate_score']:.2f} (threshold {data['gate_threshold']:.2f})")
        if data["model"]:
            out.print(f"study {uid}: version {data['version']}, "
                      f"{'interpreted' if data['interpreted'] else 'NOT interpreted'} by {data['model']}{gate}",
                      highlight=False)
        if data["not_interpreted_reason"]:
            out.print(f"not interpreted: {data['not_interpreted_reason']}", highlight=False)
        table = Table("received instance", "view", "role: why", "analysis", "result", "class", "exports", title=uid)
        for item in data["instances"]:
            analysis = ", ".join(f"#{j['id']} {j['state']}" for j in item["analysis"]) or (item["reason"] or "")
            role = f"{item['role']}: {item['why']}" if item["role"] else (item["reason"] or "")
            first = (item["sop_instance_uid"], item["view"] or "", role, analysis)
            if not item["results"]:
                table.add_row(*first, "", "", "")
            for i, r in enumerate(item["results"]):
                exports = ", ".join(f"{e['destination']}: {e['state']}" for e in r["exports"]) or "-"
                table.add_row(*(first if i == 0 else ("", "", "", "")), r["sop_instance_uid"],
                              UID(r["sop_class_uid"]).name, exports)
        out.print(table)


def _summary(analysis: dict) -> dict:
    """What ``results`` prints of a study's last analysis (the images are in each instance's row)."""
    keys = ("state", "version", "settle_due", "analysed_at", "model", "analysed", "interpreted",
            "not_interpreted_reason", "gate_score", "gate_threshold", "results", "supersedes")
    return {key: analysis.get(key) for key in keys}


@db_errors
def reanalyse(study_uid: Annotated[str, typer.Argument(help="Study Instance UID.")], as_json: JsonOpt = False) -> None:
    """Analyse a study's chest radiographs again (results keep their UIDs: the PACS sees updates)."""
    try:
        n = admin.reanalyse(runtime(settings()), study_uid)
    except admin.AdminError as exc:
        fail(str(exc))
    print_outcome(as_json, {"queued": n}, f"{n} analysis job(s) queued")


@db_errors
def resend(study_uid: Annotated[str, typer.Argument(help="Study Instance UID.")],
           peer: Annotated[str, typer.Option("--peer", help="Configured peer to send to.")],
           as_json: JsonOpt = False) -> None:
    """Send a study's result objects to a peer again (or for the first time)."""
    try:
        n = admin.resend(runtime(settings()), study_uid, peer)
    except admin.AdminError as exc:
        fail(str(exc))
    print_outcome(as_json, {"queued": n}, f"{n} export job(s) queued for {peer}")
