"""Batched inference: preprocessed images in, :class:`pipelines.interface.ImageResult` out.

The hot path (:meth:`Engine.infer`) is a fixed sequence of whole-batch tensor operations — detector on ``B``
images, both region MLPs on ``B x 29`` features, one decoder call over *every* selected region of the batch,
CLIP on ``B`` images — with no Python loop over images, regions or boxes and a single host transfer at the
end. :meth:`Engine.infer_reference` is the deliberately naive equivalent (one image, one region at a time)
that the optimised path is checked and benchmarked against.

On CUDA the models run under bf16 autocast; on CPU in fp32 (``precision`` overrides either way). ``deterministic=True`` seeds torch and switches
on deterministic algorithms (a process-wide setting) for reproducible tests.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
import torch
from torch.nn.utils.rnn import pad_sequence

from pipelines.accel import FastInference
from pipelines.bundle import Bundle, load_bundle
from pipelines.constants import CHEXPERT_LABELS, NUM_REGIONS, REGIONS
from pipelines.gate import pooled_features
from pipelines.interface import ImageResult, NotInterpreted, PipelineError, PreprocessError, RegionResult
from pipelines.preprocess import Preprocessed, boxes_to_source, preprocess_many
from pipelines.tokenizer import decode_sentences

log = logging.getLogger(__name__)


@dataclass
class RawOutput:
    """What :meth:`Engine.infer` computes for a batch of ``B`` images, still as tensors (model pixels)."""

    boxes: torch.Tensor  # [B, 29, 4]
    detected: torch.Tensor  # [B, 29] bool
    selected: torch.Tensor  # [B, 29] bool
    abnormal_probs: torch.Tensor  # [B, 29]
    token_ids: torch.Tensor  # [N, T] for the N selected regions in (image, region) row-major order
    label_probs: torch.Tensor  # [B, 14]

    def to(self, device: str | torch.device) -> RawOutput:
        return RawOutput(*(t.to(device) for t in (self.boxes, self.detected, self.selected, self.abnormal_probs,
                                                   self.token_ids, self.label_probs)))


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


class Engine:
    """Runs a loaded :class:`~pipelines.bundle.Bundle` on batches of :class:`Preprocessed` images."""

    def __init__(self, bundle: Bundle, device: str | torch.device = "cpu", batch_size: int = 8,
                 deterministic: bool = False, num_beams: int | None = None, precision: str = "auto") -> None:
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
        self.selection_threshold = float(bundle.thresholds["selection"])
        #: bf16 autocast around the models: on CUDA by default ("auto"), on request elsewhere
        self.autocast = precision == "bf16" or (precision == "auto" and self.device.type == "cuda")
        #: On CUDA with greedy decoding :meth:`infer` runs :class:`pipelines.accel.FastInference` (same
        #: outputs; static KV cache in CUDA graphs, batched proposal filtering; docs/performance.md).
        self.fast_path = self.device.type == "cuda" and self.num_beams == 1
        self._fast: FastInference | None = None

    # -- tensors in, tensors out ----------------------------------------------------------------------------
    @torch.inference_mode()
    def infer(self, images: torch.Tensor) -> RawOutput:
        """The batched hot path on ``images[B,1,S,S]`` (already on :attr:`device`)."""
        if self.fast_path:
            if self._fast is None:
                self._fast = FastInference(self)
            return self._fast.infer(images)
        m = self.model
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            det = m.detector(images)
            feats = det.features
            selected = (m.selector(feats).float().sigmoid() > self.selection_threshold) & det.detected
            abnormal = m.abnormality(feats).float().sigmoid()
            token_ids = m.decoder.generate(feats[selected], self.max_new_tokens, self.num_beams)
            label_probs = m.clip.label_probs(images)
        return RawOutput(det.boxes.float(), det.detected, selected, abnormal, token_ids, label_probs.float())

    @torch.inference_mode()
    def infer_reference(self, images: torch.Tensor) -> RawOutput:
        """Unoptimised reference: one image and one selected region at a time, same arithmetic."""
        parts = [self._reference_one(images[i:i + 1]) for i in range(images.shape[0])]
        sentences = [s for *_, image_sentences in parts for s in image_sentences]
        token_ids = (pad_sequence(sentences, batch_first=True, padding_value=self.cfg.pad_token_id) if sentences
                     else torch.empty((0, 0), dtype=torch.long, device=images.device))
        boxes, detected, selected, abnormal, label_probs = (torch.cat(column) for column in zip(*(p[:5] for p in parts)))
        return RawOutput(boxes, detected, selected, abnormal, token_ids, label_probs)

    def _reference_one(self, image: torch.Tensor):
        m = self.model
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            det = m.detector(image)
            selected = torch.zeros((1, NUM_REGIONS), dtype=torch.bool, device=image.device)
            abnormal = torch.zeros((1, NUM_REGIONS), device=image.device)
            sentences = []
            for r in range(NUM_REGIONS):
                feat = det.features[0, r:r + 1]
                abnormal[0, r] = m.abnormality(feat).float().sigmoid()[0]
                if det.detected[0, r] and m.selector(feat).float().sigmoid()[0] > self.selection_threshold:
                    selected[0, r] = True
                    sentences.append(m.decoder.generate(feat, self.max_new_tokens, self.num_beams)[0])
            label_probs = m.clip.label_probs(image).float()
        return det.boxes.float(), det.detected, selected, abnormal, label_probs, sentences

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
    def run(self, batch: Sequence[Preprocessed], reference: bool = False) -> list[ImageResult]:
        """Results in input order, in chunks of :attr:`batch_size`; boxes in source pixel coordinates."""
        results: list[ImageResult] = []
        for start in range(0, len(batch), self.batch_size):
            chunk = batch[start:start + self.batch_size]
            t0 = time.perf_counter()
            images = stack_on([p.tensor for p in chunk], self.device)
            raw = (self.infer_reference if reference else self.infer)(images).to("cpu")
            elapsed_ms = (time.perf_counter() - t0) * 1000.0 / len(chunk)
            results += self._assemble(chunk, raw, {"inference": elapsed_ms})
        return results

    def _assemble(self, chunk: Sequence[Preprocessed], raw: RawOutput, timings: dict[str, float]
                  ) -> list[ImageResult]:
        boxes = boxes_to_source(raw.boxes, [p.transform for p in chunk]).tolist()
        sentences = iter(decode_sentences(self.bundle.tokenizer, raw.token_ids, self.cfg.eos_token_id))
        selected, detected = raw.selected.tolist(), raw.detected.tolist()
        abnormal, label_probs = raw.abnormal_probs.tolist(), raw.label_probs.tolist()
        out = []
        for b, prep in enumerate(chunk):
            regions = tuple(
                RegionResult(name, tuple(boxes[b][r]), detected[b][r], selected[b][r], abnormal[b][r],
                             next(sentences) if selected[b][r] else None)
                for r, name in enumerate(REGIONS)
            )
            out.append(ImageResult(
                regions=regions,
                report=assemble_report(r.sentence for r in regions if r.selected),
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


def assemble_report(sentences) -> str:
    """Sentences in the given (anatomical) order, empty ones dropped, repeats (ignoring case, spacing and
    the final full stop) kept once; each ends with a full stop."""
    seen: set[str] = set()
    kept = []
    for sentence in sentences:
        text = " ".join((sentence or "").split())
        key = text.lower().rstrip(".").strip()
        if not key or key in seen:
            continue
        seen.add(key)
        kept.append(text if text.endswith(".") else text + ".")
    return " ".join(kept)


class CRRGPipeline:
    """:class:`pipelines.interface.Pipeline` over a bundle: decode + preprocess (threaded) + engine.

    ``preprocess_on_device`` (default: when the engine runs on CUDA) leaves only decoding to the host
    threads and maps, resizes and pads each image on the engine's device (:func:`pipelines.preprocess.preprocess`).
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
                                   workers=self.preprocess_workers, device=self.preprocess_device)
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
