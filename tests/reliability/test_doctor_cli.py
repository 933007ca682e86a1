"""``pacs-node doctor``: what a crash leaves behind is reported (exit 1), ``--repair`` fixes it (exit 0),
and afterwards the node is consistent — driven through the real command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from sqlalchemy import update

from pacs_node.config import load_settings
from pacs_node.ops.context import ServerContext
from storage.repository import add_instance
from storage.schema import Job, JobKind
from tests.support import REPO

STUDY, SERIES = "1.2.826.0.1.3680043.8.498.77", "1.2.826.0.1.3680043.8.498.77.1"


def _doctor(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pacs_node", "--config", str(config), "doctor", "--json", *args],
                          check=False, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})


def _register(rt: ServerContext, sop: str, *, with_file: bool) -> str:
    relpath = rt.store.relpath_for(STUDY, SERIES, sop)
    if with_file:
        rt.store.write_bytes(relpath, b"DICM" * 64)
    with rt.write_session() as session, session.begin():
        add_instance(session, sop_instance_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
                     transfer_syntax_uid="1.2.840.10008.1.2.1", study_instance_uid=STUDY,
                     series_instance_uid=SERIES, path=relpath, size_bytes=256, disposition="queued")
        rt.queue.enqueue(session, kind=JobKind.ANALYSE, sop_instance_uid=sop, dedupe_key=f"analyse:{sop}")
    return relpath


def test_doctor_reports_then_repairs_what_crashes_leave(tmp_path: Path) -> None:
    config = tmp_path / "pacs-node.toml"
    config.write_text(f'[node]\ndata_dir = "{tmp_path / "var"}"\n[store]\nmin_free_bytes = 0\n')
    rt = ServerContext.open(load_settings(config))
    try:
        _register(rt, f"{SERIES}.1", with_file=True)  # healthy
        _register(rt, f"{SERIES}.2", with_file=False)  # a row whose file is gone
        orphan = rt.store.relpath_for(STUDY, SERIES, f"{SERIES}.3")
        rt.store.write_bytes(orphan, b"DICM")  # a file whose row never committed
        leftover = rt.store.open_temp()  # a writer that died half-way
        leftover.write(b"half")
        leftover.close()
        (job,) = rt.queue.claim("dead-worker", [JobKind.ANALYSE], limit=1)  # ... and a worker that died
        with rt.write_session() as session, session.begin():
            session.execute(update(Job).where(Job.id == job.id).values(lease_expires_at=Job.created_at))
    finally:
        rt.close()
    os.rename(leftover.name, leftover.name.replace(f"-{os.getpid()}-", "-999999999-"))  # its writer is gone

    found = _doctor(config, "--grace", "0s")
    assert found.returncode == 1, found.stderr
    report = json.loads(found.stdout)
    assert report["ok"] is False and report["repaired"] is False
    assert report["orphan_files"] == [orphan]
    assert [m["sop_instance_uid"] for m in report["missing_files"]] == [f"{SERIES}.2"]
    assert len(report["temp_leftovers"]) == 1
    assert report["stuck_jobs"] == [job.id]

    repaired = _doctor(config, "--grace", "0s", "--repair")
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert len(json.loads(repaired.stdout)["actions"]) == 4
    assert (tmp_path / "var" / "store" / ".orphans" / orphan).is_file()  # kept for a person, not deleted

    again = _doctor(config, "--grace", "0s")
    assert again.returncode == 0 and json.loads(again.stdout)["ok"] is True
