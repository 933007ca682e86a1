"""The inference engine and the Pipeline it implements."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
import torch

from pipelines.bundle import load_bundle
from pipelines.constants import CHEXPERT_LABELS, REGIONS
from pipelines.engine import CRRGPipeline, Engine, load_pipeline
from pipelines.interface import ImageResult, PreprocessError
from pipelines.preprocess import fit_to_model
from tests.pipelines.reference import infer_reference
from tests.pipelines.test_preprocess import make_ds


@pytest.fixture(scope="module")
def engine(tiny_bundle):
    return Engine(load_bundle(tiny_bundle), device="cpu", batch_size=4, deterministic=True)


def _prepared(engine, n, seed=0):
    """``n`` synthetic radiographs of different sizes and aspect ratios."""
    rng = np.random.default_rng(seed)
    cfg = engine.cfg
    shapes = [(200, 160), (160, 240), (300, 300), (90, 70), (128, 256)]
    return [fit_to_model(rng.random(shapes[i % len(shapes)], dtype=np.float32), cfg.image_size, cfg.image_mean,
                         cfg.image_std) for i in range(n)]


def test_results_have_the_interface_shape(engine):
    prepared = _prepared(engine, 3)
    results = engine.run(prepared)
    assert len(results) == 3
    for prep, result in zip(prepared, results):
        assert isinstance(result, ImageResult)
        assert [r.name for r in result.regions] == list(REGIONS)
        assert list(result.label_probs) == list(CHEXPERT_LABELS)
        assert all(0.0 < p < 1.0 for p in result.label_probs.values())
        rows, cols = prep.transform.source_rows, prep.transform.source_columns
        assert (result.source_rows, result.source_columns) == (rows, cols)
        for region in result.regions:
            x1, y1, x2, y2 = region.box
            assert 0 <= x1 <= x2 <= cols and 0 <= y1 <= y2 <= rows
            assert 0.0 <= region.abnormal_prob <= 1.0
            assert (region.sentence is not None) == region.selected
            if region.selected:
                assert region.detected
            if not region.detected:
                assert region.box == pytest.approx((0.0, 0.0, cols, rows), abs=1e-3)
        assert result.selected_regions, "the test bundle selects every detected region"
        assert result.report == engine.assembler(r.sentence for r in result.selected_regions)
        assert result.model_name == "tiny-test" and result.clinical_use is False


def test_batch_results_equal_per_image_results(engine):
    prepared = _prepared(engine, 5)
    batched = engine.run(prepared)  # chunks of 4 + 1
    singles = [engine.run([p])[0] for p in prepared]
    for b, s in zip(batched, singles):
        assert b.report == s.report
        for rb, rs in zip(b.regions, s.regions):
            assert (rb.detected, rb.selected, rb.sentence) == (rs.detected, rs.selected, rs.sentence)
            assert rb.box == pytest.approx(rs.box, abs=1e-3)
            assert rb.abnormal_prob == pytest.approx(rs.abnormal_prob, abs=1e-5)
        assert list(b.label_probs.values()) == pytest.approx(list(s.label_probs.values()), abs=1e-5)


def test_vectorised_path_equals_naive_reference(engine):
    images = torch.stack([p.tensor for p in _prepared(engine, 2, seed=1)])
    fast, slow = engine.infer(images), infer_reference(engine, images)
    assert torch.equal(fast.detected, slow.detected) and torch.equal(fast.selected, slow.selected)
    assert torch.allclose(fast.boxes, slow.boxes, atol=1e-3)
    assert torch.allclose(fast.abnormal_probs, slow.abnormal_probs, atol=1e-5)
    assert torch.allclose(fast.label_probs, slow.label_probs, atol=1e-5)
    assert fast.token_ids.shape[0] == int(fast.selected.sum())
    width = min(fast.token_ids.shape[1], slow.token_ids.shape[1])
    assert torch.equal(fast.token_ids[:, :width], slow.token_ids[:, :width])


def test_pipeline_puts_errors_in_their_slots(tiny_bundle):
    pipeline = load_pipeline(tiny_bundle, device="cpu", batch_size=2, deterministic=True)
    assert (pipeline.model_name, pipeline.model_version) == ("tiny-test", "0.1")
    good = make_ds(np.arange(120 * 100, dtype=np.uint16).reshape(120, 100))
    bad = make_ds(np.arange(120 * 100, dtype=np.uint16).reshape(120, 100), "RGB")
    out = pipeline.analyse([good, bad, good])
    assert isinstance(out[0], ImageResult) and isinstance(out[2], ImageResult)
    assert isinstance(out[1], PreprocessError) and "not grayscale" in str(out[1])
    assert out[0].report == out[2].report
    assert set(out[0].timings_ms) >= {"preprocess", "inference"}


def test_preprocessing_on_the_engines_device_gives_the_same_results(tiny_bundle):
    """The GPU host's split (decode on the host, map/resize/pad on the device), exercised on the CPU."""
    host = load_pipeline(tiny_bundle, device="cpu", batch_size=2, deterministic=True)
    on_device = CRRGPipeline(host.engine, preprocess_on_device=True)
    assert host.preprocess_device is None and on_device.preprocess_device == host.engine.device
    datasets = [make_ds(np.random.default_rng(i).integers(0, 4096, (130, 100)).astype(np.uint16), "MONOCHROME1",
                        WindowCenter=2000, WindowWidth=3000) for i in range(3)]
    for a, b in zip(host.analyse(datasets), on_device.analyse(datasets)):
        assert (a.regions, a.report, a.label_probs) == (b.regions, b.report, b.label_probs)


def test_real_rg1_in_three_transfer_syntaxes_through_the_pipeline(tiny_bundle, real_dicom_dir):
    pipeline = load_pipeline(tiny_bundle, device="cpu", batch_size=3, deterministic=True)
    datasets = [pydicom.dcmread(real_dicom_dir / f"RG1_{name}.dcm") for name in ("UNCR", "J2KR", "J2KI")]
    uncr, j2kr, j2ki = pipeline.analyse(datasets)
    for result in (uncr, j2kr, j2ki):
        assert isinstance(result, ImageResult)
        assert (result.source_rows, result.source_columns) == (1955, 1841)
        assert all(0 <= r.box[2] <= 1841 and 0 <= r.box[3] <= 1955 for r in result.regions)
    assert uncr.regions == j2kr.regions and uncr.report == j2kr.report  # identical input tensors
    assert uncr.label_probs == j2kr.label_probs


def test_bf16_autocast_path_runs(tiny_bundle):
    """The CUDA precision, exercised on the CPU so that dtype mistakes show up without a GPU."""
    fp32 = Engine(load_bundle(tiny_bundle), device="cpu", batch_size=4)
    assert not fp32.autocast
    images = torch.stack([p.tensor for p in _prepared(fp32, 3, seed=2)])
    for num_beams in (1, 2):
        bf16 = Engine(load_bundle(tiny_bundle), device="cpu", batch_size=4, precision="bf16", num_beams=num_beams)
        assert bf16.autocast
        out = bf16.infer(images)
        assert out.boxes.dtype == out.label_probs.dtype == out.abnormal_probs.dtype == torch.float32
        assert out.token_ids.shape[0] == int(out.selected.sum()) > 0
    reference = fp32.infer(images)
    assert torch.allclose(out.label_probs, reference.label_probs, atol=0.05)
