"""Throughput of the report pipeline: the stock engine path against the fast path, with a fixed workload.

Builds a preset with random weights (no bundle needed), forces the workload (exactly ``--regions`` selected
regions per image, exactly ``--tokens`` greedy steps per region; see :class:`bench.workload.Workload`) and
measures, on the same random inputs:

* ``engine``: :meth:`pipelines.engine.Engine.infer` composing the stock detector and decoder, i.e. the
  unoptimised engine path;
* ``fast``: the same composition of the fast parts (what ``Engine`` composes by default on CUDA);
* images/s (host copies of each batch's results included), per-stage ms per image, and the matrix FLOPs per
  image (``--count-flops``), plus preprocessing of chest-sized 16-bit DICOMs on the host and with the
  mapping and resize on the device (``--preprocess-images``);
* equivalence, fast vs engine on the same images: in float32 (autocast and TF32 off) and in the production
  dtype; the engine against itself at batch 1 gives the rounding noise floor of the production dtype;
* ``../shared/bench/reference_pipeline.py``'s ``naive`` and ``batched`` modes as subprocesses of this same
  command (``--reference``; on by default on CUDA when the script is there).

Prints one JSON line, then a table. Examples::

    python -m bench.pipeline --device cpu --preset tiny --images 16 --batch 8
    python -m bench.pipeline --device cuda --preset paper --images 2048 --batch 256 --engine-images 64
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # also runnable as ``python bench/pipeline.py``
    sys.path.insert(0, str(REPO))

from bench.workload import Workload
from pipelines.bundle import DEFAULT_THRESHOLDS, Bundle
from pipelines.engine import Engine
from pipelines.outputs import RawOutput
from pipelines.models.config import preset
from pipelines.models.crrg import CRRGModel

DEFAULT_REFERENCE = REPO.parent / "shared" / "bench" / "reference_pipeline.py"
STAGES = ("detector", "selector", "decoder", "clip")


# -- setup ------------------------------------------------------------------------------------------------

def build_engine(preset_name: str, device: str, batch: int, seed: int) -> Engine:
    """A random-weight model of ``preset_name`` wrapped as a bundle-less :class:`Engine` of stock parts."""
    torch.manual_seed(seed)
    cfg = preset(preset_name)
    model = CRRGModel.from_config(cfg)
    manifest = {"name": f"bench-{preset_name}-random", "version": "0", "clinical_use": False,
                "decoding": {"num_beams": 1, "max_new_tokens": cfg.max_sentence_tokens}}
    bundle = Bundle(Path("<random weights>"), manifest, cfg, model, None, dict(DEFAULT_THRESHOLDS))  # type: ignore[arg-type]
    return Engine(bundle, device, batch, fast=False)


def make_images(n: int, size: int, mean: float, std: float, device: torch.device, seed: int) -> torch.Tensor:
    """Smooth random images (not white noise: detectors and ViTs behave differently on it), normalised."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    coarse = torch.rand((n, 1, max(size // 16, 2), max(size // 16, 2)), generator=g)
    fine = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    unit = (0.8 * fine + 0.2 * torch.rand((n, 1, size, size), generator=g)).clamp(0, 1)
    return ((unit - mean) / std).to(device)


def engine_path(engine: Engine, workload: Workload | None) -> Callable[..., RawOutput]:
    """``Engine.infer`` on the stock parts; without a workload, thresholds, beams and EOS as configured."""
    return (workload.stock(engine) if workload else engine.with_parts(engine.stock_parts())).infer


def fast_path(engine: Engine, workload: Workload, cuda_graphs: bool = True, channels_last: bool | None = None
              ) -> Callable[..., RawOutput]:
    """``Engine.infer`` on the fast parts under ``workload``."""
    return workload.fast(engine, cuda_graphs, channels_last).infer


# -- measuring ----------------------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def throughput(infer: Callable[..., RawOutput], images: torch.Tensor, batch: int, repeats: int = 1
               ) -> dict[str, Any]:
    """Images/s over ``images`` in batches (first batch run twice beforehand as warm-up: kernel selection,
    graph capture), results copied to the host per batch as the worker does."""
    dev = images.device
    for _ in range(2):
        infer(images[:batch]).to("cpu")
    sync(dev)
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(0, images.shape[0], batch):
            infer(images[i:i + batch]).to("cpu")
        sync(dev)
        rates.append(images.shape[0] / (time.perf_counter() - t0))
    return {"images_per_s": round(float(np.median(rates)), 2), "runs": [round(r, 2) for r in rates], "batch": batch,
            "images": int(images.shape[0])}


class StageTimer:
    """``timer(stage)`` context: device-synchronised wall time per stage, summed over calls."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.ms: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        sync(self.device)
        t0 = time.perf_counter()
        yield
        sync(self.device)
        self.ms[name] += (time.perf_counter() - t0) * 1000.0


def stage_ms(infer: Callable[..., RawOutput], images: torch.Tensor, batch: int) -> dict[str, float]:
    """Per-image milliseconds of each stage (synchronising between stages, so slightly above the overlap-free
    sum of a real run); the first batch is a warm-up."""
    timer = StageTimer(images.device)
    infer(images[:batch], None)
    for i in range(0, images.shape[0], batch):
        infer(images[i:i + batch], timer)
    return {k: round(v / images.shape[0], 4) for k, v in timer.ms.items()}


def flops_per_image(infer: Callable[..., RawOutput], images: torch.Tensor) -> dict[str, float]:
    """Counted matrix FLOPs (convolutions, matmuls, attention) per image and stage, in GFLOP."""
    from torch.utils.flop_counter import FlopCounterMode

    totals: dict[str, float] = defaultdict(float)

    @contextmanager
    def counter(name: str) -> Iterator[None]:
        with FlopCounterMode(display=False) as fc:
            yield
        totals[name] += fc.get_total_flops()

    infer(images, counter)
    return {k: round(totals[k] / images.shape[0] / 1e9, 3) for k in STAGES}


def kernel_profile(fn: Callable[[], Any], device: torch.device, top: int = 20) -> list[dict[str, Any]]:
    """The ``top`` operators and kernels of one call of ``fn`` (after one warm-up call) by self time on the
    device (the CPU on a CPU): where a stage's milliseconds go, kernel by kernel."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    fn()
    sync(device)
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        fn()
        sync(device)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:top]
    return [{"name": e.key[:100], "calls": e.count, "ms": round(getattr(e, key) / 1e3, 3)} for e in events]


def stage_profiles(engine: Engine, fast: Engine, images: torch.Tensor, workload: Workload
                   ) -> dict[str, list[dict[str, Any]]]:
    """:func:`kernel_profile` of the fast path's detector, decoder (one ``generate`` of ``tokens`` steps over
    ``images x regions`` rows, without CUDA graphs so that every kernel shows; their device time is the
    same replayed) and CLIP, each on ``images``."""
    dev = images.device
    rows = images.shape[0] * workload.regions
    features = torch.randn(rows, engine.model.decoder.feature_proj[0].in_features, device=dev)
    eager = engine.fast_decoder(cuda_graphs=False)

    def under_autocast(fn: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=engine.autocast):
                return fn()
        return run

    return {
        "detector": kernel_profile(under_autocast(lambda: fast.parts.detector(images)), dev),
        "decoder": kernel_profile(under_autocast(lambda: eager.generate(features, workload.tokens, stop_at_eos=False)),
                                  dev),
        "clip": kernel_profile(under_autocast(lambda: engine.model.clip.label_probs(images)), dev),
    }


def preprocess_rate(n: int, rows: int, cols: int, size: int, workers: int, device: torch.device
                    ) -> dict[str, Any]:
    """Preprocessing (decode, VOI window, MONOCHROME1 inversion, resize, pad) of native 16-bit images on
    ``workers`` threads, measured twice in one run: all on the host, and decode on the host with the rest on
    ``device`` (what the node does on a GPU host; on a CPU it is the same work done by torch instead of numpy)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    from pipelines.preprocess import preprocess_many

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 4096, (rows, cols), dtype=np.uint16).tobytes()

    def datasets() -> list[Dataset]:  # fresh ones: pydicom caches the decoded array on a dataset
        out = []
        for _ in range(n):
            ds = Dataset()
            ds.file_meta = FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.Rows, ds.Columns = rows, cols
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME1"
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
            ds.WindowCenter, ds.WindowWidth = 2048, 4096
            ds.PixelData = pixels
            out.append(ds)
        return out

    def rate(on: torch.device | None) -> float:
        preprocess_many(datasets()[:2], size, 0.5, 0.25, workers=workers, device=on)
        batch = datasets()
        sync(device)
        t0 = time.perf_counter()
        out = preprocess_many(batch, size, 0.5, 0.25, workers=workers, device=on)
        sync(device)
        elapsed = time.perf_counter() - t0
        failed = [o for o in out if isinstance(o, Exception)]
        if failed:
            raise RuntimeError(f"preprocessing failed: {failed[0]}")
        return round(n / elapsed, 2)

    host, on_device = rate(None), rate(device)
    return {"host_images_per_s": host, "on_device_images_per_s": on_device, "device": str(device),
            "on_device_vs_host": round(on_device / host, 2), "workers": workers, "rows": rows, "cols": cols}


# -- equivalence --------------------------------------------------------------------------------------------

def compare(a: RawOutput, b: RawOutput) -> dict[str, Any]:
    """How far ``b`` is from ``a``: boxes (px), masks, and greedy sequences matched by (image, region)."""
    a, b = a.to("cpu"), b.to("cpu")
    box_err = (a.boxes - b.boxes).abs().amax(-1)
    rows_a = {tuple(k): i for i, k in enumerate(a.selected.nonzero().tolist())}
    rows_b = {tuple(k): i for i, k in enumerate(b.selected.nonzero().tolist())}
    common = sorted(set(rows_a) & set(rows_b))
    same = 0
    for key in common:
        sa, sb = _strip(a.token_ids[rows_a[key]]), _strip(b.token_ids[rows_b[key]])
        same += int(torch.equal(sa, sb))
    return {
        "boxes": int(box_err.numel()),
        "boxes_within_1px": round(float((box_err <= 1.0).float().mean()), 4),
        "box_max_px": round(float(box_err.max()), 3) if box_err.numel() else 0.0,
        "detected_equal": round(float((a.detected == b.detected).float().mean()), 4),
        "selected_equal": round(float((a.selected == b.selected).float().mean()), 4),
        "sequences": len(common),
        "sequences_identical": round(same / len(common), 4) if common else 1.0,
        "label_prob_max_diff": round(float((a.label_probs - b.label_probs).abs().max()), 5),
    }


def _strip(ids: torch.Tensor) -> torch.Tensor:
    """A sequence up to and including its first EOS (PAD = EOS after it)."""
    hits = (ids == 50256).nonzero()
    return ids[: int(hits[0, 0]) + 1] if len(hits) else ids


def batched(infer: Callable[..., RawOutput], images: torch.Tensor, batch: int) -> RawOutput:
    parts = [infer(images[i:i + batch]).to("cpu") for i in range(0, images.shape[0], batch)]
    width = max(p.token_ids.shape[1] for p in parts)
    ids = [torch.nn.functional.pad(p.token_ids, (0, width - p.token_ids.shape[1]), value=50256) for p in parts]
    def cat(field: str) -> torch.Tensor:
        return torch.cat([getattr(p, field) for p in parts])

    return RawOutput(cat("boxes"), cat("detected"), cat("selected"), cat("abnormal_probs"), torch.cat(ids),
                     cat("label_probs"), cat("abnormal"))


def equivalence(engine: Engine, workload: Workload, images: torch.Tensor, batch: int, engine_batch: int
                ) -> dict[str, Any]:
    out: dict[str, Any] = {}
    dev = engine.device
    if dev.type == "cuda":  # float32 first: autocast and TF32 off, so only summation order differs
        autocast, tf32 = engine.autocast, torch.backends.cuda.matmul.allow_tf32
        engine.autocast = False
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            ref = batched(engine_path(engine, workload), images, engine_batch)
            out["float32"] = compare(ref, batched(fast_path(engine, workload), images, batch))
        finally:
            engine.autocast = autocast
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    label = "bfloat16" if engine.autocast else "float32"
    ref = batched(engine_path(engine, workload), images, engine_batch)
    out[label] = compare(ref, batched(fast_path(engine, workload), images, batch))
    out[f"{label}_engine_batch1_vs_batched"] = compare(ref, batched(engine_path(engine, workload), images, 1))
    natural = images[: min(4, images.shape[0])]  # no workload: thresholds and EOS as in production
    out[f"{label}_natural_workload"] = compare(engine_path(engine, None)(natural),
                                               engine.with_parts(engine.fast_parts()).infer(natural))
    return out


# -- reference script -----------------------------------------------------------------------------------

def run_reference(script: Path, mode: str, images: int, batch: int, regions: int, tokens: int,
                  timeout: float) -> dict[str, Any]:
    """One mode of the peer reference script, as a subprocess (it parses arguments at import time)."""
    cmd = [sys.executable, str(script), "--images", str(images), "--batch", str(batch), "--regions", str(regions),
           "--tokens", str(tokens), "--modes", mode]
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"mode": mode, "error": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"mode": mode, "error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]}


# -- main -------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", default="paper", choices=("paper", "demo", "tiny"))
    p.add_argument("--images", type=int, default=1024, help="images timed on the fast path")
    p.add_argument("--batch", default="256", help="fast-path batch; several, comma-separated, are each timed")
    p.add_argument("--engine-images", type=int, default=64, help="images timed on the engine path")
    p.add_argument("--engine-batch", type=int, default=32, help="engine-path batch")
    p.add_argument("--regions", type=int, default=8)
    p.add_argument("--tokens", type=int, default=24)
    p.add_argument("--repeats", type=int, default=3, help="timed passes of the fast path (median reported)")
    p.add_argument("--check-images", type=int, default=16, help="images in the equivalence checks (0: skip)")
    p.add_argument("--count-flops", action="store_true")
    p.add_argument("--profile", action="store_true",
                   help="top kernels by device time of the fast path's detector, decoder and CLIP at --batch")
    p.add_argument("--preprocess-images", type=int, default=0, help="chest-sized DICOMs to preprocess (0: skip)")
    p.add_argument("--reference", default="auto", help="reference_pipeline.py path, 'auto' or 'none'")
    p.add_argument("--reference-naive-images", type=int, default=16)
    p.add_argument("--reference-batched-images", type=int, default=128)
    p.add_argument("--no-cuda-graphs", action="store_true", help="fast path without CUDA graphs")
    p.add_argument("--nchw", action="store_true",
                   help="finally, also time the fast path with an NCHW backbone (NHWC is the default on CUDA)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="also write the JSON result here")
    a = p.parse_args(argv)

    batches = [int(b) for b in str(a.batch).split(",")]
    a.batch = batches[0]
    dev = torch.device(a.device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    workload = Workload(a.regions, a.tokens)
    t_build = time.perf_counter()
    engine = build_engine(a.preset, a.device, a.engine_batch, a.seed)
    cfg = engine.cfg
    fast = workload.fast(engine, cuda_graphs=not a.no_cuda_graphs)
    build_s = time.perf_counter() - t_build
    images = make_images(max(a.images, a.engine_images, a.check_images), cfg.image_size, cfg.image_mean,
                         cfg.image_std, dev, a.seed)
    result: dict[str, Any] = {
        "bench": "pipeline", "preset": a.preset, "device": _device_name(dev), "torch": torch.__version__,
        "regions": a.regions, "tokens": a.tokens, "dtype": "bfloat16" if engine.autocast else "float32",
        "build_s": round(build_s, 1), "host": platform.node(),
        "cuda_graphs": dev.type == "cuda" and not a.no_cuda_graphs,
    }
    ref_script = _reference_script(a.reference, dev)
    if ref_script is not None:  # first, while the GPU holds nothing of ours beyond the weights
        section(result, "reference", lambda: {
            "naive": run_reference(ref_script, "naive", a.reference_naive_images, 1, a.regions, a.tokens, 300),
            "batched": run_reference(ref_script, "batched", a.reference_batched_images, a.engine_batch, a.regions,
                                     a.tokens, 300),
        })
    eng_infer, fast_infer = engine_path(engine, workload), fast.infer
    result["engine"] = throughput(eng_infer, images[: a.engine_images], a.engine_batch)
    result["engine"]["stage_ms"] = stage_ms(eng_infer, images[: a.engine_batch * 2], a.engine_batch)
    _partial("engine", result["engine"])
    by_batch: dict[int, dict[str, Any]] = {}
    for b in batches:
        section(by_batch, b, functools.partial(throughput, fast_infer, images[: a.images], b, a.repeats))
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    timed = {b: r for b, r in by_batch.items() if "images_per_s" in r}
    if not timed:
        raise SystemExit(f"the fast path failed at every batch size: {by_batch}")
    a.batch = max(timed, key=lambda b: timed[b]["images_per_s"])
    result["fast"] = timed[a.batch]
    if len(by_batch) > 1:
        result["fast_images_per_s_by_batch"] = {str(b): r.get("images_per_s", r.get("error")) for b, r in by_batch.items()}
    result["fast"]["stage_ms"] = stage_ms(fast_infer, images[: a.batch * 2], a.batch)
    _partial("fast stages", result["fast"]["stage_ms"])
    result["speedup_fast_vs_engine"] = round(result["fast"]["images_per_s"] / result["engine"]["images_per_s"], 2)
    for mode in ("naive", "batched"):
        ref = result.get("reference", {}).get(mode, {})
        if ref.get("images_per_s"):
            result[f"speedup_fast_vs_reference_{mode}"] = round(result["fast"]["images_per_s"] / ref["images_per_s"], 1)
    if a.count_flops:
        few = images[:2]
        section(result, "gflop_per_image", lambda: {
            "engine": flops_per_image(eng_infer, few),
            "fast": flops_per_image(fast_path(engine, workload, cuda_graphs=False), few)})
    if a.profile:
        section(result, "profile", lambda: stage_profiles(engine, fast, images[: a.batch], workload))
    if a.check_images:
        section(result, "equivalence", lambda: equivalence(engine, workload, images[: a.check_images], a.batch,
                                                           a.engine_batch))
    if a.preprocess_images:
        section(result, "preprocess", lambda: preprocess_rate(a.preprocess_images, 3000, 2500, cfg.image_size,
                                                               os.cpu_count() or 1, dev))
    if a.nchw:
        def nchw_run() -> dict[str, Any]:
            nchw = fast_path(engine, workload, not a.no_cuda_graphs, channels_last=False)
            out = throughput(nchw, images[: a.images], a.batch, a.repeats)
            out["stage_ms"] = stage_ms(nchw, images[: a.batch * 2], a.batch)
            return out
        section(result, "fast_nchw", nchw_run)
    if dev.type == "cuda":
        result["max_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)
    print(json.dumps(result), flush=True)
    if a.out:
        a.out.write_text(json.dumps(result, indent=2) + "\n")
    _table(result)
    return result


def section(result: dict[Any, Any], name: Any, fn: Callable[[], Any]) -> None:
    """An optional part of the run: its failure is recorded in the result instead of losing the others."""
    try:
        result[name] = fn()
    except Exception as exc:  # noqa: BLE001 - a benchmark reports, it does not stop
        result[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
    _partial(str(name), result[name])


def _partial(name: str, value: Any) -> None:
    """Progress on stderr, so a run cut short still shows what it measured."""
    print(f"# {name}: {json.dumps(value)}", file=sys.stderr, flush=True)


def _reference_script(arg: str, dev: torch.device) -> Path | None:
    if arg == "none":
        return None
    if arg == "auto":
        return DEFAULT_REFERENCE if DEFAULT_REFERENCE.is_file() and dev.type == "cuda" else None
    path = Path(arg)
    if not path.is_file():
        raise SystemExit(f"--reference: {path} does not exist")
    return path


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def _table(r: dict[str, Any]) -> None:
    print(f"\n{r['preset']} preset, random weights, {r['regions']} regions x {r['tokens']} tokens per image, "
          f"{r['dtype']}, {r['device']}")
    rows: list[tuple[str, Any, Any, dict[str, float]]] = []
    for name, label in (("naive", "reference naive"), ("batched", "reference batched")):
        ref = r.get("reference", {}).get(name)
        if ref:
            rows.append((label, ref.get("batch", "-"), ref.get("images_per_s", ref.get("error")), {}))
    for name in ("engine", "fast", "fast_nchw"):
        if "images_per_s" in r.get(name, {}):
            rows.append((f"{name} path", r[name]["batch"], r[name]["images_per_s"], r[name]["stage_ms"]))
    print(f"{'path':<26}{'batch':>6}{'images/s':>11}" + "".join(f"{s + ' ms':>13}" for s in STAGES))
    for label, batch, ips, stages in rows:
        print(f"{label:<26}{batch!s:>6}{ips!s:>11}" + "".join(f"{stages.get(s, ''):>13}" for s in STAGES))
    extra = {k: v for k, v in r.items() if k.startswith("speedup")}
    if extra:
        print("  ".join(f"{k.removeprefix('speedup_')}: {v}x" for k, v in extra.items()))
    if "error" not in r.get("gflop_per_image", {"error": 1}):
        for name in ("engine", "fast"):
            g = r["gflop_per_image"][name]
            print(f"{name} GFLOP/image: " + ", ".join(f"{k} {v}" for k, v in g.items()) + f"; total {sum(g.values()):.1f}")
    for label, eq in r.get("equivalence", {}).items():
        print(f"equivalence {label}: " + (", ".join(f"{k}={v}" for k, v in eq.items()) if isinstance(eq, dict)
                                          else str(eq)))
    if "error" not in r.get("profile", {"error": 1}):
        for stage, kernels in r["profile"].items():
            print(f"profile {stage} (ms per call of the batch, top 8): "
                  + "; ".join(f"{k['name']} {k['ms']} x{k['calls']}" for k in kernels[:8]))
    if "host_images_per_s" in r.get("preprocess", {}):
        pre = r["preprocess"]
        print(f"preprocess {pre['rows']}x{pre['cols']} 16-bit on {pre['workers']} threads: "
              f"{pre['host_images_per_s']} images/s on the host, {pre['on_device_images_per_s']} with map/resize "
              f"on {pre['device']} ({pre['on_device_vs_host']}x)")


if __name__ == "__main__":
    main()
