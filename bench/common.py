"""Helpers the benchmarks share: DCMTK programs, loopback ports, a ``pacs-node serve`` subprocess, a DCMTK
``storescp``, chest-sized test images cached between runs, and the JSON-line-plus-table output.

Benchmarks run the node exactly as a site would (``python -m pacs_node serve`` with a TOML file), so
what they measure includes process start-up costs nowhere and the real listener everywhere.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, Self

REPO = Path(__file__).resolve().parents[1]
#: Where generated inputs are cached between runs (regenerating 40 chest-sized phantoms takes minutes).
CACHE = Path(tempfile.gettempdir()) / "pacs-node-bench"


class BenchError(RuntimeError):
    """The benchmark cannot run here (a tool is missing, a process died); the message says why."""


# -- external programs ------------------------------------------------------------------------------


@functools.cache
def dcmtk(name: str) -> str:
    """Path of DCMTK's ``name``. pynetdicom installs console scripts called storescu/storescp too, so the
    first one on ``PATH`` is not necessarily DCMTK's: ask each candidate for its version, Debian's
    ``/usr/bin`` first (asking a pynetdicom script starts a Python interpreter: seconds)."""
    for directory in ["/usr/bin", *os.environ.get("PATH", "").split(os.pathsep)]:
        candidate = Path(directory) / name
        if not (candidate.is_file() and os.access(candidate, os.X_OK)):
            continue
        try:
            out = subprocess.run([str(candidate), "--version"], capture_output=True, text=True, timeout=10,
                                 check=False)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if "dcmtk" in (out.stdout + out.stderr).lower():
            return str(candidate)
    raise BenchError(f"DCMTK {name} is not installed (apt-get install dcmtk)")


def dcmtk_env() -> dict[str, str]:
    """The environment DCMTK programs run in: ``TCP_NODELAY=1``, without which DCMTK leaves Nagle's
    algorithm on and every small message waits for a delayed ACK (~11 tiny instances/s instead of
    ~1,200): the setting a fair comparison of message rates needs."""
    return {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"process {proc.pid} exited with {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise BenchError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f}s")


def stop_process(proc: subprocess.Popen | None, timeout: float = 30.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout``; always reaps the child."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# -- receivers ------------------------------------------------------------------------------------


@dataclass
class StoreSCP:
    """DCMTK ``storescp`` writing to ``directory``; ``fork`` serves concurrent associations (one process
    each), as the single-process default would serialise them."""

    directory: Path
    port: int = field(default_factory=free_port)
    ae_title: str = "STORESCP"
    fork: bool = False
    extra: Sequence[str] = ()
    proc: subprocess.Popen | None = None

    #: DCMTK's largest receive PDU: the fairest (fastest) setting for the baseline.
    MAX_PDU = 131072

    def command(self) -> list[str]:
        cmd = [dcmtk("storescp"), "-aet", self.ae_title, "-pdu", str(self.MAX_PDU), "--disable-host-lookup",
               "-od", str(self.directory)]
        if self.fork:
            cmd.append("--fork")
        return [*cmd, *self.extra, str(self.port)]

    def start(self) -> StoreSCP:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     env=dcmtk_env())
        wait_for_port(self.port, self.proc, timeout=20)
        return self

    def stop(self) -> None:
        stop_process(self.proc, timeout=10)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class Node:
    """``pacs-node serve`` with its own data directory and config; ``extra_toml`` is appended."""

    directory: Path
    extra_toml: str = ""
    ae_title: str = "PACSNODE"
    port: int = field(default_factory=free_port)
    #: The HTTP port (DICOMweb, API); 0 leaves HTTP off.
    http_port: int = 0
    proc: subprocess.Popen | None = None
    #: Extra environment (``PACS_NODE__SECTION__KEY`` overrides of the config).
    env: dict[str, str] = field(default_factory=dict)
    #: The checkout whose code runs (another one, e.g. a worktree of main, for a before/after run).
    repo: Path = REPO

    @property
    def log_path(self) -> Path:
        return self.directory / "serve.log"

    @property
    def data_dir(self) -> Path:
        return self.directory / "var"

    def config_text(self) -> str:
        return f"""\
[node]
ae_title = "{self.ae_title}"
port = {self.port}
bind = "127.0.0.1"
data_dir = "{self.data_dir}"
[store]
min_free_bytes = 0
[http]
port = {self.http_port}
{self.extra_toml}
"""

    def start(self) -> Node:
        self.directory.mkdir(parents=True, exist_ok=True)
        config = self.directory / "pacs-node.toml"
        config.write_text(self.config_text())
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(self.repo), os.environ.get("PYTHONPATH")]))}
        env.pop("PACS_NODE_CONFIG", None)
        env.update(self.env)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pacs_node", "--config", str(config), "serve"],
                cwd=self.directory, stdout=log, stderr=subprocess.STDOUT, env=env,
            )
        try:
            wait_for_port(self.port, self.proc)
            if self.http_port:
                wait_for_port(self.http_port, self.proc)
        except BenchError as exc:
            raise BenchError(f"{exc}\n--- {self.log_path} ---\n{self.log_tail()}") from exc
        return self

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        stop_process(self.proc)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def storescu_command(port: int, files: Sequence[Path], called: str, calling: str = "BENCHSCU") -> list[str]:
    """One DCMTK ``storescu`` association sending ``files`` uncompressed (explicit VR little endian)."""
    return [dcmtk("storescu"), "-aet", calling, "-aec", called, "-pdu", str(StoreSCP.MAX_PDU),
            "127.0.0.1", str(port), *map(str, files)]


# -- inputs ---------------------------------------------------------------------------------------


def chest_image_files(count: int, rows: int, cols: int, *, cache: Path = CACHE, first: int = 0) -> list[Path]:
    """``count`` uncompressed 16-bit chest radiographs of ``rows`` x ``cols``, each its own study, made
    once from one phantom and cached under ``cache`` (the pixels are a phantom's, cropped or padded to
    the requested width; only the UIDs differ between files). Image ``i`` always has the same UIDs;
    ``first`` picks where the numbering starts, so two benchmarks can use disjoint sets."""
    directory = cache / f"chest-{rows}x{cols}"
    indices = range(first, first + count)
    files = [directory / f"{i:05d}.dcm" for i in indices]
    if all(f.is_file() for f in files):
        return files
    import numpy as np
    from pydicom.uid import generate_uid

    from pipelines.phantoms.dicom import phantom_dataset

    directory.mkdir(parents=True, exist_ok=True)
    ds = phantom_dataset(0, rows, bits_stored=16)
    pixels = np.frombuffer(ds.PixelData, dtype=np.uint16).reshape(ds.Rows, ds.Columns)
    fitted = np.zeros((rows, cols), dtype=np.uint16)
    width = min(cols, pixels.shape[1])
    fitted[:, :width] = pixels[:, :width]
    ds.Rows, ds.Columns = rows, cols
    ds.PixelData = fitted.tobytes()
    for i, path in zip(indices, files):
        if path.is_file():
            continue
        ds.StudyInstanceUID = generate_uid(entropy_srcs=["bench-study", str(rows), str(cols), str(i)])
        ds.SeriesInstanceUID = generate_uid(entropy_srcs=["bench-series", str(rows), str(cols), str(i)])
        ds.SOPInstanceUID = generate_uid(entropy_srcs=["bench-sop", str(rows), str(cols), str(i)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.AccessionNumber = f"BENCH{i}"[:16]
        ds.InstanceNumber = i + 1
        partial = path.with_suffix(".part")
        ds.save_as(partial, enforce_file_format=True)
        os.replace(partial, path)
    return files


# -- output ---------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """The device the figures were measured on, in words and numbers."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "python": platform.python_version(),
            # others share this machine: the load says how far its absolute figures can be trusted
            "load_average_1m": round(os.getloadavg()[0], 2)}


def device_words(info: dict[str, Any]) -> str:
    return f"{info['cores']}-core CPU ({info['cpu']})" + (f", GPU {info['gpu']}" if info["gpu"] else ", no GPU")


def run_bench(main: Callable[[], int], name: str) -> NoReturn:
    """A benchmark module's entry point: exit with ``main()``'s code, or with 2 and the reason when the
    benchmark cannot run here (:class:`BenchError`)."""
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"bench.{name}: {exc}", file=sys.stderr)
        sys.exit(2)


def emit(result: dict[str, Any], headers: Sequence[str], rows: Sequence[Sequence[Any]], *, title: str) -> None:
    """The JSON line first (for machines), then a table (for people), both on stdout."""
    print(json.dumps(result, sort_keys=True), flush=True)
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    sys.stdout.flush()


def files_under(root: Path) -> int:
    """Committed files under ``root``, ignoring dot directories (the node's temp area)."""
    total = 0
    for _dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        total += len(filenames)
    return total


def fresh_dir(parent: Path, name: str) -> Path:
    """An empty directory ``parent/name`` (removed first if a previous run left it)."""
    path = parent / name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


# -- CPU accounting -------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> tuple[float, float]:
    """CPU seconds (user + system) used so far by process ``pid`` itself and by all its descendants alive
    now, from ``/proc`` (Linux): where a node spends its CPU per image, the listener's process or its
    workers'. (0, 0) where ``/proc`` is not there."""
    tick = os.sysconf("SC_CLK_TCK")

    def own(p: int) -> float:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / tick  # utime, stime (fields 14, 15 of stat)

    def children(p: int) -> list[int]:
        kids: list[int] = []
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
        return kids

    if not Path(f"/proc/{pid}").exists():
        return 0.0, 0.0
    descendants, todo = 0.0, children(pid)
    while todo:
        p = todo.pop()
        descendants += own(p)
        todo += children(p)
    return own(pid), descendants
