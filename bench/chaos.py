"""Chaos load test: a scaled-out node on PostgreSQL, under kill -9, must lose nothing and do nothing twice.

The topology of a site with GPU hosts, shrunk onto loopback: one ``pacs-node serve`` (listener, exporter,
housekeeping; ``worker.count = 0``) and ``--workers`` separate ``pacs-node worker`` processes, all sharing
one PostgreSQL database (a fresh schema per run, dropped afterwards) and one instance store directory.
Results go to a DCMTK ``storescp`` (``+uf``: every delivery is its own file, so a duplicate would show).

``--senders`` DCMTK ``storescu`` processes each send ``--images`` chest radiographs at the same time,
``--batch`` per association, resending (like a modality) whatever was not acknowledged when an
association broke. Meanwhile a chaos
loop ``kill -9``s a random worker every few seconds (restarted at once, as systemd would) and the listener
once (restarted a second later), until everything is acknowledged and analysed. Then the run waits for
the last exports, stops the node and checks:

* every instance ``storescu`` saw acknowledged is stored once (one row, its file present and complete);
* each was analysed exactly once: one ``analyse`` job, ``done``; the same number of result objects for
  every source and no result without a source (deterministic UIDs: a retried job makes the same objects);
* every result was exported: one ``export`` job each, ``done``, and the receiver holds exactly the set of
  result SOP Instance UIDs; deliveries beyond one per UID are counted and reported (a listener killed
  between the peer's success and our commit sends again; a PACS treats the same UID as the same object);
* ``pacs-node doctor --grace 0s`` finds nothing after the restarts (no manual repair needed).

    python -m bench.chaos                       # 3 senders x 200 images, 2 workers, fake pipeline
    python -m bench.chaos --images 20 --json    # the size CI runs (tests/reliability/test_chaos.py)

Prints a table (and with ``--json`` one JSON document); exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from bench.common import REPO, BenchError, dcmtk, free_port, wait_for_port

PG_SERVER = os.environ.get("PACS_NODE_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
_SENT = re.compile(r"Sending file: (?P<path>.+)$")
_RESPONSE = re.compile(r"Received Store Response \((?P<status>[^)]*)\)")


@dataclass
class ChaosOptions:
    senders: int = 3
    images: int = 200
    workers: int = 2
    #: A random worker is killed every U(lo, hi) seconds while images arrive.
    #: Only a worker that has finished a job since it was (re)started is a candidate, so that a slow
    #: machine, where a worker needs many seconds to start, still makes progress between kills.
    kill_every_s: tuple[float, float] = (3.0, 6.0)
    #: The listener is killed once, when this fraction of all images has been acknowledged.
    listener_kill_at: float = 0.4
    #: Images per association (a study's worth, as a modality sends them).
    batch: int = 10
    pipeline: str = "fake"
    pg_server: str = PG_SERVER
    seed: int = 0
    timeout_s: float = 900.0


@dataclass
class ChaosReport:
    options: dict[str, Any]
    acknowledged: int = 0
    send_rounds: int = 0
    worker_kills: int = 0
    listener_kills: int = 0
    received_rows: int = 0
    analyse_jobs: dict[str, int] = field(default_factory=dict)
    analyse_attempts_max: int = 0
    results: int = 0
    results_per_source: list[int] = field(default_factory=list)
    export_jobs: dict[str, int] = field(default_factory=dict)
    delivered_files: int = 0
    delivered_uids: int = 0
    duplicate_deliveries: int = 0
    doctor_ok: bool = False
    seconds_sending: float = 0.0
    seconds_total: float = 0.0
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


# -- the pieces ---------------------------------------------------------------------------------------


def make_images(directory: Path, count: int, seed: int) -> list[Path]:
    """``count`` small chest CRs (uncompressed, 12 bits) with fresh UIDs."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        ds = pydicom.Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.PatientName, ds.PatientID = "Chaos^Phantom", f"CHAOS{seed:03d}{i:05d}"
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber = "20260101", "120000", f"C{i:06d}"
        ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "PA"
        ds.SeriesNumber, ds.InstanceNumber = 1, 1
        ds.Rows = ds.Columns = 64
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = rng.integers(0, 4096, size=(64, 64), dtype=np.uint16).tobytes()
        path = directory / f"{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


class PgSchema:
    """A private schema in the PostgreSQL database, first on every connection's ``search_path``."""

    def __init__(self, server: str) -> None:
        import psycopg
        from sqlalchemy.engine import make_url

        url = make_url(server)
        self._conninfo = {"host": url.host, "port": url.port or 5432, "user": url.username,
                          "dbname": url.database, "password": url.password, "autocommit": True,
                          "connect_timeout": 5}
        self.name = f"chaos_{secrets.token_hex(5)}"
        try:
            with psycopg.connect(**self._conninfo) as connection:
                connection.execute(f'CREATE SCHEMA "{self.name}"')
        except psycopg.Error as exc:
            raise BenchError(f"PostgreSQL at {url.render_as_string(hide_password=True)} is unreachable: {exc}") from exc
        self.url = f"{server}?options=-csearch_path%3D{self.name}"

    def drop(self) -> None:
        import psycopg

        with psycopg.connect(**self._conninfo) as connection:
            connection.execute(f'DROP SCHEMA IF EXISTS "{self.name}" CASCADE')


class Proc:
    """One ``pacs-node`` subprocess (``serve`` or ``worker``) with its log file."""

    def __init__(self, args: list[str], config: Path, log: Path) -> None:
        self.args, self.config, self.log = args, config, log
        self.popen: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    def has_worked(self) -> bool:
        """Whether this incarnation has finished at least one job (so each life makes progress)."""
        try:
            with open(self.log, "rb") as log:
                log.seek(self._log_offset)
                return b" done: " in log.read()
        except FileNotFoundError:
            return False

    def start(self) -> Proc:
        self._log_offset = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as log:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "pacs_node", "--config", str(self.config), *self.args],
                cwd=self.config.parent, stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONPATH": str(REPO)},
            )
        return self

    def kill9(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait()

    def stop(self, timeout: float = 20.0) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        self.popen.terminate()
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill9()


def wait_port(port: int, proc: Proc, timeout: float = 90.0) -> None:
    """``bench.common.wait_for_port`` for a :class:`Proc`, pointing at its log when it fails."""
    try:
        wait_for_port(port, proc.popen, timeout)
    except BenchError as exc:
        raise BenchError(f"{proc.args[0]}: {exc}; see {proc.log}") from exc


def config_text(work: Path, db_url: str, port: int, receiver_port: int, pipeline: str) -> str:
    return f"""
[node]
ae_title = "PACSNODE"
port = {port}
bind = "127.0.0.1"
data_dir = "{work / 'var'}"
[database]
url = "{db_url}"
[store]
path = "{work / 'store'}"
min_free_bytes = 0
[pipeline]
bundle = "{pipeline}"
batch_size = 2
max_batch_latency_s = 0.05
device = "cpu"
[worker]
count = 0
lease_seconds = 10
poll_interval_s = 0.1
max_attempts = 50
[studies]
settle_s = 0                   # every image is its own study here: no need to wait for more
[export]
retries = 50
timeout_s = 10
[routing]
default = "none"
always = ["receiver"]
[peers.receiver]
ae_title = "RECEIVER"
host = "127.0.0.1"
port = {receiver_port}
[retention]
interval_s = 1
[http]
port = 0
"""


class Sender(threading.Thread):
    """A modality: sends its files ``batch`` per association, and resends what was not acknowledged when
    an association broke, until everything is acknowledged or ``deadline``. ``acked`` grows as the
    responses arrive (``storescu -v`` is read line by line), so the chaos loop can act mid-stream."""

    def __init__(self, name: str, files: list[Path], port: int, log: Path, deadline: float, batch: int) -> None:
        super().__init__(name=name, daemon=True)
        self.files, self.port, self.log, self.deadline, self.batch = files, port, log, deadline, batch
        self.acked: set[Path] = set()
        self.rounds = 0
        self.error: str | None = None

    def run(self) -> None:
        storescu = dcmtk("storescu")
        while len(self.acked) < len(self.files) and time.monotonic() < self.deadline:
            todo = [path for path in self.files if path not in self.acked][: self.batch]
            self.rounds += 1
            with open(self.log, "a") as log, subprocess.Popen(
                [storescu, "-v", "-aet", self.name, "-aec", "PACSNODE", "-to", "20", "-ta", "20", "-td", "20",
                 "127.0.0.1", str(self.port), *map(str, todo)],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            ) as proc:
                assert proc.stdout is not None
                current: Path | None = None
                for line in proc.stdout:
                    log.write(line)
                    current = _track(line, current, self.acked)
                code = proc.wait()
            if code != 0:
                time.sleep(0.5)  # the listener is down or restarting: try again shortly
        if len(self.acked) < len(self.files):
            self.error = f"{len(self.files) - len(self.acked)} file(s) never acknowledged"


def _track(line: str, current: Path | None, acked: set[Path]) -> Path | None:
    """Follow ``storescu -v`` output: a file is acknowledged when a success response follows its send."""
    if match := _SENT.search(line):
        return Path(match["path"].strip())
    if (match := _RESPONSE.search(line)) and current is not None:
        if match["status"].strip() == "Success":
            acked.add(current)
        return None
    return current


class Chaos(threading.Thread):
    """While ``busy()``: kills a random worker every few seconds (one that has finished a job since its
    last start, so every life makes progress) and restarts it, and kills the listener once when ``progress()`` reaches
    ``listener_kill_at`` of ``total`` (restarted a second later)."""

    def __init__(self, workers: list[Proc], listener: Proc, port: int, progress: Any, busy: Any, total: int,
                 options: ChaosOptions) -> None:
        super().__init__(name="chaos", daemon=True)
        self.workers, self.listener, self.port = workers, listener, port
        self.progress, self.busy, self.total, self.options = progress, busy, total, options
        self.rng = random.Random(options.seed)
        self.stop_event = threading.Event()
        self.worker_kills = self.listener_kills = 0
        self.error: str | None = None

    def run(self) -> None:
        next_kill = time.monotonic() + self.rng.uniform(*self.options.kill_every_s)
        try:
            while not self.stop_event.wait(0.05) and self.busy():
                if not self.listener_kills and self.progress() >= self.options.listener_kill_at * self.total:
                    self.listener.kill9()
                    self.listener_kills += 1
                    time.sleep(1.0)
                    self.listener.start()
                    wait_port(self.port, self.listener)
                if time.monotonic() < next_kill:
                    continue
                working = [w for w in self.workers if w.has_worked()]
                if working:
                    victim = self.rng.choice(working)
                    victim.kill9()
                    self.worker_kills += 1
                    victim.start()
                    next_kill = time.monotonic() + self.rng.uniform(*self.options.kill_every_s)
        except BenchError as exc:
            self.error = str(exc)


# -- the run ------------------------------------------------------------------------------------------


def _db_counts(db_url: str) -> dict[str, Any]:
    from sqlalchemy import create_engine, func, select

    from storage.schema import Instance, Job

    engine = create_engine(db_url)
    try:
        with engine.connect() as connection:
            jobs = connection.execute(select(Job.kind, Job.state, func.count()).group_by(Job.kind, Job.state)).all()
            received = connection.execute(
                select(Instance.sop_instance_uid, Instance.path, Instance.size_bytes)
                .where(Instance.origin == "received")).all()
            results = connection.execute(
                select(Instance.sop_instance_uid, Instance.source_sop_instance_uid)
                .where(Instance.origin == "result")).all()
            analyse = connection.execute(select(Job.sop_instance_uid, Job.attempts).where(Job.kind == "analyse")).all()
            exports = connection.execute(select(Job.sop_instance_uid).where(Job.kind == "export")).all()
    finally:
        engine.dispose()
    return {"jobs": jobs, "received": received, "results": results, "analyse": analyse, "exports": exports}


def _drained(db_url: str) -> bool:
    jobs = _db_counts(db_url)["jobs"]
    return bool(jobs) and all(state in ("done", "dead", "cancelled") for _, state, _ in jobs)


class _Poll:
    """``drained()`` at most once a second (the chaos loop asks far more often)."""

    def __init__(self, db_url: str) -> None:
        self.db_url, self._at, self._value = db_url, 0.0, False

    def drained(self) -> bool:
        if time.monotonic() - self._at >= 1.0:
            self._value, self._at = _drained(self.db_url), time.monotonic()
        return self._value


def run(options: ChaosOptions, work: Path) -> ChaosReport:
    """One chaos run in ``work`` (left behind for inspection); the schema is dropped afterwards."""
    report = ChaosReport(options=asdict(options))
    started = time.monotonic()
    schema = PgSchema(options.pg_server)
    procs: list[Proc] = []
    receiver: subprocess.Popen[bytes] | None = None
    try:
        port, receiver_port = free_port(), free_port()
        while receiver_port == port:
            receiver_port = free_port()
        received_dir = work / "received"
        received_dir.mkdir(parents=True)
        receiver = subprocess.Popen([dcmtk("storescp"), "-aet", "RECEIVER", "+uf", "-od", str(received_dir),
                                     str(receiver_port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        config = work / "pacs-node.toml"
        config.write_text(config_text(work, schema.url, port, receiver_port, options.pipeline))
        upgrade = subprocess.run([sys.executable, "-m", "pacs_node", "--config", str(config), "db", "upgrade"],
                                 check=False, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        if upgrade.returncode != 0:
            raise BenchError(f"db upgrade failed: {upgrade.stderr}")
        files = {f"SENDER{k}": make_images(work / "in" / f"s{k}", options.images, options.seed * 100 + k)
                 for k in range(options.senders)}
        total = options.senders * options.images

        listener = Proc(["serve"], config, work / "serve.log").start()
        procs.append(listener)
        workers = [Proc(["worker"], config, work / f"worker{i}.log").start() for i in range(options.workers)]
        procs += workers
        wait_port(port, listener)

        deadline = time.monotonic() + options.timeout_s
        senders = [Sender(name, paths, port, work / f"{name.lower()}.log", deadline, options.batch)
                   for name, paths in files.items()]
        poll = _Poll(schema.url)

        def busy() -> bool:
            return time.monotonic() < deadline and (any(s.is_alive() for s in senders) or not poll.drained())

        chaos = Chaos(workers, listener, port, lambda: sum(len(s.acked) for s in senders), busy, total, options)
        send_started = time.monotonic()
        for sender in senders:
            sender.start()
        chaos.start()
        for sender in senders:
            sender.join()
        report.seconds_sending = time.monotonic() - send_started
        chaos.join()  # it stops by itself once the queue has drained (or at the deadline)
        if listener.popen is None or listener.popen.poll() is not None:
            listener.start()
            wait_port(port, listener)
        for worker in workers:
            if worker.popen is None or worker.popen.poll() is not None:
                worker.start()
        report.worker_kills, report.listener_kills = chaos.worker_kills, chaos.listener_kills
        report.send_rounds = sum(s.rounds for s in senders)
        report.failures += [f"{s.name}: {s.error}" for s in senders if s.error]
        if chaos.error:
            report.failures.append(f"chaos: {chaos.error}")

        while time.monotonic() < deadline and not _drained(schema.url):  # the exports after the last kill
            time.sleep(1.0)
        for proc in procs:
            proc.stop()
        _verify(report, schema.url, work, senders, received_dir)
        doctor = subprocess.run(
            [sys.executable, "-m", "pacs_node", "--config", str(config), "doctor", "--grace", "0s", "--json"],
            check=False, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        report.doctor_ok = doctor.returncode == 0
        if not report.doctor_ok:
            report.failures.append(f"doctor found problems after the run: {doctor.stdout.strip()[:2000]}")
    finally:
        for proc in procs:
            proc.stop()
        if receiver is not None:
            receiver.terminate()
            receiver.wait(10)
        schema.drop()
    report.seconds_total = time.monotonic() - started
    return report


def _verify(report: ChaosReport, db_url: str, work: Path, senders: list[Sender], received_dir: Path) -> None:
    from storage.store import InstanceStore

    fail = report.failures.append
    acked_uids = {str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
                  for sender in senders for path in sender.acked}
    report.acknowledged = len(acked_uids)
    db = _db_counts(db_url)
    store = InstanceStore(work / "store")
    received = {uid: (path, size) for uid, path, size in db["received"]}
    report.received_rows = len(db["received"])
    if missing := acked_uids - received.keys():
        fail(f"{len(missing)} acknowledged instance(s) not recorded, e.g. {sorted(missing)[:3]}")
    for uid in acked_uids & received.keys():
        path, size = received[uid]
        file = store.path(path)
        if not file.is_file() or file.stat().st_size != size:
            fail(f"instance {uid}: file {path} missing or not {size} bytes")
    states: Counter[str] = Counter()
    for kind, state, count in db["jobs"]:
        if kind == "analyse":
            report.analyse_jobs[state] = report.analyse_jobs.get(state, 0) + count
        else:
            report.export_jobs[state] = report.export_jobs.get(state, 0) + count
        states[kind] += count
    analysed = Counter(uid for uid, _ in db["analyse"])
    report.analyse_attempts_max = max((attempts for _, attempts in db["analyse"]), default=0)
    if analysed.keys() != received.keys() or any(n != 1 for n in analysed.values()):
        fail("analyse jobs are not exactly one per received instance")
    if set(report.analyse_jobs) != {"done"}:
        fail(f"analyse jobs not all done: {report.analyse_jobs}")
    per_source = Counter(source for _, source in db["results"])
    report.results = len(db["results"])
    report.results_per_source = sorted(set(per_source.values()))
    if per_source.keys() != received.keys() or len(report.results_per_source) != 1:
        fail(f"result objects per source differ: {Counter(per_source.values())}, "
             f"{len(received.keys() - per_source.keys())} source(s) without results")
    result_uids = {uid for uid, _ in db["results"]}
    exported = Counter(uid for (uid,) in db["exports"])
    if exported.keys() != result_uids or any(n != 1 for n in exported.values()):
        fail("export jobs are not exactly one per result object")
    if set(report.export_jobs) != {"done"}:
        fail(f"export jobs not all done: {report.export_jobs}")
    delivered = Counter(str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
                        for path in received_dir.iterdir() if path.is_file())
    report.delivered_files = sum(delivered.values())
    report.delivered_uids = len(delivered)
    report.duplicate_deliveries = report.delivered_files - report.delivered_uids
    if delivered.keys() != result_uids:
        fail(f"receiver holds {len(delivered)} distinct result(s), the node made {len(result_uids)}; "
             f"{len(result_uids - delivered.keys())} never arrived, {len(delivered.keys() - result_uids)} unknown")


def _print_table(report: ChaosReport) -> None:
    rows = [
        ("images acknowledged", report.acknowledged),
        ("storescu rounds (incl. resends)", report.send_rounds),
        ("worker kill -9 / listener kill -9", f"{report.worker_kills} / {report.listener_kills}"),
        ("received rows", report.received_rows),
        ("analyse jobs", report.analyse_jobs),
        ("max attempts of one analyse job", report.analyse_attempts_max),
        ("result objects (per source)", f"{report.results} ({report.results_per_source})"),
        ("export jobs", report.export_jobs),
        ("files at receiver / distinct UIDs", f"{report.delivered_files} / {report.delivered_uids}"),
        ("doctor after the run", "consistent" if report.doctor_ok else "PROBLEMS"),
        ("seconds sending / total", f"{report.seconds_sending:.0f} / {report.seconds_total:.0f}"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print("OK" if report.ok else "FAILED:\n  " + "\n  ".join(report.failures))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--senders", type=int, default=3)
    parser.add_argument("--images", type=int, default=200, help="images per sender")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=10, help="images per association")
    parser.add_argument("--pipeline", default="fake", help='"fake", or a model bundle directory ("" = demo)')
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--keep", type=Path, help="run in this directory and keep it (default: a temp dir)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    # SIGTERM (a `timeout`, a CI cancel) unwinds like Ctrl-C: processes stopped, schema dropped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    options = ChaosOptions(senders=args.senders, images=args.images, workers=args.workers,
                           batch=args.batch, pipeline=args.pipeline, seed=args.seed, timeout_s=args.timeout)
    try:
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
            report = run(options, args.keep)
        else:
            with tempfile.TemporaryDirectory(prefix="pacs-chaos-") as tmp:
                report = run(options, Path(tmp))
    except BenchError as exc:
        print(f"chaos: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({**asdict(report), "ok": report.ok}, indent=2))
    else:
        _print_table(report)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
