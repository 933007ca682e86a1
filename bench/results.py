"""Result building: images per second of the DICOM objects (AI findings SR, narrative SR, KOS, GSPS) built
and encoded from pipeline results, in the worker process and in ``worker.result_processes`` builder
processes, side by side in one run.

This is the node's CPU cost per image that no GPU removes (highdicom builds the objects in pure Python), so
it bounds the end-to-end throughput of a GPU host; the figure says how many builder processes a site needs.

    python -m bench.results --images 32 --processes 0,1,2
"""

from __future__ import annotations

import argparse
import sys
import time

from bench.common import device_words, emit, machine


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=32, help="images whose results are built per setting")
    p.add_argument("--processes", default="0,1,2", help="comma-separated builder process counts (0: in process)")
    a = p.parse_args(argv)
    counts = [int(c) for c in a.processes.split(",")]
    if a.images < 1 or any(c < 0 for c in counts):
        p.error("--images must be >= 1 and --processes >= 0")

    from pacs_node.results.build import single_image_report
    from pacs_node.results.builder_pool import ResultBuilders
    from pacs_node.results.options import ResultOptions
    from pipelines.interface import FakePipeline, ImageResult
    from pipelines.phantoms.dicom import phantom_dataset

    sources = [phantom_dataset(i, 256) for i in range(a.images)]  # the header is what counts, not the pixels
    results = [r for r in FakePipeline().analyse(sources) if isinstance(r, ImageResult)]
    items = [single_image_report(s, r) for s, r in zip(sources, results, strict=True)]
    rows, out = [], {}
    for count in counts:
        with ResultBuilders(count, ResultOptions()) as builders:
            builders.build(items[: max(count, 1)])  # start the processes, import highdicom: not per image
            t0 = time.perf_counter()
            built = builders.build(items)
            elapsed = time.perf_counter() - t0
        failed = [b for b in built if isinstance(b, Exception)]
        if failed:
            raise SystemExit(f"bench.results: building failed: {failed[0]!r}")
        objects = sum(len(b) for b in built if isinstance(b, list))
        out[str(count)] = {"images_per_s": round(a.images / elapsed, 2),
                           "ms_per_image": round(elapsed * 1e3 / a.images, 1),
                           "objects_per_image": round(objects / a.images, 2)}
        rows.append((count or "in process", out[str(count)]["images_per_s"], out[str(count)]["ms_per_image"]))
    base = out[str(counts[0])]["images_per_s"]
    info = machine()
    result = {"bench": "results", "device": device_words(info), "machine": info, "images": a.images,
              "by_processes": out, "vs_first": {k: round(v["images_per_s"] / base, 2) for k, v in out.items()}}
    emit(result, ("builder processes", "images/s", "ms/image"), rows,
         title=f"result objects built and encoded, {a.images} images; {result['device']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
