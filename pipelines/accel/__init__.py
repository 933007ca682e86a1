"""The fast inference path: same outputs as :meth:`pipelines.engine.Engine.infer`, fewer launches and FLOPs.

See ``docs/performance.md`` for what each piece saves and what was measured.
"""

from pipelines.accel.decoder import StaticGreedyDecoder
from pipelines.accel.detector import FastDetector
from pipelines.accel.engine import FastInference, Workload, select_regions

__all__ = ["FastDetector", "FastInference", "StaticGreedyDecoder", "Workload", "select_regions"]
