"""Synthetic chest radiographs with known ground truth (boxes, findings, labels, report), for training,
evaluation, tests, demos and benchmarks. Every phantom is marked synthetic wherever it is written."""

from pipelines.phantoms.generator import Phantom, generate_phantom

__all__ = ["Phantom", "generate_phantom"]
