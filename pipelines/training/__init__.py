"""Training of the CRRG-CLIP stack (RGRG's stages) on phantoms or a MIMIC-CXR + Chest ImaGenome tree.

Modules: :mod:`~pipelines.training.data` (sources, model input), :mod:`~pipelines.training.trainer` (stages,
checkpoints, export), :mod:`~pipelines.training.cli` (commands). Nothing heavy is imported here.
"""
