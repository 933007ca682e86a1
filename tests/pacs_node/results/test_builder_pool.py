"""Result objects built in spawned builder processes are the ones the worker would build itself."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import pydicom
import pytest

from pacs_node.results.builder_pool import ResultBuilders, auto_processes, pixel_free
from pacs_node.results.options import ResultOptions
from pipelines.interface import FakePipeline
from tests.pacs_node.helpers import make_cr

#: Set at build time, so two builds of the same result differ in these and nothing else.
_BUILD_TIME = {"InstanceCreationDate", "InstanceCreationTime", "ContentDate", "ContentTime",
               "PresentationCreationDate", "PresentationCreationTime", "ContributionDateTime"}


def _comparable(data: bytes) -> list[tuple[str, object]]:
    ds = pydicom.dcmread(io.BytesIO(data))
    return [(e.keyword, e.value) for e in ds.iterall() if e.VR != "SQ" and e.keyword not in _BUILD_TIME]


def test_a_pool_builds_what_the_worker_builds_and_keeps_errors_in_their_slots(tmp_path: Path) -> None:
    sources = [make_cr(tmp_path / f"cr{i}.dcm") for i in range(3)]
    results = FakePipeline().analyse(sources)
    wrong_size = dataclasses.replace(results[1], source_rows=results[1].source_rows + 1)
    items = [(sources[0], results[0]), (sources[1], wrong_size), (sources[2], results[2])]
    options = ResultOptions()
    with ResultBuilders(0, options) as here, ResultBuilders(2, options) as pool:
        local, pooled = here.build(items), pool.build(items)
    for mine, theirs in ((local[0], pooled[0]), (local[2], pooled[2])):
        assert isinstance(mine, list) and isinstance(theirs, list) and len(mine) == len(theirs) >= 2
        assert [b.fields for b in mine] == [b.fields for b in theirs]
        assert [_comparable(b.data) for b in mine] == [_comparable(b.data) for b in theirs]
    assert isinstance(local[1], ValueError) and isinstance(pooled[1], ValueError)
    assert str(local[1]) == str(pooled[1])


def test_the_pool_is_sent_headers_not_pixels(tmp_path: Path) -> None:
    source = make_cr(tmp_path / "cr.dcm")
    header = pixel_free(source)
    assert "PixelData" in source and "PixelData" not in header
    assert header.SOPInstanceUID == source.SOPInstanceUID and header.file_meta == source.file_meta


@pytest.mark.parametrize("device, cores, expected", [("cpu", 64, 0), ("cuda", 2, 1), ("cuda", 8, 6), ("cuda", 64, 16)])
def test_builders_are_automatic_only_where_a_gpu_runs_the_models(monkeypatch: pytest.MonkeyPatch, device: str,
                                                                 cores: int, expected: int) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: cores)
    assert auto_processes(device) == expected
