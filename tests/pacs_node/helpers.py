"""Helpers for the node's tests: DCMTK tools, generated radiographs, a ``pacs-node serve`` subprocess,
a DCMTK ``storescp`` receiver, a pynetdicom requestor, and the CLI with ``--json``."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from bench.common import stop_process, wait_for_port
from pacs_node.dicom.transport import NoDelayAE
from tests.support import REPO, dcmtk, free_port


def make_cr(path: Path, *, modality: str = "CR", body_part: str | None = "CHEST", rows: int = 64,
            cols: int = 64, study_uid: str | None = None, seed: int = 0,
            sop_class: str = "1.2.840.10008.5.1.4.1.1.1") -> pydicom.Dataset:
    """A small synthetic radiograph (uncompressed, MONOCHROME2, 12 bits) written to ``path``."""
    rng = np.random.default_rng(seed)
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "Synthetic^Phantom"
    ds.PatientID = f"SYN{seed:05d}"
    ds.StudyDate, ds.StudyTime = "20260101", "120000"
    ds.AccessionNumber = f"A{seed:05d}"
    ds.Modality = modality
    if body_part is not None:
        ds.BodyPartExamined = body_part
    ds.StudyDescription = "Synthetic test image"
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = rng.integers(0, 4096, size=(rows, cols), dtype=np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return ds


def requestor(ae_title: str) -> NoDelayAE:
    """A pynetdicom AE for a test's modality or PACS that requests associations of a node running in
    this process.

    Stock pynetdicom's ``send_c_*`` can lose its response to its own association's reactor when the answer
    comes back fast: it reads a stale "reactor paused", and the reactor takes the response ("Received
    unexpected C-ECHO service message", then a DIMSE timeout). A node answering with TCP_NODELAY on
    loopback is fast enough for that to happen now and then (once in a CI run). The node's own requestor
    AE closes the window (:class:`pacs_node.dicom.transport.ResponseKeepingDIMSE`)."""
    return NoDelayAE(ae_title=ae_title)


def write_config(directory: Path, text: str) -> Path:
    path = directory / "pacs-node.toml"
    path.write_text(text)
    return path


def base_config(data_dir: Path, port: int, http_port: int, *, extra: str = "", poll_interval_s: float = 0.1,
                settle_s: float = 0.3) -> str:
    return f"""
[node]
ae_title = "PACSNODE"
port = {port}
bind = "127.0.0.1"
data_dir = "{data_dir}"
[store]
min_free_bytes = 0
[pipeline]
bundle = "fake"
max_batch_latency_s = 0.05
[worker]
count = 1
lease_seconds = 6
poll_interval_s = {poll_interval_s}
[retention]
interval_s = 1
[studies]
settle_s = {settle_s}
[http]
port = {http_port}
{extra}
"""


@dataclass
class Node:
    """A ``pacs-node serve`` subprocess with its own config and data dir."""

    directory: Path
    config: Path
    port: int
    http_port: int
    log_path: Path
    proc: subprocess.Popen | None = None
    env: dict[str, str] = field(default_factory=dict)

    def start(self) -> Node:
        log = open(self.log_path, "ab")  # noqa: SIM115 (closed with the process)
        env = {**os.environ, "PYTHONPATH": str(REPO), **self.env}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pacs_node", "--config", str(self.config), "serve"],
            cwd=self.directory, stdout=log, stderr=subprocess.STDOUT, env=env,
        )
        log.close()
        wait_for_port(self.port, proc=self.proc, timeout=60)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout=20)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "PYTHONPATH": str(REPO), **self.env}
        result = subprocess.run(
            [sys.executable, "-m", "pacs_node", "--config", str(self.config), *args],
            cwd=self.directory, capture_output=True, text=True, env=env, timeout=120,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"pacs-node {' '.join(args)} -> {result.returncode}\n{result.stdout}\n{result.stderr}")
        return result

    def cli_json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--json").stdout)

    @property
    def database(self) -> Path:
        return self.directory / "var" / "node.sqlite3"

    def query(self, sql: str, *params: Any) -> list[dict[str, Any]]:
        """Read the node's SQLite database directly (cheaper than a CLI process per poll)."""
        with contextlib.closing(sqlite3.connect(f"file:{self.database}?mode=ro", uri=True, timeout=30)) as db:
            db.row_factory = sqlite3.Row
            return [dict(row) for row in db.execute(sql, params)]

    def wait_jobs(self, predicate, timeout: float = 90.0) -> list[dict[str, Any]]:  # noqa: ANN001
        """Poll the jobs table until ``predicate(jobs)`` holds; returns the jobs (newest first, as
        ``queue ls --json`` lists them)."""
        deadline = time.monotonic() + timeout
        jobs: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            if self.database.exists():
                jobs = self.query("SELECT * FROM jobs ORDER BY id DESC")
                if predicate(jobs):
                    return jobs
                dead = [j for j in jobs if j["state"] == "dead"]
                if dead:  # will never be done: fail now, with the reason
                    raise AssertionError(f"job {dead[0]['id']} is dead: {dead[0]['last_error']}\n"
                                         f"--- node log ---\n{self.log()[-5000:]}")
            time.sleep(0.3)
        raise AssertionError(f"jobs never reached the expected state: {jobs}\n--- node log ---\n{self.log()[-5000:]}")


@dataclass
class StoreSCP:
    """DCMTK ``storescp`` writing what it receives to ``directory``."""

    directory: Path
    port: int
    ae_title: str = "RECEIVER"
    proc: subprocess.Popen | None = None

    def start(self, *extra: str) -> StoreSCP:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [dcmtk("storescp"), "-aet", self.ae_title, "-od", str(self.directory), *extra, str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, timeout=20, proc=self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout=5)

    def received(self) -> list[pydicom.Dataset]:
        return [pydicom.dcmread(p) for p in sorted(self.directory.iterdir()) if p.is_file()]


def storescu(port: int, files: list[Path], *options: str, calling: str = "MODALITY",
             timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [dcmtk("storescu"), "-aet", calling, "-aec", "PACSNODE", *options, "127.0.0.1", str(port),
         *map(str, files)],
        capture_output=True, text=True, timeout=timeout,
    )


def echoscu(port: int, calling: str = "MODALITY") -> subprocess.CompletedProcess[str]:
    return subprocess.run([dcmtk("echoscu"), "-aet", calling, "-aec", "PACSNODE", "127.0.0.1", str(port)],
                          capture_output=True, text=True, timeout=30)


def new_ports() -> tuple[int, int, int]:
    """Three distinct free loopback ports (listener, HTTP, receiver)."""
    ports: set[int] = set()
    while len(ports) < 3:
        ports.add(free_port())
    return tuple(ports)  # type: ignore[return-value]


@contextlib.contextmanager
def running_listener(settings: Any) -> Iterator[Any]:
    """The node's listener in this process, on its own ServerContext, for as long as the block runs;
    yields the context (its store, sessions, queue)."""
    from pacs_node.dicom.server import Listener
    from pacs_node.ops.context import ServerContext

    runtime = ServerContext.open(settings)
    listener = Listener(settings, runtime)
    listener.start()
    try:
        yield runtime
    finally:
        listener.stop()
        runtime.close()
