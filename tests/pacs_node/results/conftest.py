"""Result objects for the real chest CR in ../shared, written once per session for the validators."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread

from pacs_node.results import ResultOptions, build_result_objects, comprehensive_fallback
from pipelines.interface import FakePipeline, ImageResult


@pytest.fixture(scope="session")
def real_source(real_dicom_dir: Path) -> Dataset:
    return dcmread(real_dicom_dir / "RG1_UNCR.dcm")


@pytest.fixture(scope="session")
def real_result(real_source: Dataset) -> ImageResult:
    result = FakePipeline().analyse([real_source])[0]
    assert isinstance(result, ImageResult)
    return dataclasses.replace(result, impression="No acute cardiopulmonary abnormality.")


@pytest.fixture(scope="session")
def real_objects(real_source: Dataset, real_result: ImageResult) -> dict[str, Dataset]:
    """kind -> dataset: ai-sr, narrative-sr, kos, gsps, and the Comprehensive SR fallback."""
    objects = build_result_objects(real_source, real_result, ResultOptions())
    by_kind = dict(zip(("ai-sr", "narrative-sr", "kos", "gsps"), objects, strict=True))
    by_kind["fallback-sr"] = comprehensive_fallback(by_kind["ai-sr"])
    return by_kind


@pytest.fixture(scope="session")
def real_files(real_objects: dict[str, Dataset], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("results")
    files = {}
    for kind, ds in real_objects.items():
        files[kind] = out / f"{kind}.dcm"
        ds.save_as(files[kind], enforce_file_format=True)
    return files
