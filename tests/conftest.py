"""Fixtures shared by every test package: the real data in ``../shared`` (skipped when absent)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import SHARED


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not (SHARED / "data").is_dir():
        pytest.skip(f"../shared is absent ({SHARED}): the real-data tests need it")
    return SHARED


@pytest.fixture(scope="session")
def real_dicom_dir(shared_dir: Path) -> Path:
    return shared_dir / "data" / "real-dicom"


@pytest.fixture(scope="session")
def gpt2_bpe_dir(shared_dir: Path) -> Path:
    return shared_dir / "data" / "gpt2-bpe"
