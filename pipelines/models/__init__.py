"""The CRRG-CLIP modules (see ``docs/architecture.md``, section *Pipelines*)."""

from pipelines.models.classifiers import RegionMLP
from pipelines.models.clip import ChestCLIP
from pipelines.models.config import ConfigError, ModelConfig, preset
from pipelines.models.crrg import MODULES, CRRGModel
from pipelines.models.decoder import ReportDecoder
from pipelines.models.detector import Detections, RegionDetector

__all__ = [
    "MODULES",
    "CRRGModel",
    "ChestCLIP",
    "ConfigError",
    "Detections",
    "ModelConfig",
    "RegionDetector",
    "RegionMLP",
    "ReportDecoder",
    "preset",
]
