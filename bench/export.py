"""Export benchmark: the node's exporter (``pacs_node.work.export.Exporter``, its threads as ``serve`` runs
them) sending stored result objects to a forking DCMTK ``storescp``, CPU per result and results/s.

The results are the four objects of one image (AI findings SR, narrative SR, KOS, GSPS, as the
builders make them for a phantom) stored ``--images`` times under new UIDs, as the worker stores
them. Two phases:

* ``backlog``: every export job queued before the exporter is rung: its maximum rate;
* ``paced``: an image's results queued (one transaction, a ring) every ``1 / --rate`` seconds, as the
  worker queues them at that many images/s: the per-batch costs (claims, associations) at a GPU's pace.

CPU is this process's (the exporter threads, pynetdicom's association threads) less the threads of
the bench itself (the feeder's transactions, the wait). ``--compare DIR`` runs the same phases, in
turn with this checkout's, against the code of another checkout (say, main's), side by side in one run.

    python -m bench.export --images 100 --rate 50 --compare /work/wt/base
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.common import CACHE, REPO, StoreSCP, device_words, emit, fresh_dir, machine


def result_files(images: int) -> list[list[bytes]]:
    """``images`` sets of the four result objects of a phantom image, each set with its own UIDs."""
    import pydicom
    from pydicom.uid import generate_uid

    from pacs_node.results import ResultOptions, build_result_objects
    from pipelines.interface import FakePipeline
    from pipelines.phantoms.dicom import phantom_dataset

    source = phantom_dataset(0, 256)
    (result,) = FakePipeline().analyse([source])
    objects = build_result_objects(source, result, ResultOptions())
    sets = []
    for _ in range(images):
        study, files = generate_uid(), []
        for ds in objects:  # written under new UIDs each time (a deep copy of each would take longer)
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, generate_uid()
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            buffer = io.BytesIO()
            pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
            files.append(buffer.getvalue())
        sets.append(files)
    return sets


def one_run(args: argparse.Namespace) -> dict[str, object]:
    """Both phases with the code on ``sys.path`` (this checkout's or ``--compare``'s)."""
    import pydicom
    from sqlalchemy import func, select

    from pacs_node.config import Settings
    from pacs_node.ops.context import ServerContext
    from pacs_node.work.export import Exporter
    from storage.repository import add_instance
    from storage.schema import Job, JobKind

    sets = result_files(args.images * len(args.phases))
    out: dict[str, object] = {}
    for n, phase in enumerate(args.phases):
        chunk = sets[n * args.images:(n + 1) * args.images]
        work = fresh_dir(args.workdir, f"export-{phase}")
        with StoreSCP(work / "received", ae_title="RESULTS", fork=True) as scp:
            settings = Settings(node={"data_dir": work / "var"}, store={"min_free_bytes": 0},
                                worker={"poll_interval_s": 1.0},
                                peers={"results": {"ae_title": scp.ae_title, "host": "127.0.0.1", "port": scp.port}})
            rt = ServerContext.open(settings, migrate=True)
            uids = []
            with rt.write_session() as session, session.begin():
                for files in chunk:
                    group = []
                    for data in files:
                        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
                        relpath = rt.store.relpath_for(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
                        rt.store.write_bytes(relpath, data)
                        add_instance(session, sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID,
                                     transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
                                     study_instance_uid=ds.StudyInstanceUID, series_instance_uid=ds.SeriesInstanceUID,
                                     path=relpath, size_bytes=len(data), origin="result", disposition="result",
                                     modality=str(ds.Modality))
                        group.append(str(ds.SOPInstanceUID))
                    uids.append(group)
            total = sum(len(g) for g in uids)
            exporter = Exporter(settings, rt, worker_id="bench")
            exporter.start()
            time.sleep(0.5)  # threads started and idle
            bench_cpu = [0.0]

            def feed() -> None:
                start_cpu, start = time.thread_time(), time.monotonic()
                groups = [[g for group in uids for g in group]] if phase == "backlog" else uids
                for n, group in enumerate(groups):
                    if phase == "paced":
                        time.sleep(max(0.0, start + n / args.rate - time.monotonic()))
                    with rt.write_session() as session, session.begin():
                        rt.queue.enqueue_many(session, [dict(kind=JobKind.EXPORT, sop_instance_uid=uid,
                                                             destination="results", dedupe_key=f"export:{uid}")
                                                        for uid in group])
                    rt.doorbell(JobKind.EXPORT).ring()
                bench_cpu[0] += time.thread_time() - start_cpu

            cpu0, wall0, main0 = time.process_time(), time.monotonic(), time.thread_time()
            feeder = threading.Thread(target=feed)
            feeder.start()
            deadline = wall0 + args.timeout
            while time.monotonic() < deadline:
                time.sleep(0.05)
                with rt.read_session() as session:
                    done = session.scalar(select(func.count()).select_from(Job).where(Job.state == "done"))
                if done >= total:
                    break
            wall = time.monotonic() - wall0
            feeder.join()
            cpu = time.process_time() - cpu0 - bench_cpu[0] - (time.thread_time() - main0)
            exporter.stop()
            rt.close()
            if done < total:
                raise SystemExit(f"bench.export: {done} of {total} results exported in {args.timeout:.0f}s")
        out[phase] = {"results": total, "wall_s": round(wall, 3), "results_per_s": round(total / wall, 1),
                      "cpu_ms_per_result": round(cpu * 1e3 / total, 3)}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=100, help="images whose 4 results are exported per phase")
    p.add_argument("--rate", type=float, default=50.0, help="images/s of the paced phase (default 50)")
    p.add_argument("--compare", type=Path, action="append", default=[], help="another checkout to run too")
    p.add_argument("--repeat", type=int, default=1, help="runs of each checkout, in turn")
    p.add_argument("--phases", type=lambda text: text.split(","), default=["backlog", "paced"],
                   help="comma-separated: backlog, paced (default both)")
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--workdir", type=Path, default=CACHE / "export-run")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a run of one checkout, JSON out
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(one_run(args)))
        return 0
    trees = [REPO, *[tree.resolve() for tree in args.compare]]
    runs: dict[str, list[dict[str, dict[str, float]]]] = {str(tree): [] for tree in trees}
    for _ in range(args.repeat):
        for tree in trees:
            env = {**os.environ, "PYTHONPATH": str(tree)}
            command = [sys.executable, str(Path(__file__).resolve()), "--one", "--images", str(args.images),
                       "--rate", str(args.rate), "--timeout", str(args.timeout), "--phases", ",".join(args.phases),
                       "--workdir", str(args.workdir / tree.name)]
            done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise SystemExit(f"bench.export on {tree}: {done.stderr[-3000:]}")
            runs[str(tree)].append(json.loads(done.stdout.strip().splitlines()[-1]))
    rows = []
    for tree, results in runs.items():
        for phase in args.phases:
            cpu = sorted(r[phase]["cpu_ms_per_result"] for r in results)
            rate = sorted(r[phase]["results_per_s"] for r in results)
            rows.append((Path(tree).name, phase, cpu[len(cpu) // 2], rate[len(rate) // 2]))
    info = machine()
    emit({"bench": "export", "device": device_words(info), "machine": info, "images": args.images,
          "paced_images_s": args.rate, "load_average": os.getloadavg(), "runs": runs},
         ("checkout", "phase", "CPU ms/result", "results/s"), rows,
         title=f"export: {args.images} images x 4 results to a forking storescp, paced at {args.rate:g} images/s "
               f"(median of {args.repeat}); {device_words(info)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
