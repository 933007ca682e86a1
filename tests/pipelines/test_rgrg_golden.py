"""The golden-file hook: ``PACS_NODE_RGRG_GOLDEN=DIR python -m pytest tests/pipelines/test_rgrg_golden.py``
compares the node's bundle with outputs a user produced with RGRG's own code (layout: ``docs/rgrg.md``);
without it the test is skipped with that reason. The hook itself is exercised in ``test_rgrg_equivalence``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipelines.bundle import load_bundle
from pipelines.engine import Engine
from tests.pipelines.rgrg_golden import compare_case

GOLDEN = os.environ.get("PACS_NODE_RGRG_GOLDEN")


@pytest.mark.skipif(not GOLDEN, reason="PACS_NODE_RGRG_GOLDEN is not set: no outputs of RGRG's own code to compare "
                                       "with (see docs/rgrg.md)")
def test_bundle_reproduces_rgrgs_own_outputs():
    folder = Path(GOLDEN or "")
    bundle = Path(os.environ.get("PACS_NODE_RGRG_BUNDLE", folder / "bundle"))
    cases = sorted(folder.glob("*.npz"))
    assert cases, f"{folder} holds no <case>.npz"
    engine = Engine(load_bundle(bundle), os.environ.get("PACS_NODE_RGRG_DEVICE", "cpu"), batch_size=1,
                    precision="fp32", fast=False)
    atol = float(os.environ.get("PACS_NODE_RGRG_BOX_ATOL", "1e-3"))
    problems = [p for case in cases for p in compare_case(engine, case, atol)]
    assert not problems, "\n".join(problems)
