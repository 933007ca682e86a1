"""STOW-RS benchmark: chest radiographs into the node over one HTTP connection, against DCMTK
``storescu`` into the node's DIMSE listener, side by side in one run with the same cached inputs.

Both paths end in the same durable ingest (fsync of file and directory, database commit per instance,
before the answer). Phases, each on a fresh node (fake pipeline, no workers):

* ``storescu``: one DCMTK association (``TCP_NODELAY=1``) sending ``--count`` images;
* ``stow-1-request``: one STOW-RS request carrying every image as a part, streamed from disk;
* ``stow-per-image``: one STOW-RS request per image, all on one keep-alive connection.

Prints one JSON line and a table (images/s, MB/s = 10^6 bytes of DICOM files per second of wall time),
and each STOW phase's ratio to storescu (the goal: within 2x, i.e. a ratio of at least 0.5).

    python -m bench.stow --count 40 --rows 3000 --cols 2500
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import requests

from bench.common import (
    CACHE,
    BenchError,
    Node,
    chest_image_files,
    device_words,
    emit,
    files_under,
    fresh_dir,
    free_port,
    machine,
    storescu_command,
)
from bench.ingest import MB, Measurement
from pacs_node.web.dicomweb.multipart import multipart_body

SECRET = "bench-stow-secret"
NODE_TOML = f"""\
[[http.tokens]]
name = "bench"
role = "admin"
secret_hash = "sha256:{hashlib.sha256(SECRET.encode()).hexdigest()}"
[pipeline]
bundle = "fake"
[worker]
count = 0
"""
_BOUNDARY = "bench-stow-boundary"


def _stow(session: requests.Session, url: str, files: list[Path]) -> int:
    """Send one STOW-RS request; the number of instances the node says it stored."""
    answer = session.post(url, data=multipart_body([("application/dicom", f) for f in files], _BOUNDARY), timeout=600, headers={
        "Authorization": f"Bearer {SECRET}",
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={_BOUNDARY}'})
    if answer.status_code != 200:
        raise BenchError(f"STOW-RS answered {answer.status_code}: {answer.text[:500]}")
    return len(answer.json()["00081199"]["Value"])


def measure(work: Path, path: str, files: list[Path], nbytes: int) -> Measurement:
    node = Node(fresh_dir(work, path), NODE_TOML, http_port=free_port() if path != "storescu" else 0)
    with node:
        os.sync()  # a quiet disk at the start: the previous phase's dirty pages are not this one's cost
        start = time.monotonic()
        if path == "storescu":
            result = subprocess.run(storescu_command(node.port, files, node.ae_title), capture_output=True,
                                    env={**os.environ, "TCP_NODELAY": "1"}, check=False)
            if result.returncode != 0:
                raise BenchError(f"storescu failed: {result.stderr.decode(errors='replace')[-2000:]}")
        else:
            url = f"http://127.0.0.1:{node.http_port}/dicom-web/studies"
            with requests.Session() as session:  # one connection, kept alive between requests
                batches = [files] if path == "stow-1-request" else [[f] for f in files]
                acknowledged = sum(_stow(session, url, batch) for batch in batches)
            if acknowledged != len(files):
                raise BenchError(f"STOW-RS acknowledged {acknowledged} of {len(files)}")
        seconds = time.monotonic() - start
        stored = files_under(node.data_dir / "store")
    if stored != len(files):
        raise BenchError(f"the node stored {stored} of {len(files)} files\n{node.log_tail()}")
    return Measurement(path, 1, seconds, len(files), nbytes)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=40, help="images per phase (default 40)")
    p.add_argument("--rows", type=int, default=3000)
    p.add_argument("--cols", type=int, default=2500)
    p.add_argument("--repeat", type=int, default=1, help="runs of every phase; the median is reported")
    p.add_argument("--workdir", type=Path, default=CACHE / "stow-run", help="where the nodes write; emptied per phase")
    p.add_argument("--cache", type=Path, default=CACHE, help="where generated inputs are kept between runs")
    args = p.parse_args(argv)
    for name in ("count", "rows", "cols", "repeat"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.rows < 64:
        p.error("--rows must be >= 64 (the phantom generator's minimum)")
    return args


PATHS = ("storescu", "stow-1-request", "stow-per-image")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    files = chest_image_files(args.count, args.rows, args.cols, cache=args.cache)
    nbytes = sum(f.stat().st_size for f in files)
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[Measurement]] = {path: [] for path in PATHS}
    for _ in range(args.repeat):
        for path in PATHS:
            runs[path].append(measure(work, path, files, nbytes))
    for path in PATHS:
        fresh_dir(work, path)  # leave no gigabytes behind
    results = [sorted(ms, key=lambda m: m.seconds)[len(ms) // 2] for ms in runs.values()]
    by = {m.receiver: m for m in results}
    ratios = {f"{path}_vs_storescu": by[path].mb_s / by["storescu"].mb_s for path in PATHS[1:]}
    info = machine()
    result = {
        "bench": "stow",
        "device": device_words(info),
        "machine": info,
        "count": args.count, "rows": args.rows, "cols": args.cols, "total_bytes": nbytes, "repeat": args.repeat,
        "results": [{"path": m.receiver, "seconds": m.seconds, "images": m.images, "bytes": m.bytes,
                     "images_s": round(m.images_s, 2), "mb_s": round(m.mb_s, 1)} for m in results],
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
        "goals": {f"{k}_within_2x": v >= 0.5 for k, v in ratios.items()},
    }
    rows = [(m.receiver, f"{m.images_s:.2f}", f"{m.mb_s:.1f}", f"{m.mb_s / by['storescu'].mb_s:.2f}") for m in results]
    emit(result, ("path", "images/s", "MB/s", "vs storescu"), rows,
         title=f"stow: {args.count} x {args.rows}x{args.cols} 16-bit ({nbytes / MB:.0f} MB) into the node on "
               f"{result['device']}; median of {args.repeat}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"bench.stow: {exc}", file=sys.stderr)
        sys.exit(2)
