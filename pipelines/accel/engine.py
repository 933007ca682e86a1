""":meth:`pipelines.engine.Engine.infer` on the fast path: same inputs, same :class:`RawOutput`.

:class:`FastInference` swaps in :class:`~pipelines.accel.detector.FastDetector` and
:class:`~pipelines.accel.decoder.StaticGreedyDecoder` (greedy decoding only; beam search stays on the stock
decoder) and leaves the region MLPs and CLIP as they are. :class:`Workload` pins the amount of work for
benchmarks — exactly ``regions`` selected regions per image (the top selector scores) and exactly ``tokens``
decoding steps — so that timings do not depend on what random weights happen to select or when they emit EOS.
It is never used for real reports.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pipelines.accel.decoder import StaticGreedyDecoder
from pipelines.accel.detector import FastDetector
from pipelines.constants import NUM_REGIONS


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


class FastInference:
    """``infer(images[B,1,S,S], workload=None) -> RawOutput`` for an :class:`~pipelines.engine.Engine`."""

    def __init__(self, engine, cuda_graphs: bool = True) -> None:
        self.engine = engine
        model = engine.model
        self.detector = FastDetector(model.detector)
        self.decoder = StaticGreedyDecoder(model.decoder, cuda_graphs=cuda_graphs)

    @torch.inference_mode()
    def infer(self, images: Tensor, workload: Workload | None = None):
        from pipelines.engine import RawOutput  # the engine imports this module to route its hot path

        eng, m = self.engine, self.engine.model
        with torch.autocast(eng.device.type, dtype=torch.bfloat16, enabled=eng.autocast):
            det = self.detector.detect(images)
            feats = det.features
            selected = select_regions(m.selector(feats), det.detected, eng.selection_threshold, workload)
            abnormal = m.abnormality(feats).float().sigmoid()
            chosen = feats[selected]
            if workload is not None:
                token_ids = self.decoder.generate(chosen, workload.tokens, stop_at_eos=False)
            elif eng.num_beams == 1:
                token_ids = self.decoder.generate(chosen, eng.max_new_tokens)
            else:
                token_ids = m.decoder.generate(chosen, eng.max_new_tokens, eng.num_beams)
            label_probs = m.clip.label_probs(images)
        return RawOutput(det.boxes.float(), det.detected, selected, abnormal, token_ids, label_probs.float())
