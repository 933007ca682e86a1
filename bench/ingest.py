"""Ingest benchmark: how fast the node's listener files chest radiographs, against DCMTK and the disk.

In one run, on one filesystem, with the same cached inputs (``--count`` uncompressed 16-bit images of
``--rows`` x ``--cols``):

* ``dd if=/dev/zero bs=4M conv=fsync`` of the same number of bytes: the disk's durable write bandwidth,
  the ceiling for anything that fsyncs;
* DCMTK ``storescp`` (no fsync; ``--fork`` for concurrent senders; its largest PDU);
* the node (``pacs-node serve``: SQLite, fsync of file, directory and database per instance before the
  success status; no workers, so the pipeline does not compete for the CPU);

each receiver fed by one DCMTK ``storescu`` association and by ``--senders`` concurrent ones. Prints one
JSON line and a table: images/s, MB/s (10^6 bytes of DICOM files per second of wall time from the
first association to the last acknowledgement), node/storescp and node/dd ratios.

``--tiny`` measures the per-message cost instead of bandwidth: 64 x 48 instances (``--count`` 200 unless
given), and one more phase, the node's exporter as the sender (``pacs_node.dicom.scu.send_datasets``,
the exporter's and ``pacs-node send``'s code, one association from this process) into ``storescp``.
DCMTK's programs always run with ``TCP_NODELAY=1`` (the pynetdicom ends of the node set it themselves).

    python -m bench.ingest --count 40 --rows 3000 --cols 2500
    python -m bench.ingest --tiny
"""

from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.common import (
    CACHE,
    REPO,
    BenchError,
    Node,
    StoreSCP,
    chest_image_files,
    cpu_seconds,
    dcmtk_env,
    device_words,
    emit,
    files_under,
    fresh_dir,
    machine,
    run_bench,
    storescu_command,
)

MB = 1e6
#: The node's configuration for the run: a fake pipeline and no worker processes, so nothing but the
#: listener (and its fsyncs) uses the CPU and the disk.
NODE_TOML = """\
[pipeline]
bundle = "fake"
[worker]
count = 0
"""


@dataclass
class Measurement:
    receiver: str
    senders: int
    seconds: float
    images: int
    bytes: int
    #: CPU seconds of the receiving process during the phase (the node's ``serve``; None where not
    #: measured): on a machine others load, a steadier figure of the per-message cost than the wall time.
    cpu_s: float | None = None
    #: The node's phase: how many of the associations each listener process served, largest first (the
    #: kernel spreads ``SO_REUSEPORT`` connections by a hash: 4 over 2 processes land 3:1 or 4:0 as often
    #: as 2:2, and the busiest process sets the wall time).
    associations_per_process: list[int] | None = None

    @property
    def images_s(self) -> float:
        return self.images / self.seconds

    @property
    def mb_s(self) -> float:
        return self.bytes / MB / self.seconds


def dd_fsync(directory: Path, nbytes: int) -> float:
    """Seconds ``dd conv=fsync`` takes to write at least ``nbytes`` (4 MiB blocks) into ``directory``."""
    block = 4 * 1024 * 1024
    count = max(1, math.ceil(nbytes / block))
    target = directory / "dd.bin"
    os.sync()
    start = time.monotonic()
    subprocess.run(["dd", "if=/dev/zero", f"of={target}", f"bs={block}", f"count={count}", "conv=fsync"],
                   check=True, capture_output=True)
    seconds = time.monotonic() - start
    target.unlink()
    return seconds * nbytes / (count * block)  # seconds for exactly nbytes at the measured rate


def send(port: int, called: str, files: list[Path], senders: int) -> float:
    """Wall seconds for ``senders`` concurrent storescu associations to send ``files`` (split evenly)."""
    commands = [storescu_command(port, files[i::senders], called) for i in range(min(senders, len(files)))]
    os.sync()  # start with a quiet disk: the previous phase's dirty pages are not this phase's cost
    start = time.monotonic()
    procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=dcmtk_env())
             for cmd in commands]
    errors = []
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            errors.append(err.decode(errors="replace")[-2000:])
    seconds = time.monotonic() - start
    if errors:
        raise BenchError("storescu failed:\n" + "\n".join(errors))
    return seconds


def measure_storescp(work: Path, files: list[Path], nbytes: int, senders: int) -> Measurement:
    out = fresh_dir(work, "storescp")
    with StoreSCP(out, fork=senders > 1) as scp:
        seconds = send(scp.port, scp.ae_title, files, senders)
    received = files_under(out)
    if received != len(files):
        raise BenchError(f"storescp stored {received} of {len(files)} files")
    return Measurement("storescp", senders, seconds, len(files), nbytes)


def _wait_for_listeners(node: Node, count: int, timeout: float = 180.0) -> None:
    """Until ``count`` listener processes have bound the port (the extra ones start after ``serve``)."""
    deadline = time.monotonic() + timeout
    while node.log_tail(10**7).count("pacs_node.dicom.server: listening as") < count:
        if time.monotonic() > deadline:
            raise BenchError(f"fewer than {count} listener processes after {timeout:.0f}s\n{node.log_tail()}")
        time.sleep(0.2)


def measure_node(work: Path, files: list[Path], nbytes: int, senders: int, listeners: int = 1,
                 baseline: Path | None = None) -> Measurement:
    """The node's phase; with ``baseline``, the node of that checkout (receiver ``baseline``)."""
    node = Node(fresh_dir(work, "node"), NODE_TOML, env={"PACS_NODE__NODE__LISTENER_PROCESSES": str(listeners)},
                repo=baseline or REPO)
    with node:
        assert node.proc is not None
        _wait_for_listeners(node, listeners)
        before = sum(cpu_seconds(node.proc.pid))  # serve and its extra listener processes
        seconds = send(node.port, node.ae_title, files, senders)
        cpu = sum(cpu_seconds(node.proc.pid)) - before
        spread = associations_per_process(node.log_tail(10**8))
    stored = files_under(node.data_dir / "store")
    if stored != len(files):
        raise BenchError(f"the node stored {stored} of {len(files)} files\n{node.log_tail()}")
    return Measurement("baseline" if baseline else "node", senders, seconds, len(files), nbytes, cpu_s=cpu,
                       associations_per_process=spread)


def associations_per_process(log: str) -> list[int]:
    """From a node's log: the number of associations each of its listener processes (``serve[pid]``,
    ``listen[pid]``) saw end, largest first."""
    pids = re.findall(r"(?:serve|listen)\[(\d+)\] pacs_node\.dicom\.server: association from .* ended", log)
    return sorted((pids.count(pid) for pid in set(pids)), reverse=True)


def measure_export(work: Path, files: list[Path], nbytes: int) -> Measurement:
    """The node's C-STORE SCU (what the exporter and ``pacs-node send`` run) sending ``files``, read into
    memory beforehand, on one association into ``storescp``; with the pynetdicom adjustments a running
    listener applies, as the exporter threads see them in ``serve``."""
    import pydicom

    from pacs_node.config import Peer, Settings
    from pacs_node.dicom.adjustments import apply_pynetdicom_adjustments, undo_pynetdicom_adjustments
    from pacs_node.dicom.scu import send_datasets

    datasets = [pydicom.dcmread(f) for f in files]
    out = fresh_dir(work, "export")
    settings = Settings(node={"ae_title": "BENCHNODE"})
    with StoreSCP(out) as scp:
        peer = Peer(ae_title=scp.ae_title, host="127.0.0.1", port=scp.port)
        apply_pynetdicom_adjustments()
        try:
            start, cpu = time.monotonic(), time.process_time()
            outcomes = send_datasets(settings, peer, datasets)
            seconds, cpu = time.monotonic() - start, time.process_time() - cpu
        finally:
            undo_pynetdicom_adjustments()
    failed = [o for o in outcomes if o != 0]
    if failed or files_under(out) != len(files):
        raise BenchError(f"export: {len(failed)} of {len(files)} sends failed ({failed[:3]})")
    return Measurement("export", 1, seconds, len(files), nbytes, cpu_s=cpu)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true",
                   help="per-message cost: 64 x 48 instances, 200 per phase, plus the node's exporter as sender")
    p.add_argument("--count", type=int, help="images per phase (default 40; 200 with --tiny)")
    p.add_argument("--rows", type=int, help="default 3000 (64 with --tiny)")
    p.add_argument("--cols", type=int, help="default 2500 (48 with --tiny)")
    p.add_argument("--senders", type=int, default=4, help="concurrent storescu for the parallel phase (default 4)")
    p.add_argument("--repeat", type=int, default=1, help="runs of every phase; the median is reported")
    p.add_argument("--listener-processes", type=int, default=1,
                   help="the node's node.listener_processes (SO_REUSEPORT listeners; default 1)")
    p.add_argument("--baseline", type=Path,
                   help="another checkout (e.g. a worktree of main): its node runs beside this one's in every "
                        "repeat, for a before/after comparison in one run (receiver 'baseline')")
    p.add_argument("--workdir", type=Path, default=CACHE / "ingest-run",
                   help="where the receivers write (the filesystem under test); emptied per phase")
    p.add_argument("--cache", type=Path, default=CACHE, help="where generated inputs are kept between runs")
    args = p.parse_args(argv)
    for name, chest, tiny in (("count", 40, 200), ("rows", 3000, 64), ("cols", 2500, 48)):
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else chest)
    for name in ("count", "rows", "cols", "senders", "repeat", "listener_processes"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.rows < 64:
        p.error("--rows must be >= 64 (the phantom generator's minimum)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    files = chest_image_files(args.count, args.rows, args.cols, cache=args.cache)
    nbytes = sum(f.stat().st_size for f in files)
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)

    if args.baseline is not None and not (args.baseline / "pacs_node").is_dir():
        raise BenchError(f"--baseline {args.baseline} is not a checkout of this project")
    load_before = os.getloadavg()[0]
    dd_runs: list[float] = []
    runs: dict[tuple[str, int], list[Measurement]] = {}
    sender_counts = sorted({1, args.senders})
    for repeat in range(args.repeat):
        dd_runs.append(nbytes / MB / dd_fsync(work, nbytes))
        for senders in sender_counts:
            phases = [measure_storescp(work, files, nbytes, senders)]
            # this node and the baseline take turns going first, so neither always follows the other
            turns = [None] if args.baseline is None else [None, args.baseline][:: 1 if repeat % 2 == 0 else -1]
            for baseline in turns:
                phases.append(measure_node(work, files, nbytes, senders, args.listener_processes, baseline))
            for m in phases:
                runs.setdefault((m.receiver, senders), []).append(m)
        if args.tiny:
            m = measure_export(work, files, nbytes)
            runs.setdefault((m.receiver, 1), []).append(m)
    for name in ("storescp", "node", "export"):
        fresh_dir(work, name)  # leave no gigabytes behind

    def median(receiver: str, senders: int) -> Measurement:
        ms = sorted(runs[(receiver, senders)], key=lambda m: m.seconds)
        return ms[len(ms) // 2]

    dd_mb_s = statistics.median(dd_runs)
    receivers = ("storescp", "node", "baseline") if args.baseline is not None else ("storescp", "node")
    results = [median(r, s) for s in sender_counts for r in receivers]
    if args.tiny:
        results.append(median("export", 1))
    by = {(m.receiver, m.senders): m for m in results}
    par = args.senders
    ratios = {
        "node_vs_storescp_1_sender": by[("node", 1)].mb_s / by[("storescp", 1)].mb_s,
        f"node_vs_storescp_{par}_senders": by[("node", par)].mb_s / by[("storescp", par)].mb_s,
        f"node_{par}_senders_vs_dd_fsync": by[("node", par)].mb_s / dd_mb_s,
        f"node_{par}_senders_vs_1_sender": by[("node", par)].mb_s / by[("node", 1)].mb_s,
    }
    if args.baseline is not None:
        ratios.update({
            "node_vs_baseline_1_sender": by[("node", 1)].mb_s / by[("baseline", 1)].mb_s,
            f"node_vs_baseline_{par}_senders": by[("node", par)].mb_s / by[("baseline", par)].mb_s,
            f"baseline_{par}_senders_vs_1_sender": by[("baseline", par)].mb_s / by[("baseline", 1)].mb_s,
            f"baseline_{par}_senders_vs_dd_fsync": by[("baseline", par)].mb_s / dd_mb_s,
        })
    if args.tiny:
        goals = {
            "node_1_sender_at_least_200_images_s": by[("node", 1)].images_s >= 200,
            "node_1_sender_at_least_0.15x_storescp": ratios["node_vs_storescp_1_sender"] >= 0.15,
            f"node_{par}_senders_at_least_500_images_s": by[("node", par)].images_s >= 500,
            "export_at_least_200_images_s": by[("export", 1)].images_s >= 200,
        }
    else:
        goals = {
            "node_1_sender_at_least_1.2x_storescp": ratios["node_vs_storescp_1_sender"] >= 1.2,
            f"node_{par}_senders_at_least_80pct_of_dd": ratios[f"node_{par}_senders_vs_dd_fsync"] >= 0.8,
            f"node_{par}_senders_at_least_1.5x_1_sender": ratios[f"node_{par}_senders_vs_1_sender"] >= 1.5,
        }
    info = machine()
    result = {
        "bench": "ingest",
        "device": device_words(info),
        "machine": info,
        "count": args.count,
        "rows": args.rows,
        "cols": args.cols,
        "total_bytes": nbytes,
        "repeat": args.repeat,
        "dd_fsync_mb_s": round(dd_mb_s, 1),
        "results": [{**asdict(m), "images_s": round(m.images_s, 2), "mb_s": round(m.mb_s, 1),
                     "cpu_ms_per_image": None if m.cpu_s is None else round(m.cpu_s / m.images * 1e3, 2)}
                    for m in results],
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
        "all_mb_s": {f"{receiver}/{senders}": [round(m.mb_s, 1) for m in ms] for (receiver, senders), ms in runs.items()},
        "dd_all_mb_s": [round(v, 1) for v in dd_runs],
        "tiny": args.tiny,
        "listener_processes": args.listener_processes,
        "baseline": None if args.baseline is None else str(args.baseline),
        "load_average_1m_before": round(load_before, 2),
        "goals": goals,
    }
    rows = [("dd conv=fsync", "-", "-", f"{dd_mb_s:.1f}", "", "")]
    rows += [(m.receiver, str(m.senders), f"{m.images_s:.2f}", f"{m.mb_s:.1f}", f"{m.mb_s / dd_mb_s:.2f}",
              "" if m.cpu_s is None else f"{m.cpu_s / m.images * 1e3:.2f}") for m in results]
    emit(result, ("receiver", "senders", "images/s", "MB/s", "of dd", "CPU ms/image"), rows,
         title=f"ingest: {args.count} x {args.rows}x{args.cols} 16-bit ({nbytes / MB:.0f} MB) on "
               f"{result['device']}; median of {args.repeat}; load average {load_before:.1f} before, "
               f"{info['load_average_1m']:.1f} after")
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}")
    for m in results:
        if m.associations_per_process is not None and args.listener_processes > 1:
            print(f"{m.receiver} {m.senders} association(s): per listener process "
                  f"{':'.join(map(str, m.associations_per_process))}")
    return 0


if __name__ == "__main__":
    run_bench(main, "ingest")
