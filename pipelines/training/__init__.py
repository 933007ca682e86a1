"""Training of the CRRG-CLIP stack (RGRG's stages) on phantoms or a MIMIC-CXR + Chest ImaGenome tree."""

from pipelines.training.data import MimicImaGenomeSource, PhantomSource, Sample, parse_dataset
from pipelines.training.trainer import STAGES, StagePlan, Trainer, TrainSettings

__all__ = ["MimicImaGenomeSource", "PhantomSource", "STAGES", "Sample", "StagePlan", "TrainSettings", "Trainer",
           "parse_dataset"]
