""":meth:`pipelines.engine.Engine.infer` on the fast path: same inputs, same :class:`RawOutput`.

:class:`FastInference` swaps in :class:`~pipelines.accel.detector.FastDetector` and
:class:`~pipelines.accel.decoder.StaticGreedyDecoder` (greedy decoding only; beam search stays on the stock
decoder) and leaves the region MLPs and CLIP as they are. :class:`Workload` pins the amount of work for
benchmarks — exactly ``regions`` selected regions per image (the top selector scores) and exactly ``tokens``
decoding steps — so that timings do not depend on what random weights happen to select or when they emit EOS.
It is never used for real reports.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor

from pipelines.accel.decoder import StaticGreedyDecoder
from pipelines.accel.detector import FastDetector
from pipelines.constants import NUM_REGIONS
from pipelines.models.detector import Detections


@dataclass(frozen=True)
class Workload:
    """Benchmark-only override: ``regions`` selected per image, ``tokens`` generated per region."""

    regions: int
    tokens: int

    def __post_init__(self) -> None:
        if not 0 <= self.regions <= NUM_REGIONS:
            raise ValueError(f"regions must be within 0..{NUM_REGIONS}")
        if self.tokens < 1:
            raise ValueError("tokens must be at least 1")


def select_regions(selector_logits: Tensor, detected: Tensor, threshold: float, workload: Workload | None
                   ) -> Tensor:
    """``[B,29]`` bool: detected regions with ``P(selected) > threshold``, or under a :class:`Workload` the
    ``regions`` highest-scoring regions of each image whatever their probability."""
    if workload is None:
        return (selector_logits.float().sigmoid() > threshold) & detected
    top = selector_logits.float().topk(workload.regions, dim=1).indices
    return torch.zeros_like(detected).scatter_(1, top, True)


def run_stages(engine, images: Tensor, detect: Callable[..., Detections],
               decode: Callable[[Tensor], Tensor], workload: Workload | None = None,
               timer: Callable[[str], AbstractContextManager] | None = None):
    """The body of :meth:`pipelines.engine.Engine.infer` with the detector and decoder passed in, so that the
    stock and the fast path (and the benchmark's per-stage timer) run one and the same composition."""
    from pipelines.engine import (
        RawOutput,  # the engine imports this module to route its hot path
    )

    m, stage = engine.model, timer or (lambda _name: nullcontext())
    with torch.autocast(engine.device.type, dtype=torch.bfloat16, enabled=engine.autocast):
        with stage("detector"):
            det = detect(images, timer) if timer is not None and getattr(detect, "timed", False) else detect(images)
        with stage("selector"):
            feats = det.features
            selected = select_regions(m.selector(feats), det.detected, engine.selection_threshold, workload)
            abnormal = m.abnormality(feats).float().sigmoid()
            chosen = feats[selected]
        with stage("decoder"):
            token_ids = decode(chosen)
        with stage("clip"):
            label_probs = m.clip.label_probs(images)
    return RawOutput(det.boxes.float(), det.detected, selected, abnormal, token_ids, label_probs.float())


class FastInference:
    """``infer(images[B,1,S,S], workload=None) -> RawOutput`` for an :class:`~pipelines.engine.Engine`.

    The decoder's matrix products use bfloat16 when the engine autocasts, else the weights' dtype."""

    def __init__(self, engine, cuda_graphs: bool = True, channels_last: bool | None = None) -> None:
        self.engine = engine
        model = engine.model
        nhwc = engine.device.type == "cuda" if channels_last is None else channels_last
        self.detector = FastDetector(model.detector, nhwc)
        dtype = torch.bfloat16 if engine.autocast else model.decoder.lm.lm_head.weight.dtype
        self.decoder = StaticGreedyDecoder(model.decoder, dtype, cuda_graphs=cuda_graphs)

    def decode(self, features: Tensor, workload: Workload | None = None) -> Tensor:
        eng = self.engine
        if workload is not None:
            return self.decoder.generate(features, workload.tokens, stop_at_eos=False)
        if eng.num_beams == 1:
            return self.decoder.generate(features, eng.max_new_tokens)
        return eng.model.decoder.generate(features, eng.max_new_tokens, eng.num_beams)

    @torch.inference_mode()
    def infer(self, images: Tensor, workload: Workload | None = None, timer=None):
        return run_stages(self.engine, images, self.detector.detect, lambda f: self.decode(f, workload),
                          workload, timer)
