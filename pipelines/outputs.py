"""What one inference pass over a batch computes, as tensors, and the parts that compute it.

Kept apart from :mod:`pipelines.engine` (which composes the parts) and :mod:`pipelines.accel` (which provides
fast ones) so that both, and the benchmarks, can name these types without importing each other.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from pipelines.models.detector import Detections

#: ``timer(stage_name)`` -> a context manager around that stage (benchmark profiling); ``None`` in production.
StageTimer = Callable[[str], AbstractContextManager]


@dataclass
class RawOutput:
    """What :meth:`pipelines.engine.Engine.infer` computes for a batch of ``B`` images (model pixels)."""

    boxes: Tensor  # [B, 29, 4] float32, x1 y1 x2 y2
    detected: Tensor  # [B, 29] bool
    selected: Tensor  # [B, 29] bool
    abnormal_probs: Tensor  # [B, 29] float32
    token_ids: Tensor  # [N, T] int64 for the N selected regions in (image, region) row-major order
    label_probs: Tensor  # [B, 14] float32
    abnormal: Tensor  # [B, 29] bool: abnormality logit above the bundle's threshold (RGRG: > -1)

    def to(self, device: str | torch.device) -> RawOutput:
        return RawOutput(*(t.to(device) for t in (self.boxes, self.detected, self.selected, self.abnormal_probs,
                                                   self.token_ids, self.label_probs, self.abnormal)))


class Detect(Protocol):
    """``images[B,1,S,S]`` (normalised, padded) -> :class:`Detections`. A detector whose class sets
    ``timed = True`` is also handed the stage timer, to time its own sub-stages."""

    def __call__(self, images: Tensor) -> Detections: ...


class Decode(Protocol):
    """``features[N,D]`` -> token ids ``[N,T]`` after BOS, through EOS, right-padded with PAD."""

    def __call__(self, features: Tensor) -> Tensor: ...


class Select(Protocol):
    """``selector_logits[B,29]``, ``detected[B,29]`` -> ``[B,29]`` bool: the regions that get a sentence."""

    def __call__(self, selector_logits: Tensor, detected: Tensor) -> Tensor: ...
