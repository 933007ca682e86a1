"""Training throughput: images per second per process of ``pacs-node train``'s step loop, for one and for N
processes side by side (``torchrun``: DistributedDataParallel over gloo on CPU, NCCL on GPUs).

Each measurement is a fresh run directory trained by ``python -m torch.distributed.run --standalone
--nproc_per_node=N -m pacs_node train`` on phantoms (``--stream``: images generated and prepared by the
data workers every step, as MIMIC-CXR's JPEGs would be read; default: cached in memory once), with the
global batch ``--batch`` split over the processes. The first ``--warmup`` steps are not timed; images/s per
process = (timed steps x batch / N) / their seconds, from the run's own per-step log. Examples::

    python -m bench.training --preset tiny --stage detector --steps 8 --batch 8 --procs 1,2
    torchrun-free on one GPU host:  python -m bench.training --preset demo --stage detector --device cuda \\
        --steps 50 --batch 64 --procs 1,8
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # also runnable as ``python bench/training.py``
    sys.path.insert(0, str(REPO))

from bench.common import BenchError, device_words, emit, machine


def _run(procs: int, args: argparse.Namespace, workdir: Path) -> dict:
    run_dir = workdir / f"procs-{procs}"
    count = max(args.count, args.batch * 2)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
               "-m", "pacs_node", "train", "--out", str(run_dir), "--data", f"phantoms:seed=0,count={count}",
               "--preset", args.preset, "--no-demo-overrides", "--device", args.device, "--quiet",
               "--workers", str(args.workers), "--stages", args.stage, "--steps", f"{args.stage}={args.steps}",
               "--batch", f"{args.stage}={args.batch}", "--log-every", "1", "--checkpoint-every", str(10 ** 9),
               "--stream" if args.stream else "--cache", "--vocab-size", "300"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if args.device == "cpu":  # every process gets the same threads in every run, so per-process figures compare
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // max(args.proc_counts)))
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=args.timeout,
                          check=False)
    if done.returncode != 0:
        raise BenchError(f"training with {procs} process(es) failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    steps = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in steps if r.get("stage") == args.stage and "event" not in r]
    timed = steps[args.warmup:]
    if len(timed) < 2:
        raise BenchError(f"--steps {args.steps} leaves fewer than 2 timed steps after --warmup {args.warmup}")
    seconds = timed[-1]["elapsed_s"] - timed[0]["elapsed_s"]
    images = (len(timed) - 1) * args.batch
    return {"procs": procs, "timed_steps": len(timed) - 1, "seconds": round(seconds, 3),
            "images_per_s": round(images / seconds, 2), "images_per_s_per_process": round(images / seconds / procs, 2),
            "final_loss": timed[-1]["loss"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", choices=("tiny", "demo", "paper"))
    parser.add_argument("--stage", default="detector", choices=("detector", "heads", "decoder", "clip", "labels"))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8, help="global batch (images per step over all processes)")
    parser.add_argument("--count", type=int, default=32, help="phantoms in the data set")
    parser.add_argument("--procs", default="1,2", help="process counts to compare, e.g. 1,2 or 1,8")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--workers", type=int, default=0, help="data workers per process (with --stream)")
    parser.add_argument("--stream", action="store_true", help="prepare images every step (no cache)")
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args(argv)
    args.proc_counts = [int(p) for p in args.procs.split(",") if p.strip()]
    with tempfile.TemporaryDirectory(prefix="bench-training-") as tmp:
        runs = [_run(n, args, Path(tmp)) for n in args.proc_counts]
    info = machine()
    base = runs[0]["images_per_s"]
    result = {"bench": "training", "machine": info, "preset": args.preset, "stage": args.stage,
              "batch": args.batch, "device": args.device, "stream": args.stream, "runs": runs,
              "speedup_vs_first": [round(r["images_per_s"] / base, 3) for r in runs]}
    rows = [[r["procs"], r["timed_steps"], r["seconds"], r["images_per_s"], r["images_per_s_per_process"],
             f"{r['images_per_s'] / base:.2f}x"] for r in runs]
    emit(result, ["processes", "steps", "seconds", "images/s", "images/s per process", "vs first"], rows,
         title=f"training, stage {args.stage}, preset {args.preset}, global batch {args.batch}, {args.device} "
               f"on {device_words(info)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
