"""An imported RGRG checkpoint computes what RGRG's code computes: the node's bundle, through the importer and
the engine, against :mod:`tests.pipelines.rgrg_reference` on a synthetic RGRG-format checkpoint biased so that
all 29 regions are detected, some are selected and some abnormal, and sentences end at varied lengths
(:mod:`tests.pipelines.rgrg_synthetic`; narrowed widths, see there). Float32 on the CPU."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torchvision.ops import roi_align

from pipelines.bundle import load_bundle, read_manifest
from pipelines.engine import Engine
from pipelines.importers.rgrg import import_rgrg
from pipelines.models.config import paper, tiny
from pipelines.preprocess import fit_to_model
from pipelines.report import split_sentences, token_overlap_f1
from pipelines.tokenizer import clean_up_tokenization
from tests.pipelines import rgrg_reference as rgrg
from tests.pipelines.rgrg_golden import compare_case, differences, node_outputs
from tests.pipelines.rgrg_synthetic import POSITIONS, biased_rgrg_state

EOS = 50256
MAX_LENGTH = POSITIONS  # the synthetic GPT-2's positions bound RGRG's max_length of 300 (BOS counted)


def radiograph_u8(rows: int = 600, cols: int = 480, seed: int = 1) -> np.ndarray:
    """A smooth 8-bit test image, as RGRG reads its JPEGs (``cv2.imread(..., IMREAD_UNCHANGED)``)."""
    coarse = torch.rand((1, 1, 20, 16), generator=torch.Generator().manual_seed(seed))
    smooth = torch.nn.functional.interpolate(coarse, size=(rows, cols), mode="bilinear", align_corners=False)
    return (smooth[0, 0] * 255).round().to(torch.uint8).numpy()


def _strip(ids: list[int]) -> list[int]:
    """Tokens up to and including the first EOS (the padding after it dropped)."""
    return ids[: ids.index(EOS) + 1] if EOS in ids else ids


@pytest.fixture(scope="module")
def rgrg_case(tmp_path_factory, gpt2_bpe_dir):
    image = radiograph_u8()
    prepared = fit_to_model(torch.from_numpy(image).float() / 255.0, 512, 0.471, 0.302, "area-uint8")
    x = prepared.tensor[None]
    base = paper().replace(clip_model=tiny().clip_model, rpn_pre_nms_top_n_test=600, rpn_post_nms_top_n_test=300)
    sd = biased_rgrg_state(x, base, eos_drift=0.2)
    out = tmp_path_factory.mktemp("rgrg-biased") / "bundle"
    import_rgrg("synthetic-rgrg.pth", out, vocab_json=gpt2_bpe_dir / "vocab.json",
                merges_txt=gpt2_bpe_dir / "merges.txt", base=base, state=sd)
    engine = Engine(load_bundle(out), "cpu", batch_size=1, deterministic=True)
    det_module = engine.model.detector
    with torch.inference_mode():
        raw = engine.infer(x)
        maps = det_module.feature_maps(x)  # torchvision's ResNet-50 and RPN: the same code in RGRG
        images = det_module._image_list(x)
        det = det_module.detect(maps, images)
        proposals = det_module.rpn(images, maps)[0][0]
        heads = rgrg.roi_heads(sd, maps["0"], proposals)
    result = engine.run([prepared])[0]
    rows = raw.selected[0].nonzero().squeeze(1).tolist()
    beams = [rgrg.beam(rgrg.rgrg_next_logprobs(sd, heads["features"][r]), 4, MAX_LENGTH) for r in rows]
    return SimpleNamespace(sd=sd, image=image, prepared=prepared, x=x, out=out, engine=engine, raw=raw, det=det,
                           fmap=maps["0"], proposals=proposals, heads=heads, result=result, beams=beams)


def test_all_29_regions_detected_with_rgrg_boxes_and_scores(rgrg_case):
    c = rgrg_case
    assert bool(c.heads["detected"].all())
    assert torch.equal(c.det.detected[0], c.heads["detected"])
    torch.testing.assert_close(c.det.boxes[0], c.heads["boxes"], rtol=0, atol=1e-4)
    torch.testing.assert_close(c.det.scores[0], c.heads["scores"], rtol=1e-5, atol=1e-6)


def test_region_features_are_pooled_on_the_winning_proposal(rgrg_case):
    c = rgrg_case
    winners = c.proposals[c.heads["winner"]]
    assert torch.equal(c.det.proposals[0], winners)
    with torch.no_grad():
        direct = roi_align(c.fmap, [winners], output_size=8, spatial_scale=1 / 32, sampling_ratio=2).mean(dim=(2, 3))
        direct = c.engine.model.detector.region_proj(direct)
    assert float((c.det.features[0] - direct).abs().max()) < 1e-4
    assert float((c.det.features[0] - c.heads["features"]).abs().max()) < 1e-4
    # the displayed box is the regressed one, not the proposal
    assert float((c.det.boxes[0] - winners).abs().max()) > 0.1


def test_selection_and_abnormality_are_rgrgs_logit_rules(rgrg_case):
    c = rgrg_case
    selected = (rgrg.classify(c.sd, "selection", c.heads["features"]) > -1) & c.heads["detected"]
    abnormal = rgrg.classify(c.sd, "abnormal", c.heads["features"]) > -1
    assert torch.equal(c.raw.selected[0], selected) and torch.equal(c.raw.abnormal[0], abnormal)
    assert 0 < int(selected.sum()) < 29 and 0 < int(abnormal.sum()) < 29
    assert [r.abnormal for r in c.result.regions] == abnormal.tolist()


def test_beam_search_tokens_are_rgrgs_for_every_selected_region(rgrg_case):
    c = rgrg_case
    rows = c.raw.selected[0].nonzero().squeeze(1).tolist()
    ours = [_strip(ids) for ids in c.raw.token_ids.tolist()]
    theirs = c.beams  # rgrg.beam on each selected region's reference feature
    assert len(theirs) == len(rows) and ours == theirs
    lengths = {len(t) for t in theirs}
    assert len(lengths) >= 3 and any(t[-1] == EOS for t in theirs), lengths  # varied, and sentences do end


def test_greedy_tokens_are_rgrgs_for_all_29_regions(rgrg_case):
    c = rgrg_case
    with torch.inference_mode():
        ours = c.engine.model.decoder.generate(c.det.features[0], MAX_LENGTH - 1, 1).tolist()
    theirs = [rgrg.greedy(rgrg.rgrg_next_logprobs(c.sd, c.heads["features"][r]), MAX_LENGTH) for r in range(29)]
    assert [_strip(ids) for ids in ours] == theirs
    assert len({len(t) for t in theirs}) >= 3


def test_sentences_and_report_are_rgrgs(rgrg_case):
    c = rgrg_case
    tokenizer = c.engine.bundle.tokenizer
    rows = c.raw.selected[0].nonzero().squeeze(1).tolist()
    texts = [clean_up_tokenization(tokenizer.decode(ids, skip_special_tokens=True)) for ids in c.raw.token_ids.tolist()]
    assert [r.sentence for r in c.result.regions if r.selected] == [t.strip() for t in texts]
    assert [i for i, r in enumerate(c.result.regions) if r.selected] == rows
    assert c.result.report == rgrg.assemble(texts, split_sentences, token_overlap_f1)


def test_image_transform_is_rgrgs(rgrg_case):
    pytest.importorskip("cv2", reason="opencv-python is the reference for RGRG's INTER_AREA resize")
    c = rgrg_case
    assert torch.equal(c.prepared.tensor, rgrg.transform(c.image))


def test_manifest_says_what_the_bundle_computes(rgrg_case):
    manifest = read_manifest(rgrg_case.out)
    assert manifest["decoding"] == {"num_beams": 4, "max_new_tokens": MAX_LENGTH - 1}
    assert manifest["weights_dtype"] == "float32"
    assert manifest["training"]["precision"] == "float32, the checkpoint's own"
    assert manifest["thresholds"] == {"selection_logit": -1.0, "abnormal_logit": -1.0}
    cfg = manifest["config"]
    assert (cfg["image_mean"], cfg["image_std"], cfg["image_resize"]) == (0.471, 0.302, "area-uint8")
    assert manifest["report"]["sentence_splitter"]["kind"] == "rules"
    assert manifest["report"]["similarity"]["kind"] == "token-overlap-f1"


def test_golden_hook_accepts_rgrgs_outputs_and_names_a_difference(rgrg_case, tmp_path):
    """The golden files a user would write from RGRG's code, here from the reference: no difference; one
    token changed: reported; a case lacking a required array: named."""
    c = rgrg_case
    width = 1 + max(map(len, c.beams))
    token_ids = np.array([[EOS] + s + [EOS] * (width - 1 - len(s)) for s in c.beams], dtype=np.int64)
    selection = rgrg.classify(c.sd, "selection", c.heads["features"])
    golden = {"image": c.image, "input": c.x.numpy(), "boxes": c.heads["boxes"].numpy(),
              "scores": c.heads["scores"].numpy(), "detected": c.heads["detected"].numpy(),
              "features": c.heads["features"].numpy(), "selection_logits": selection.numpy(),
              "abnormal_logits": rgrg.classify(c.sd, "abnormal", c.heads["features"]).numpy(),
              "selected": ((selection > -1) & c.heads["detected"]).numpy(), "token_ids": token_ids}
    ours = node_outputs(c.engine, golden)
    assert differences(golden, ours) == []
    changed = token_ids.copy()
    changed[0, 1] = (changed[0, 1] + 1) % 50000
    assert differences({**golden, "token_ids": changed}, ours) == [
        f"{len(c.beams) - 1} of {len(c.beams)} sentences' token ids identical"]
    np.savez(tmp_path / "partial.npz", image=c.image)
    assert compare_case(c.engine, tmp_path / "partial.npz") == [
        "partial.npz: lacks boxes, detected, selected, token_ids"]


def test_fast_path_computes_the_same_in_float32(rgrg_case):
    """The fast detector (batched proposals, box head through ``G``, features by the RoIAlign identity) on the
    CPU: the same winning proposals and features, the same decisions and sentences as the stock path."""
    c = rgrg_case
    fast = c.engine.with_parts(c.engine.fast_parts(cuda_graphs=False))
    with torch.inference_mode():
        det = fast.parts.detector(c.x)
        raw = fast.infer(c.x)
    assert torch.equal(det.detected[0], c.heads["detected"])
    assert torch.equal(det.proposals[0], c.proposals[c.heads["winner"]])
    # Features reach |x| ~ 50: float32 sums taken in another order (the RoIAlign identity, another CPU's
    # SIMD width) differ in their last digits (1.4e-4 at 4.2 on one machine), so the bound is relative too.
    torch.testing.assert_close(det.features[0], c.heads["features"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(det.boxes[0], c.heads["boxes"], rtol=0, atol=1e-3)
    assert torch.equal(raw.selected, c.raw.selected) and torch.equal(raw.abnormal, c.raw.abnormal)
    assert [_strip(ids) for ids in raw.token_ids.tolist()] == c.beams
