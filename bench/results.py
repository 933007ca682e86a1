"""Result building: CPU and wall time per image of the DICOM objects (AI findings SR, narrative SR, KOS,
GSPS) built and encoded from pipeline results, by highdicom and from templates side by side in one run,
then images per second in ``worker.result_processes`` builder processes.

This is the node's CPU cost per image that no GPU removes, so it bounds the end-to-end throughput of a GPU
host; the figure says how many builder processes a site needs. CPU time (``time.process_time``) is the
figure to judge by on a shared machine; wall time is given beside it.

    python -m bench.results --images 32 --processes 0,1,2
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

from bench.common import device_words, emit, machine


def _timed(run: Callable[[], object], images: int) -> dict[str, float]:
    c0, w0 = time.process_time(), time.perf_counter()
    run()
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    return {"cpu_ms_per_image": round(cpu * 1e3 / images, 2), "wall_ms_per_image": round(wall * 1e3 / images, 2),
            "images_per_s": round(images / wall, 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=32, help="images whose results are built per setting")
    p.add_argument("--processes", default="0,1,2", help="comma-separated builder process counts (0: in process)")
    a = p.parse_args(argv)
    counts = [int(c) for c in a.processes.split(",")]
    if a.images < 1 or any(c < 0 for c in counts):
        p.error("--images must be >= 1 and --processes >= 0")

    from pacs_node.results.build import build_study_objects, single_image_report
    from pacs_node.results.builder_pool import Built, ResultBuilders
    from pacs_node.results.options import ResultOptions
    from pacs_node.results.templates import TEMPLATES, encode
    from pacs_node.work.instance_record import instance_record
    from pipelines.interface import FakePipeline, ImageResult
    from pipelines.phantoms.dicom import phantom_dataset

    options = ResultOptions()
    sources = [phantom_dataset(i, 256) for i in range(a.images)]  # the header is what counts, not the pixels
    results = [r for r in FakePipeline().analyse(sources) if isinstance(r, ImageResult)]
    items = [single_image_report(s, r) for s, r in zip(sources, results, strict=True)]

    def highdicom() -> list[list[Built]]:
        return [[Built(instance_record(o), encode(o)) for o in build_study_objects(study, options)]
                for study in items]

    highdicom_items = items[:1]
    [[encode(o) for o in build_study_objects(s, options)] for s in highdicom_items]  # imports, not per image
    side = {"highdicom": _timed(highdicom, a.images)}
    with ResultBuilders(0, options) as here:
        here.build(items[:2])  # a shape is templated the second time it is seen
        templated: list[object] = []
        side["templates"] = _timed(lambda: templated.extend(here.build(items)), a.images)
    if any(isinstance(b, Exception) for b in templated) or TEMPLATES.hits < a.images:
        raise SystemExit(f"bench.results: the templates were not used ({TEMPLATES.hits} hits, "
                         f"{TEMPLATES.refused} shapes refused) or building failed")
    ratio = round(side["highdicom"]["cpu_ms_per_image"] / max(side["templates"]["cpu_ms_per_image"], 1e-3), 1)
    rows: list[tuple[object, ...]] = [(way, v["cpu_ms_per_image"], v["wall_ms_per_image"], v["images_per_s"])
                                      for way, v in side.items()]

    out = {}
    for count in counts:
        with ResultBuilders(count, options) as builders:
            for _ in range(3):  # start the processes, import highdicom, make every process's template
                builders.build(items[: 2 * max(count, 1)])
            t0 = time.perf_counter()
            built = builders.build(items)
            elapsed = time.perf_counter() - t0
        failed = [b for b in built if isinstance(b, Exception)]
        if failed:
            raise SystemExit(f"bench.results: building failed: {failed[0]!r}")
        objects = sum(len(b) for b in built if isinstance(b, list))
        out[str(count)] = {"images_per_s": round(a.images / elapsed, 2),
                           "ms_per_image": round(elapsed * 1e3 / a.images, 2),
                           "objects_per_image": round(objects / a.images, 2)}
        rows.append((f"templates, {count or 'no'} builder processes", "", out[str(count)]["ms_per_image"],
                     out[str(count)]["images_per_s"]))
    base = out[str(counts[0])]["images_per_s"]
    info = machine()
    result = {"bench": "results", "device": device_words(info), "machine": info, "images": a.images,
              "highdicom_vs_templates": side, "cpu_ratio": ratio,
              "by_processes": out, "vs_first": {k: round(v["images_per_s"] / base, 2) for k, v in out.items()}}
    emit(result, ("built and encoded", "CPU ms/image", "wall ms/image", "images/s"), rows,
         title=f"result objects, {a.images} images: highdicom / templates = {ratio}x CPU; {result['device']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
