"""Query/retrieve at scale: C-FIND with ``--count`` matches and C-MOVE of ``--count`` instances, the node
side by side with DCMTK's ``dcmqrscp`` in the same run.

Both archives get the same ``--count`` tiny instances (64 x 48, one study and series: ``dcmqrscp``
keeps at most 500 studies per archive) by C-STORE from DCMTK ``storescu`` (not timed). Then, per
archive and ``--repeat`` times, alternating:

* C-FIND: DCMTK ``findscu``, Study Root, IMAGE level within the series: ``--count`` matches. Seconds
  from the request to the last response (the process's wall time, start-up included).
* C-MOVE: DCMTK ``movescu``, Study Root, STUDY level, to a DCMTK ``storescp``: ``--count``
  sub-operations on one association. Instances/s = count / wall seconds of ``movescu``.
* C-GET: DCMTK ``getscu``, Study Root, STUDY level: ``--count`` C-STOREs back over the requesting
  association. Instances/s = count / wall seconds of ``getscu``.

For the node, the CPU seconds its ``serve`` process spent on each operation are reported too (on a
machine others share, the steadier figure to compare two versions of the node by). Every DCMTK program
runs with ``TCP_NODELAY=1``. Prints one JSON line, then a table.

    python -m bench.qr --count 1000
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from pydicom import dcmread
from pydicom.uid import generate_uid

from bench.common import (
    CACHE,
    BenchError,
    Node,
    StoreSCP,
    chest_image_files,
    cpu_seconds,
    dcmtk,
    dcmtk_env,
    device_words,
    emit,
    free_port,
    fresh_dir,
    machine,
    run_bench,
    stop_process,
    storescu_command,
    wait_for_port,
)

MOVE_AE = "MOVEDEST"
STUDY_UID = generate_uid(entropy_srcs=["bench-qr-study"])
SERIES_UID = generate_uid(entropy_srcs=["bench-qr-series"])


def series_files(count: int, cache: Path) -> list[Path]:
    """``count`` tiny instances of one study and series, made once from the ingest benchmark's tiny
    phantom and cached."""
    directory = cache / "qr-64x48"
    files = [directory / f"{i:05d}.dcm" for i in range(count)]
    missing = [(i, f) for i, f in enumerate(files) if not f.is_file()]
    if missing:
        directory.mkdir(parents=True, exist_ok=True)
        ds = dcmread(chest_image_files(1, 64, 48, cache=cache)[0])
        ds.StudyInstanceUID, ds.SeriesInstanceUID = STUDY_UID, SERIES_UID
        for i, path in missing:
            ds.SOPInstanceUID = generate_uid(entropy_srcs=["bench-qr-sop", str(i)])
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.InstanceNumber = i + 1
            partial = path.with_suffix(".part")
            ds.save_as(partial, enforce_file_format=True)
            os.replace(partial, path)
    return files


@dataclass
class DcmQrScp:
    """DCMTK ``dcmqrscp`` with its own index under ``directory``; C-MOVE knows ``MOVEDEST`` only."""

    directory: Path
    move_port: int
    port: int = field(default_factory=free_port)
    ae_title: str = "DCMQRSCP"
    proc: subprocess.Popen | None = None

    def start(self) -> Self:
        db = self.directory / "db"
        db.mkdir(parents=True, exist_ok=True)
        config = self.directory / "dcmqrscp.cfg"
        config.write_text(f"""\
NetworkTCPPort = {self.port}
MaxPDUSize = 131072
MaxAssociations = 16
HostTable BEGIN
movedest = ({MOVE_AE}, 127.0.0.1, {self.move_port})
HostTable END
VendorTable BEGIN
VendorTable END
AETable BEGIN
{self.ae_title} {db} RW (100000, 4096mb) ANY
AETable END
""")
        with open(self.directory / "dcmqrscp.log", "ab") as log:
            self.proc = subprocess.Popen([dcmtk("dcmqrscp"), "-v", "-c", str(config), str(self.port)],
                                         stdout=log, stderr=subprocess.STDOUT, env=dcmtk_env())
        wait_for_port(self.port, self.proc, timeout=20)
        return self

    def stop(self) -> None:
        stop_process(self.proc, timeout=10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _run(cmd: list[str], what: str) -> float:
    start = time.monotonic()
    result = subprocess.run(cmd, capture_output=True, env=dcmtk_env(), check=False)
    seconds = time.monotonic() - start
    if result.returncode != 0:
        raise BenchError(f"{what} failed ({result.returncode}): {cmd[-2:]}\n{result.stderr.decode(errors='replace')[-2000:]}")
    return seconds


def populate(port: int, called: str, files: list[Path], senders: int) -> None:
    procs = [subprocess.Popen(storescu_command(port, files[i::senders], called), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, env=dcmtk_env()) for i in range(min(senders, len(files)))]
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise BenchError(f"storescu into {called} failed:\n{err.decode(errors='replace')[-2000:]}")


def find_seconds(port: int, called: str, out: Path, expected: int) -> float:
    """Wall seconds of one IMAGE-level C-FIND; checks that it answered ``expected`` matches."""
    out = fresh_dir(out.parent, out.name)
    seconds = _run([dcmtk("findscu"), "-S", "-aet", "BENCHQR", "-aec", called, "-X", "-od", str(out),
                    "-k", "QueryRetrieveLevel=IMAGE", "-k", f"StudyInstanceUID={STUDY_UID}",
                    "-k", f"SeriesInstanceUID={SERIES_UID}", "-k", "SOPInstanceUID", "-k", "SOPClassUID",
                    "-k", "InstanceNumber", "127.0.0.1", str(port)], "findscu")
    answered = len(list(out.iterdir()))
    if answered != expected:
        raise BenchError(f"C-FIND to {called} answered {answered} matches, expected {expected}")
    return seconds


def move_seconds(port: int, called: str, receiver: Path, expected: int) -> float:
    """Wall seconds of one STUDY-level C-MOVE of the study to the receiver writing to ``receiver``."""
    seconds = _run([dcmtk("movescu"), "-S", "-aet", "BENCHQR", "-aec", called, "-aem", MOVE_AE,
                    "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={STUDY_UID}",
                    "127.0.0.1", str(port)], "movescu")
    moved = sum(1 for p in receiver.rglob("*") if p.is_file())
    if moved != expected:
        raise BenchError(f"C-MOVE from {called} delivered {moved} instances, expected {expected}")
    return seconds


def get_seconds(port: int, called: str, out: Path, expected: int) -> float:
    """Wall seconds of one STUDY-level C-GET of the study into ``out``."""
    out = fresh_dir(out.parent, out.name)
    seconds = _run([dcmtk("getscu"), "-S", "-aet", "BENCHQR", "-aec", called, "-od", str(out),
                    "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={STUDY_UID}",
                    "127.0.0.1", str(port)], "getscu")
    got = sum(1 for p in out.iterdir() if p.is_file())
    if got != expected:
        raise BenchError(f"C-GET from {called} delivered {got} instances, expected {expected}")
    return seconds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=1000, help="instances (= studies = C-FIND matches), default 1000")
    p.add_argument("--repeat", type=int, default=3, help="C-FIND and C-MOVE runs per archive; medians reported")
    p.add_argument("--workdir", type=Path, default=CACHE / "qr-run", help="where the archives live; emptied")
    p.add_argument("--cache", type=Path, default=CACHE, help="where generated inputs are kept between runs")
    args = p.parse_args(argv)
    if args.count < 1 or args.repeat < 1:
        p.error("--count and --repeat must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    files = series_files(args.count, args.cache)
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    receiver_dir = fresh_dir(work, "received")
    operations = ("find", "move", "get")
    times: dict[str, dict[str, list[float]]] = {name: {op: [] for op in operations} for name in ("node", "dcmqrscp")}
    node_cpu: dict[str, list[float]] = {op: [] for op in operations}
    with StoreSCP(receiver_dir, ae_title=MOVE_AE) as receiver:
        node = Node(fresh_dir(work, "node"), f"""\
[pipeline]
bundle = "fake"
[worker]
count = 0
[[allowed_callers]]
ae_title = "BENCHQR"
[[allowed_callers]]
ae_title = "BENCHSCU"
services = ["store"]
[peers.movedest]
ae_title = "{MOVE_AE}"
host = "127.0.0.1"
port = {receiver.port}
""")
        with node, DcmQrScp(fresh_dir(work, "dcmqrscp"), receiver.port) as qrscp:
            archives = {"node": (node.port, node.ae_title), "dcmqrscp": (qrscp.port, qrscp.ae_title)}
            populate(node.port, node.ae_title, files, senders=4)
            populate(qrscp.port, qrscp.ae_title, files, senders=1)  # its index is one file, locked
            assert node.proc is not None
            for _ in range(args.repeat):
                for name, (port, called) in archives.items():  # alternate, so load drifts hit both
                    runs = {"find": lambda: find_seconds(port, called, work / "found", args.count),
                            "move": lambda: move_seconds(port, called, fresh_dir(work, "received"), args.count),
                            "get": lambda: get_seconds(port, called, work / "got", args.count)}
                    for op in operations:
                        cpu_before = cpu_seconds(node.proc.pid)[0]
                        times[name][op].append(runs[op]())
                        if name == "node":
                            node_cpu[op].append(cpu_seconds(node.proc.pid)[0] - cpu_before)
    for name in ("node", "dcmqrscp", "found", "received", "got"):
        fresh_dir(work, name)

    figures = {name: {f"{op}_s": statistics.median(t[op]) for op in operations} for name, t in times.items()}
    for f in figures.values():
        f["move_instances_s"] = args.count / f["move_s"]
        f["get_instances_s"] = args.count / f["get_s"]
    figures["node"].update({f"{op}_cpu_s": statistics.median(node_cpu[op]) for op in operations})
    node, dcm = figures["node"], figures["dcmqrscp"]
    info = machine()
    result = {
        "bench": "qr",
        "device": device_words(info),
        "machine": info,
        "count": args.count,
        "repeat": args.repeat,
        "results": {name: {k: round(v, 3) for k, v in f.items()} for name, f in figures.items()},
        "runs": times,
        "node_cpu_runs": node_cpu,
        "ratios": {"node_find_s_vs_dcmqrscp": round(node["find_s"] / dcm["find_s"], 3),
                   "node_move_rate_vs_dcmqrscp": round(node["move_instances_s"] / dcm["move_instances_s"], 3),
                   "node_get_rate_vs_dcmqrscp": round(node["get_instances_s"] / dcm["get_instances_s"], 3)},
        "goals": {f"find_{args.count}_matches_within_1_s": node["find_s"] <= 1.0,
                  "move_at_least_200_instances_s": node["move_instances_s"] >= 200},
    }

    def cpu(f: dict[str, float], op: str) -> str:
        return f"{f[op + '_cpu_s']:.2f}" if op + "_cpu_s" in f else "-"

    rows = [(name, f"{f['find_s']:.3f}", cpu(f, "find"), f"{f['move_instances_s']:.1f}", cpu(f, "move"),
             f"{f['get_instances_s']:.1f}", cpu(f, "get")) for name, f in figures.items()]
    emit(result, ("archive", "C-FIND s", "CPU s", "C-MOVE images/s", "CPU s", "C-GET images/s", "CPU s"), rows,
         title=f"qr: {args.count} matches / instances (64x48) on {result['device']}; median of {args.repeat}; "
               "CPU s: the node's serve process")
    for name, value in result["ratios"].items():
        print(f"{name}: {value:.2f}")
    return 0


if __name__ == "__main__":
    run_bench(main, "qr")
