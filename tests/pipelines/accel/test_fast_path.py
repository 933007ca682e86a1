"""The fast path computes what the stock path computes: checked piece by piece against torchvision and the
stock modules, then whole, on the tiny preset in float32 on the CPU (the bench repeats this on a GPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.ops import nms, roi_align

from bench.workload import Workload
from pipelines.accel import FastDetector, StaticGreedyDecoder
from pipelines.accel.detector import greedy_nms, roi_align_weights
from pipelines.bundle import DEFAULT_THRESHOLDS, Bundle
from pipelines.engine import Engine, ThresholdSelection
from pipelines.models import CRRGModel, preset


def _boxes(n: int, size: float, gen: torch.Generator) -> torch.Tensor:
    xy = torch.rand((n, 2), generator=gen) * size
    wh = torch.rand((n, 2), generator=gen) * size / 2 + 0.1
    return torch.cat([xy, xy + wh], dim=1)


@pytest.fixture(scope="module")
def model() -> CRRGModel:
    torch.manual_seed(0)
    return CRRGModel.from_config(preset("tiny")).eval()


@pytest.fixture(scope="module")
def engine(model) -> Engine:
    manifest = {"name": "tiny-random", "version": "0", "clinical_use": False,
                "decoding": {"num_beams": 1, "max_new_tokens": 10}}
    bundle = Bundle(Path("<random>"), manifest, model.config, model, None, dict(DEFAULT_THRESHOLDS))
    return Engine(bundle, "cpu", batch_size=4)


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.randn((n, 1, 64, 64), generator=torch.Generator().manual_seed(seed))


# -- pieces -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(3))
def test_greedy_nms_equals_torchvision_nms(seed):
    gen = torch.Generator().manual_seed(seed)
    boxes = torch.stack([_boxes(150, 64, gen) for _ in range(3)])
    scores = torch.rand((3, 150), generator=gen)
    order = scores.argsort(dim=1, descending=True)
    boxes = boxes.gather(1, order.unsqueeze(-1).expand(-1, -1, 4))
    valid = torch.rand((3, 150), generator=gen) > 0.1
    keep = greedy_nms(boxes, valid, 0.5)
    for b in range(3):
        idx = valid[b].nonzero().squeeze(1)
        expected = idx[nms(boxes[b, idx], torch.linspace(1, 0, 150)[idx], 0.5)]
        assert keep[b].nonzero().squeeze(1).tolist() == sorted(expected.tolist())


def test_separable_weights_reproduce_roi_align():
    gen = torch.Generator().manual_seed(1)
    fmap = torch.randn((1, 5, 8, 8), generator=gen, dtype=torch.float64)
    boxes = torch.cat([
        _boxes(40, 64, gen).double(),
        torch.tensor([[0.0, 0.0, 64.0, 64.0], [60.0, 60.0, 70.0, 75.0], [-5.0, -3.0, 10.0, 4.0],
                      [10.0, 10.0, 10.2, 10.3], [63.0, 0.0, 64.0, 64.0]], dtype=torch.float64),
    ])
    expected = roi_align(fmap, [boxes], output_size=4, spatial_scale=1 / 8, sampling_ratio=2, aligned=False)
    wy, wx = roi_align_weights(boxes, 1 / 8, 8, 8, 4, 2)
    got = torch.einsum("piy,pjx,cyx->pcij", wy, wx, fmap[0])
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mode", ["g", "roi", "auto"])
@pytest.mark.parametrize("seed", range(2))
def test_fast_detector_equals_stock_detector(model, seed, mode):
    images = _images(5, seed)
    with torch.inference_mode():
        ref = model.detector(images)
        fast = FastDetector(model.detector, box_head_mode=mode)
        maps = model.detector.feature_maps(images)
        proposals, _ = model.detector.rpn(model.detector._image_list(images), maps)
        boxes, valid = fast.proposals(images, maps["0"])
        got = fast.detect(images)
    for b in range(5):
        assert torch.equal(boxes[b][valid[b]], proposals[b])
    assert torch.equal(got.detected, ref.detected)
    assert (got.boxes - ref.boxes).abs().max() <= 1e-3
    torch.testing.assert_close(got.scores, ref.scores, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.features, ref.features, rtol=1e-4, atol=1e-5)


def test_nhwc_unfused_and_fused_backbones_agree(model):
    images = _images(3, 5)
    with torch.inference_mode():
        ref = model.detector(images)
        for fast in (FastDetector(model.detector, channels_last=True),
                     FastDetector(model.detector, fuse_batch_norm=False)):
            got = fast.detect(images)
            assert torch.equal(got.detected, ref.detected)
            assert (got.boxes - ref.boxes).abs().max() <= 1e-3


def test_static_decoder_equals_stock_greedy(model):
    feats = torch.randn((13, model.config.feature_dim), generator=torch.Generator().manual_seed(3))
    dec = model.decoder
    fast = StaticGreedyDecoder(dec)
    with torch.inference_mode():
        assert torch.equal(fast.generate(feats, 9), dec.generate(feats, 9))
        fixed = fast.generate(feats, 9, stop_at_eos=False)
        assert fixed.shape == (13, 9)
        assert fast.generate(feats[:0], 9).shape == (0, 0)


def test_static_decoder_stops_where_the_stock_decoder_stops(model):
    """With EOS made likely, every sequence ends early; both return the same (shorter) width."""
    torch.manual_seed(4)
    cfg = model.config
    m = CRRGModel.from_config(cfg).eval()
    with torch.no_grad():
        m.decoder.lm.transformer.wte.weight[cfg.eos_token_id] *= 40.0  # tied lm_head row: EOS wins soon
    feats = torch.randn((7, cfg.feature_dim))
    with torch.inference_mode():
        ref = m.decoder.generate(feats, 11)
        got = StaticGreedyDecoder(m.decoder).generate(feats, 11)
    assert ref.shape[1] < 11
    assert torch.equal(got, ref)


# -- whole -----------------------------------------------------------------------------------------------

def _assert_same(a, b) -> None:
    assert torch.equal(a.selected, b.selected) and torch.equal(a.detected, b.detected)
    assert (a.boxes - b.boxes).abs().max() <= 1.0
    assert torch.equal(a.token_ids, b.token_ids)
    torch.testing.assert_close(a.abnormal_probs, b.abnormal_probs, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.label_probs, b.label_probs)


def test_fast_inference_equals_engine_infer(engine):
    images = _images(4, 7)
    _assert_same(engine.infer(images), engine.with_parts(engine.fast_parts()).infer(images))


def test_workload_fixes_regions_and_tokens(engine):
    images = _images(3, 8)
    out = Workload(regions=5, tokens=6).fast(engine).infer(images)
    assert out.selected.sum(1).tolist() == [5, 5, 5]
    assert out.token_ids.shape == (15, 6)


def test_select_regions_threshold_and_workload():
    logits = torch.tensor([[2.0, -3.0, 0.5, 1.0]])
    detected = torch.tensor([[True, True, False, True]])
    assert ThresholdSelection(0.0)(logits, detected).tolist() == [[True, False, False, True]]
    assert Workload(2, 1).select(logits, detected).tolist() == [[True, False, False, True]]
    with pytest.raises(ValueError, match="regions"):
        Workload(30, 1)
