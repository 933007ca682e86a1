"""The fast inference parts: same outputs as the stock modules, fewer launches and FLOPs.

:class:`pipelines.engine.Engine` composes them (``Engine.fast_parts``); see ``docs/performance.md`` for what
each piece saves and what was measured.
"""

from pipelines.accel.decoder import StaticGreedyDecoder
from pipelines.accel.detector import FastDetector

__all__ = ["FastDetector", "StaticGreedyDecoder"]
