"""Batched inference: preprocessed images in, :class:`pipelines.interface.ImageResult` out.

:class:`Engine` composes injected parts the way torchvision's ``GeneralizedRCNN`` composes its backbone, RPN
and RoI heads: a *detector* (``images[B,1,S,S] -> Detections``), a region *selection* rule
(``selector_logits[B,29], detected[B,29] -> bool[B,29]``) and a sentence *decoder* (``features[N,D] ->
token ids[N,T]``), around the bundle's region MLPs and CLIP. :meth:`Engine.infer` is the one composition: a
fixed sequence of whole-batch tensor operations — detector on ``B`` images, both region MLPs on ``B x 29``
features, one decoder call over *every* selected region of the batch, CLIP on ``B`` images — with no Python
loop over images, regions or boxes and a single host transfer at the end. CLIP sees the detector input
(the node's own CLIP) or, for an imported published CLIP, its own input made from the original image
(``Preprocessed.clip``, :func:`pipelines.preprocess.fit_to_clip`), stacked like the detector input.

The parts are chosen at construction: the stock modules (:meth:`Engine.stock_parts`), or on CUDA with greedy
decoding the fast ones of :mod:`pipelines.accel` (:meth:`Engine.fast_parts`: same outputs, fewer launches;
docs/performance.md). Benchmarks inject their own (``bench/workload.py``).

On CUDA the models run under bf16 autocast; on CPU in fp32 (``precision`` overrides either way).
``deterministic=True`` seeds torch and switches on deterministic algorithms (a process-wide setting) for
reproducible tests.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pydicom
import torch
from torch import Tensor

from pipelines.accel import FastDetector, StaticGreedyDecoder
from pipelines.bundle import Bundle, load_bundle
from pipelines.constants import CHEXPERT_LABELS, REGIONS
from pipelines.gate import pooled_features
from pipelines.interface import ImageResult, NotInterpreted, PipelineError, PreprocessError, RegionResult
from pipelines.models.decoder import ReportDecoder
from pipelines.outputs import Decode, Detect, RawOutput, Select, StageTimer
from pipelines.preprocess import Preprocessed, boxes_to_source, preprocess_many
from pipelines.report import assembler_from_manifest
from pipelines.tokenizer import decode_sentences

log = logging.getLogger(__name__)


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    return dev


def set_deterministic(seed: int = 0) -> None:
    """Seeds and deterministic kernels. Process-wide: cuBLAS reads its workspace setting at initialisation."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


@dataclass(frozen=True)
class ThresholdSelection:
    """RGRG's selection rule: a detected region gets a sentence when its selector logit is ``> threshold``
    (the bundle's ``selection_logit``, -1 in RGRG)."""

    threshold: float

    def __call__(self, selector_logits: Tensor, detected: Tensor) -> Tensor:
        return (selector_logits.float() > self.threshold) & detected


@dataclass(frozen=True)
class SentenceDecoder:
    """The stock decoder with the bundle's decoding settings: greedy or beam search, up to ``max_new_tokens``."""

    decoder: ReportDecoder
    max_new_tokens: int
    num_beams: int

    def __call__(self, features: Tensor) -> Tensor:
        return self.decoder.generate(features, self.max_new_tokens, self.num_beams)


@dataclass(frozen=True)
class EngineParts:
    """The injected parts :meth:`Engine.infer` composes."""

    detector: Detect
    select: Select
    decoder: Decode


class Engine:
    """Runs a loaded :class:`~pipelines.bundle.Bundle` on batches of :class:`Preprocessed` images.

    ``fast`` chooses the parts: ``None`` (default) the fast ones on CUDA with greedy decoding, else the stock
    ones; ``True``/``False`` force either (the fast ones also run, slowly, on the CPU: that is how they are
    tested). ``parts`` injects others instead (see :meth:`with_parts`)."""

    def __init__(self, bundle: Bundle, device: str | torch.device = "cpu", batch_size: int = 8,
                 deterministic: bool = False, num_beams: int | None = None, precision: str = "auto",
                 fast: bool | None = None, parts: EngineParts | None = None) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be 'auto', 'bf16' or 'fp32', not {precision!r}")
        if deterministic:
            set_deterministic()
        self.bundle = bundle
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.model = bundle.model.to(self.device).eval()
        self.cfg = bundle.config
        decoding = bundle.decoding
        self.num_beams = int(num_beams if num_beams is not None else decoding.get("num_beams", 1))
        self.max_new_tokens = int(decoding.get("max_new_tokens", self.cfg.max_sentence_tokens))
        #: RGRG's logit thresholds: selection (detected regions only) and abnormality
        self.selection_threshold = float(bundle.thresholds["selection_logit"])
        self.abnormal_threshold = float(bundle.thresholds["abnormal_logit"])
        #: bf16 autocast around the models: on CUDA by default ("auto"), on request elsewhere
        self.autocast = precision == "bf16" or (precision == "auto" and self.device.type == "cuda")
        self.fast_path = (self.device.type == "cuda" and self.num_beams == 1) if fast is None else fast
        self.parts = parts or (self.fast_parts() if self.fast_path else self.stock_parts())
        #: the selected regions' sentences -> report, with the components the manifest names
        self.assembler = assembler_from_manifest(bundle.manifest.get("report"), bundle.path)
        self._warned_clip_approximation = False

    # -- parts ------------------------------------------------------------------------------------------------
    def stock_parts(self) -> EngineParts:
        """The bundle's own modules: ``RegionDetector``, the threshold rule, ``ReportDecoder.generate``."""
        m = self.model
        return EngineParts(m.detector, ThresholdSelection(self.selection_threshold),
                           SentenceDecoder(m.decoder, self.max_new_tokens, self.num_beams))

    def fast_parts(self, cuda_graphs: bool = True, channels_last: bool | None = None) -> EngineParts:
        """:meth:`fast_detector` and, for greedy decoding, :meth:`fast_decoder` with the bundle's token limit;
        beam search stays on the stock decoder."""
        stock = self.stock_parts()
        decoder: Decode = stock.decoder
        if self.num_beams == 1:
            decoder = partial(self.fast_decoder(cuda_graphs).generate, steps=self.max_new_tokens)
        return EngineParts(self.fast_detector(channels_last), stock.select, decoder)

    def fast_detector(self, channels_last: bool | None = None) -> FastDetector:
        """:class:`~pipelines.accel.FastDetector` on the bundle's detector, NHWC by default on CUDA."""
        nhwc = self.device.type == "cuda" if channels_last is None else channels_last
        return FastDetector(self.model.detector, nhwc)

    def fast_decoder(self, cuda_graphs: bool = True) -> StaticGreedyDecoder:
        """:class:`~pipelines.accel.StaticGreedyDecoder` on the bundle's decoder, its matrix products in bf16
        when the engine autocasts, else in the weights' dtype."""
        decoder = self.model.decoder
        dtype = torch.bfloat16 if self.autocast else decoder.lm.lm_head.weight.dtype
        return StaticGreedyDecoder(decoder, dtype, cuda_graphs=cuda_graphs)

    def with_parts(self, parts: EngineParts) -> Engine:
        """The same engine (model, device, precision) composing ``parts`` instead."""
        other = copy.copy(self)
        other.parts = parts
        return other

    # -- tensors in, tensors out ----------------------------------------------------------------------------
    @torch.inference_mode()
    def infer(self, images: Tensor, timer: StageTimer | None = None, clip_images: Tensor | None = None
              ) -> RawOutput:
        """The batched hot path on ``images[B,1,S,S]`` (already on :attr:`device`); ``timer``, when given,
        wraps each stage (and is handed to a detector that times its sub-stages). ``clip_images[B,3,s,s]``,
        when given, is CLIP's own input (``Preprocessed.clip``); else CLIP works from ``images``."""
        m, parts = self.model, self.parts
        stage = timer or (lambda _name: nullcontext())
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            with stage("detector"):
                timed = timer is not None and getattr(parts.detector, "timed", False)
                det = parts.detector(images, timer) if timed else parts.detector(images)  # type: ignore[call-arg]
            with stage("selector"):
                feats = det.features
                selected = parts.select(m.selector(feats), det.detected)
                abnormal_logits = m.abnormality(feats).float()
                chosen = feats[selected]
            with stage("decoder"):
                token_ids = parts.decoder(chosen)
            with stage("clip"):
                label_probs = (m.clip.label_probs(images) if clip_images is None
                               else m.clip.label_probs(clip_images, prepared=True))
        return RawOutput(det.boxes.float(), det.detected, selected, abnormal_logits.sigmoid(), token_ids,
                         label_probs.float(), abnormal_logits > self.abnormal_threshold)

    @torch.inference_mode()
    def gate_scores(self, batch: Sequence[Preprocessed]) -> list[float | None]:
        """The content gate's out-of-distribution score of each image (``None`` each when the bundle has no
        gate): one backbone pass per chunk of :attr:`batch_size`."""
        gate = self.bundle.gate
        if gate is None:
            return [None] * len(batch)
        scores: list[float | None] = []
        for start in range(0, len(batch), self.batch_size):
            images = stack_on([p.tensor for p in batch[start:start + self.batch_size]], self.device)
            scores += [float(s) for s in gate.score(pooled_features(self.model.detector, images).cpu().numpy())]
        return scores

    # -- preprocessed images in, results out ----------------------------------------------------------------
    def run(self, batch: Sequence[Preprocessed]) -> list[ImageResult]:
        """Results in input order, in chunks of :attr:`batch_size`; boxes in source pixel coordinates."""
        results: list[ImageResult] = []
        for start in range(0, len(batch), self.batch_size):
            chunk = batch[start:start + self.batch_size]
            t0 = time.perf_counter()
            images = stack_on([p.tensor for p in chunk], self.device)
            raw = self.infer(images, clip_images=self._clip_images(chunk)).to("cpu")
            elapsed_ms = (time.perf_counter() - t0) * 1000.0 / len(chunk)
            results += self._assemble(chunk, raw, {"inference": elapsed_ms})
        return results

    def _clip_images(self, chunk: Sequence[Preprocessed]) -> Tensor | None:
        """``[B,3,s,s]`` CLIP inputs of a chunk on :attr:`device`, or None where CLIP works from the detector
        input: for the node's own CLIP, and (with a warning, once) for an imported one given images without
        ``Preprocessed.clip`` (made by ``fit_to_model`` alone), whose CLIP input is then only approximated."""
        clips = [p.clip for p in chunk]
        if all(c is None for c in clips):
            if self.model.clip.preprocess and not self._warned_clip_approximation:
                self._warned_clip_approximation = True
                log.warning("CLIP input approximated from the detector input: the images were preprocessed "
                            "without the bundle's clip_preprocess (pipelines.preprocess.fit_to_clip)")
            return None
        if any(c is None for c in clips):
            raise ValueError("a batch mixes images with and without a CLIP input (Preprocessed.clip)")
        return stack_on(clips, self.device)  # type: ignore[arg-type]

    def _assemble(self, chunk: Sequence[Preprocessed], raw: RawOutput, timings: dict[str, float]
                  ) -> list[ImageResult]:
        boxes = boxes_to_source(raw.boxes, [p.transform for p in chunk]).tolist()
        texts = iter(decode_sentences(self.bundle.tokenizer, raw.token_ids, self.cfg.eos_token_id))
        selected, detected = raw.selected.tolist(), raw.detected.tolist()
        abnormal_probs, label_probs = raw.abnormal_probs.tolist(), raw.label_probs.tolist()
        abnormal = raw.abnormal.tolist()
        out = []
        for b, prep in enumerate(chunk):
            generated = {r: next(texts) for r in range(len(REGIONS)) if selected[b][r]}  # raw decoded text
            regions = tuple(
                RegionResult(name, tuple(boxes[b][r]), detected[b][r], selected[b][r], abnormal_probs[b][r],
                             generated[r].strip() if r in generated else None, abnormal[b][r])
                for r, name in enumerate(REGIONS)
            )
            out.append(ImageResult(
                regions=regions,
                report=self.assembler(generated.values()),  # in region (anatomical) order
                label_probs=dict(zip(CHEXPERT_LABELS, label_probs[b])),
                model_name=self.bundle.name,
                model_version=self.bundle.version,
                clinical_use=self.bundle.clinical_use,
                source_rows=prep.transform.source_rows,
                source_columns=prep.transform.source_columns,
                timings_ms=dict(timings),
            ))
        return out


def stack_on(tensors: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """``[B, ...]`` on ``device``. Host tensors bound for a GPU are stacked straight into pinned memory, so
    that the upload is one asynchronous DMA instead of a staged copy that holds the calling thread; tensors
    already on the device (preprocessed there) are stacked where they are."""
    if device.type == "cuda" and all(t.device.type == "cpu" for t in tensors):
        pinned = torch.empty((len(tensors), *tensors[0].shape), dtype=tensors[0].dtype, pin_memory=True)
        return torch.stack(list(tensors), out=pinned).to(device, non_blocking=True)
    return torch.stack([t.to(device) for t in tensors])


class CRRGPipeline:
    """:class:`pipelines.interface.Pipeline` over a bundle: decode + preprocess (threaded) + engine.

    ``preprocess_on_device`` (default: when the engine runs on CUDA) leaves only decoding to the host
    threads and maps, resizes and pads each image on the engine's device (:func:`pipelines.preprocess.preprocess`).
    A bundle with a ``clip_preprocess`` spec (an imported CLIP) gets its CLIP input made there too, from the
    same unit image.
    """

    def __init__(self, engine: Engine, preprocess_workers: int = 4, preprocess_on_device: bool | None = None
                 ) -> None:
        self.engine = engine
        self.model_name = engine.bundle.name
        self.model_version = engine.bundle.version
        self.clinical_use = engine.bundle.clinical_use
        self.views = engine.bundle.views
        self.preprocess_workers = preprocess_workers
        on_device = engine.device.type == "cuda" if preprocess_on_device is None else preprocess_on_device
        self.preprocess_device: torch.device | None = engine.device if on_device else None

    def analyse(self, datasets: Sequence[pydicom.Dataset]) -> list[ImageResult | NotInterpreted | PipelineError]:
        """Preprocess, pass every image through the content gate, run the models on those it accepts."""
        cfg = self.engine.cfg
        t0 = time.perf_counter()
        prepared = preprocess_many(datasets, cfg.image_size, cfg.image_mean, cfg.image_std,
                                   workers=self.preprocess_workers, device=self.preprocess_device,
                                   resize=cfg.image_resize, clip=cfg.clip_preprocess or None)
        pre_ms = (time.perf_counter() - t0) * 1000.0 / max(len(datasets), 1)
        good = [p for p in prepared if not isinstance(p, PreprocessError)]
        for exc in prepared:
            if isinstance(exc, PreprocessError):
                log.info("image not analysed: %s", exc)
        scores = dict(zip(map(id, good), self.engine.gate_scores(good)))
        gate = self.engine.bundle.gate
        accepted = [p for p in good if gate is None or gate.accepts(scores[id(p)])]
        results = iter(self.engine.run(accepted))
        out: list[ImageResult | NotInterpreted | PipelineError] = []
        for p in prepared:
            if isinstance(p, PreprocessError):
                out.append(p)
            elif gate is not None and not gate.accepts(scores[id(p)]):
                out.append(self.not_interpreted(scores[id(p)]))
            else:
                result = next(results)
                result.timings_ms["preprocess"] = pre_ms
                out.append(dataclasses.replace(result, gate_score=scores[id(p)],
                                               gate_threshold=gate.threshold if gate is not None else None))
        return out

    def not_interpreted(self, score: float | None) -> NotInterpreted:
        gate = self.engine.bundle.gate
        assert gate is not None and score is not None
        return NotInterpreted(
            reason=(f"the image is outside what the model was trained on: its out-of-distribution score "
                    f"{score:.1f} is above the content gate's threshold {gate.threshold:.1f} ({gate.margin:g} x "
                    f"the {gate.percentile:g}th percentile of in-distribution images)"),
            model_name=self.model_name, model_version=self.model_version, clinical_use=self.clinical_use,
            gate_score=score, gate_threshold=gate.threshold,
        )


def load_pipeline(bundle_dir: str | Path, device: str = "auto", batch_size: int = 8,
                  deterministic: bool = False) -> CRRGPipeline:
    """The real :class:`pipelines.interface.Pipeline`: load and verify the bundle, build the engine."""
    dev = resolve_device(device)
    bundle = load_bundle(bundle_dir, dev)
    log.info("loaded model bundle %s %s (preset %s) on %s", bundle.name, bundle.version, bundle.config.preset, dev)
    return CRRGPipeline(Engine(bundle, dev, batch_size, deterministic))
