"""``pacs-node doctor [--repair]``: is the database consistent with the instance store?

A thin command over :class:`storage.doctor.Doctor`. Without ``--repair`` it only looks and exits 1 when
anything needs attention, so it can run from cron or a monitoring check. With ``--repair`` it applies the
doctor's conservative fixes (orphan files moved aside to ``<store>/.orphans/`` for a person, temp leftovers
deleted, expired leases reclaimed, rows whose file is gone removed with their unfinished jobs cancelled)
and exits 0 unless something is left that only a person can decide (a size mismatch).

``--grace`` protects work in flight: a file younger than that may be an instance whose row is being
committed right now, so it is never called an orphan. The default hour is safe on a running node;
``--grace 0s`` is for a node that is stopped (after a crash, before restarting it).
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from pacs_node.cli.common import JsonOpt, db_errors, out, parse_duration, print_json, runtime, settings
from storage.doctor import Doctor

app = typer.Typer(help="Check (and repair) the database against the instance store.")


@app.callback(invoke_without_command=True)
@db_errors
def doctor(
    repair: Annotated[bool, typer.Option("--repair", help="Fix what can be fixed safely.")] = False,
    grace: Annotated[str, typer.Option("--grace", help="Files younger than this are never orphans (30m, 1h, 0s).")] = "1h",
    as_json: JsonOpt = False,
) -> None:
    """Report orphan files, rows without files, size mismatches, temp leftovers, stuck leases and jobs
    whose lease holder is gone; with --repair, fix them."""
    grace_s = parse_duration(grace, "--grace").total_seconds()
    rt = runtime(settings())
    try:
        doc = Doctor(rt.sessions, rt.store, rt.queue, grace_s=grace_s)
        report = doc.repair() if repair else doc.check()
    finally:
        rt.close()
    findings = {
        "orphan_files": report.orphan_files,
        "missing_files": report.missing_files,
        "size_mismatches": report.size_mismatches,
        "temp_leftovers": report.temp_leftovers,
        "temp_in_flight": report.temp_in_flight,
        "stuck_jobs": report.stuck_jobs,
        "orphaned_leases": [f"{holder}: jobs {', '.join(map(str, ids))}"
                            for holder, ids in report.orphaned_leases.items()],
    }
    if as_json:
        print_json({"ok": report.ok, "repaired": repair, **findings, "actions": report.actions})
    else:
        table = Table("finding", "count", "examples", title=f"doctor: store {rt.store.root}")
        for name, items in findings.items():
            examples = ", ".join(str(getattr(item, "path", item)) for item in items[:3])
            table.add_row(name.replace("_", " "), str(len(items)), examples + (" ..." if len(items) > 3 else ""))
        out.print(table)
        for action in report.actions:
            out.print(f"repaired: {action}")
        if report.ok:
            out.print("[green]consistent[/green]")
        elif not repair:
            out.print("run `pacs-node doctor --repair` to fix what can be fixed safely")
    unresolved = report.size_mismatches if repair else not report.ok
    raise typer.Exit(1 if unresolved else 0)
