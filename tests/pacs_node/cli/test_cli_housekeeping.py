"""The admin CLI (in this process, through typer's runner) and the housekeeping tasks."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update
from typer.testing import CliRunner

from pacs_node.cli.main import app
from pacs_node.config import load_settings
from pacs_node.ops.housekeeping import purge_instances, purge_jobs, reclaim_leases
from pacs_node.ops.context import ServerContext
from storage.repository import add_instance
from storage.schema import Instance, Job, JobKind, utcnow
from tests.pacs_node.helpers import StoreSCP, make_cr
from tests.support import dcmtk, free_port

runner = CliRunner()


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "pacs-node.toml"
    path.write_text(f'[node]\ndata_dir = "{tmp_path / "var"}"\n[store]\nmin_free_bytes = 0\n'
                    '[retention]\ndays = 30\njob_days = 7\n')
    return path


@pytest.fixture
def runtime(config: Path) -> Iterator[ServerContext]:
    rt = ServerContext.open(load_settings(config))
    yield rt
    rt.close()


def cli(config: Path, *args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["--config", str(config), *args])
    return result.exit_code, result.output


def seed(rt: ServerContext, n: int) -> list[int]:
    """``n`` received instances (files in the store) with one analyse job each; returns the job ids."""
    with rt.write_session() as session, session.begin():
        for i in range(n):
            uid = f"1.2.3.{i}"
            relpath = rt.store.relpath_for("1.2.3", "1.2.3.0", uid)
            rt.store.write_bytes(relpath, b"x" * 10)
            add_instance(session, sop_instance_uid=uid, sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
                         transfer_syntax_uid="1.2.840.10008.1.2.1", study_instance_uid="1.2.3",
                         series_instance_uid="1.2.3.0", path=relpath, size_bytes=10, origin="received",
                         disposition="queued")
            rt.queue.enqueue(session, kind=JobKind.ANALYSE, sop_instance_uid=uid, dedupe_key=f"analyse:{uid}",
                             max_attempts=2)
    return [job.id for job in rt.queue.list(limit=n)]


def test_queue_commands(config: Path, runtime: ServerContext) -> None:
    first, second, third = sorted(seed(runtime, 3))
    code, out = cli(config, "queue", "ls", "--json")
    assert code == 0 and {j["state"] for j in json.loads(out)} == {"queued"}

    (claimed,) = runtime.queue.claim("w", [JobKind.ANALYSE], limit=1)
    runtime.queue.fail(claimed.id, "w", "boom", retryable=False)
    code, out = cli(config, "queue", "ls", "--state", "dead", "--json")
    assert [j["id"] for j in json.loads(out)] == [claimed.id]
    code, out = cli(config, "queue", "show", str(claimed.id), "--json")
    assert json.loads(out)["last_error"] == "boom"
    assert cli(config, "queue", "show", "999")[0] == 1
    assert cli(config, "queue", "ls", "--state", "sleeping")[0] == 2  # unknown state: usage error

    code, out = cli(config, "queue", "retry", "--all-failed", "--json")
    assert code == 0 and json.loads(out) == {"retried": 1}
    assert runtime.queue.get(claimed.id).state == "queued"
    assert cli(config, "queue", "retry")[0] == 2  # neither ID nor --all-failed

    assert cli(config, "queue", "cancel", str(third))[0] == 0
    assert runtime.queue.get(third).state == "cancelled"
    assert cli(config, "queue", "cancel", str(third))[0] == 1  # already finished

    assert cli(config, "queue", "purge", "--older-than", "soon")[0] == 2
    code, out = cli(config, "queue", "purge", "--older-than", "0s", "--json")
    assert code == 0 and json.loads(out) == {"purged": 1}

    code, out = cli(config, "stats", "--json")
    stats = json.loads(out)
    assert stats["instances"] == [{"origin": "received", "disposition": "queued", "count": 3, "bytes": 30}]
    code, out = cli(config, "results", "1.2.3", "--json")
    assert code == 0 and len(json.loads(out)) == 3
    # human tables work too
    assert cli(config, "queue", "ls")[0] == 0 and cli(config, "stats")[0] == 0


def test_echo_and_send_to_a_real_peer(config: Path, tmp_path: Path) -> None:
    dcmtk("storescp")
    scp = StoreSCP(tmp_path / "rx", free_port()).start()
    try:
        peer = f"RECEIVER@127.0.0.1:{scp.port}"
        code, out = cli(config, "echo", peer, "--json")
        assert code == 0 and json.loads(out)["ok"] is True
        image = tmp_path / "cr.dcm"
        ds = make_cr(image)
        code, out = cli(config, "send", peer, str(image), "--json")
        assert code == 0 and json.loads(out)[0]["status"] == 0
        assert [r.SOPInstanceUID for r in scp.received()] == [ds.SOPInstanceUID]
    finally:
        scp.stop()
    code, out = cli(config, "echo", peer)  # the peer is gone now
    assert code == 1 and "no association" in out
    assert cli(config, "echo", "nobody")[0] == 2


def test_housekeeping_reclaims_and_purges(runtime: ServerContext) -> None:
    ids = seed(runtime, 3)
    claimed = runtime.queue.claim("dead-worker", [JobKind.ANALYSE], limit=1)
    with runtime.write_session() as session, session.begin():  # the worker died long ago
        session.execute(update(Job).where(Job.id == claimed[0].id)
                        .values(lease_expires_at=utcnow() - timedelta(minutes=1)))
    assert reclaim_leases(runtime) == 1
    assert runtime.queue.get(claimed[0].id).state == "failed"

    with runtime.write_session() as session, session.begin():  # two instances are past retention
        session.execute(update(Instance).where(Instance.sop_instance_uid.in_(["1.2.3.0", "1.2.3.1"]))
                        .values(received_at=utcnow() - timedelta(days=31)))
        session.execute(update(Job).where(Job.id.in_(ids))
                        .values(state="done", updated_at=utcnow() - timedelta(days=8)))
    paths = {uid: runtime.store.path(runtime.store.relpath_for("1.2.3", "1.2.3.0", uid))
             for uid in ("1.2.3.0", "1.2.3.1", "1.2.3.2")}
    assert purge_instances(runtime.settings, runtime) == 2
    with runtime.read_session() as session:
        assert session.scalars(select(Instance.sop_instance_uid)).all() == ["1.2.3.2"]
    assert not paths["1.2.3.0"].exists() and not paths["1.2.3.1"].exists() and paths["1.2.3.2"].exists()
    assert purge_jobs(runtime.settings, runtime) == 3


def test_serve_names_the_port_it_cannot_listen_on(tmp_path: Path) -> None:
    import socket
    import subprocess
    import sys

    from tests.support import REPO

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "c.toml"
        config.write_text(f'[node]\nbind = "127.0.0.1"\nport = {port}\ndata_dir = "{tmp_path / "var"}"\n'
                          '[pipeline]\nbundle = "fake"\n[http]\nport = 0\n')
        result = subprocess.run([sys.executable, "-m", "pacs_node", "--config", str(config), "serve"],
                                capture_output=True, text=True, timeout=120, cwd=tmp_path,
                                env={"PYTHONPATH": str(REPO), "PATH": ""})
    assert result.returncode == 1
    assert f"node.port: cannot listen on 127.0.0.1:{port}" in result.stderr
