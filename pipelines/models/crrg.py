"""The whole CRRG-CLIP model: detector -> region selector / abnormality classifier -> decoder, plus CLIP."""

from __future__ import annotations

from torch import nn

from pipelines.models.classifiers import RegionMLP
from pipelines.models.clip import ChestCLIP
from pipelines.models.config import ModelConfig
from pipelines.models.decoder import ReportDecoder
from pipelines.models.detector import RegionDetector

#: Top-level submodules; a bundle stores one ``<name>.safetensors`` per entry.
MODULES: tuple[str, ...] = ("detector", "selector", "abnormality", "decoder", "clip")


class CRRGModel(nn.Module):
    """Holds the five modules; inference is orchestrated by :class:`pipelines.engine.Engine`, training by
    the trainer, so this class is deliberately only a container with a config."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.detector = RegionDetector(cfg)
        self.selector = RegionMLP(cfg.feature_dim, cfg.mlp_hidden)
        self.abnormality = RegionMLP(cfg.feature_dim, cfg.mlp_hidden)
        self.decoder = ReportDecoder(cfg)
        self.clip = ChestCLIP(cfg)

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> CRRGModel:
        return cls(cfg)
