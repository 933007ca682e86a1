"""A fixed amount of work per image for benchmarks: timings that do not depend on what random weights happen to
select or when they emit EOS. Never used for real reports."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from torch import Tensor

from pipelines.constants import NUM_REGIONS
from pipelines.engine import Engine, EngineParts


@dataclass(frozen=True)
class Workload:
    """Exactly ``regions`` selected regions per image (the top selector scores, whatever their probability) and
    exactly ``tokens`` greedy decoding steps per region."""

    regions: int
    tokens: int

    def __post_init__(self) -> None:
        if not 0 <= self.regions <= NUM_REGIONS:
            raise ValueError(f"regions must be within 0..{NUM_REGIONS}")
        if self.tokens < 1:
            raise ValueError("tokens must be at least 1")

    def select(self, selector_logits: Tensor, detected: Tensor) -> Tensor:
        """``[B,29]`` bool: the ``regions`` highest-scoring regions of each image, detected or not."""
        top = selector_logits.float().topk(self.regions, dim=1).indices
        return detected.new_zeros(detected.shape).scatter_(1, top, True)

    def stock(self, engine: Engine) -> Engine:
        """``engine``'s stock detector with this workload's selection and ``tokens`` greedy steps (the stock
        decoder stops early once every sequence has ended; compare sequences up to their EOS)."""
        parts = engine.stock_parts()
        decoder = partial(engine.model.decoder.generate, max_new_tokens=self.tokens, num_beams=1)
        return engine.with_parts(EngineParts(parts.detector, self.select, decoder))

    def fast(self, engine: Engine, cuda_graphs: bool = True, channels_last: bool | None = None) -> Engine:
        """``engine``'s fast detector with this workload's selection and exactly ``tokens`` steps per region."""
        decoder = partial(engine.fast_decoder(cuda_graphs).generate, steps=self.tokens, stop_at_eos=False)
        return engine.with_parts(EngineParts(engine.fast_detector(channels_last), self.select, decoder))
