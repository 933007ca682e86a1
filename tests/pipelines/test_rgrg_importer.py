"""RGRG checkpoint -> bundle, on a synthetic checkpoint with RGRG's key names and (reduced) shapes.

The ResNet-50 backbone and RPN keep their real shapes (they are fixed by the architecture); the box head,
region features and the GPT-2 are narrowed so that the test stays fast (``rgrg_synthetic.py``). The decoder is
checked against an independent implementation of RGRG's pseudo self-attention forward pass, including its use
of ``wte`` for position embeddings (``rgrg_reference.py``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from pacs_node.cli.models import app as models_app
from pipelines.bundle import load_bundle, verify_bundle
from pipelines.importers.rgrg import RGRGImportError, import_rgrg
from pipelines.models.config import paper, tiny
from tests.pipelines.rgrg_synthetic import D, E, GPT, LAYERS, MLP, POSITIONS, REP, VOCAB, synthetic_rgrg_state
from tests.pipelines.rgrg_reference import lm_logits

@pytest.fixture(scope="module")
def imported(tmp_path_factory, gpt2_bpe_dir):
    state = synthetic_rgrg_state()
    out = tmp_path_factory.mktemp("rgrg") / "bundle"
    # RGRG has no CLIP: keep the random one small; fewer proposals keep the CPU forward pass quick
    base = paper().replace(clip_model=tiny().clip_model, rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50)
    import_rgrg("synthetic.pth", out, vocab_json=gpt2_bpe_dir / "vocab.json", merges_txt=gpt2_bpe_dir / "merges.txt",
                base=base, state=state)  # dtype: the checkpoint's own (float32)
    return state, out


@pytest.fixture(scope="module")
def loaded(imported):
    return load_bundle(imported[1])


def test_imported_bundle_verifies_and_records_its_origin(imported, loaded):
    _, out = imported
    assert verify_bundle(out) == []
    bundle = loaded
    cfg = bundle.config
    assert cfg.preset == "paper" and cfg.detector_backbone == "resnet50" and cfg.image_size == 512
    assert (cfg.feature_dim, cfg.box_head_dim, cfg.decoder_width, cfg.decoder_layers) == (D, REP, E, LAYERS)
    assert cfg.mlp_hidden == MLP and cfg.decoder_positions == POSITIONS and cfg.vocab_size == VOCAB
    assert bundle.clinical_use is False
    assert "RGRG has no CLIP" in bundle.manifest["training"]["clip"]


def test_detector_and_classifier_weights_land_in_place(imported, loaded):
    state, _ = imported
    model = loaded.model
    det = model.detector
    assert torch.equal(det.backbone[0].weight, state["object_detector.backbone.0.weight"])
    assert torch.equal(det.backbone[7][2].conv3.weight, state["object_detector.backbone.7.2.conv3.weight"])
    assert torch.equal(det.rpn.head.conv[0][0].weight, state["object_detector.rpn.head.conv.weight"])
    assert torch.equal(det.region_proj.weight, state["object_detector.roi_heads.dim_reduction.weight"])
    assert torch.equal(det.roi_heads.box_predictor.bbox_pred.bias,
                       state["object_detector.roi_heads.box_predictor.bbox_pred.bias"])
    x = torch.randn(5, D)
    for module, head in ((model.selector, "binary_classifier_region_selection"),
                         (model.abnormality, "binary_classifier_region_abnormal")):
        expected = x
        for i in (0, 2, 4):
            expected = F.linear(expected, state[f"{head}.classifier.{i}.weight"], state[f"{head}.classifier.{i}.bias"])
            expected = F.relu(expected) if i < 4 else expected
        assert torch.allclose(module(x), expected.squeeze(-1), atol=1e-5)
    with torch.no_grad():
        det(torch.randn(1, 1, 512, 512))  # the imported detector runs at the paper resolution


def test_decoder_computes_what_rgrg_computes(imported, loaded):
    state, _ = imported
    decoder = loaded.model.decoder
    features = torch.randn(3, D)
    ids = torch.randint(0, VOCAB, (3, 7))
    ids[:, 0] = 50256  # BOS
    n, t = ids.shape
    with torch.no_grad():
        ours = decoder._step(ids, decoder.prefix_cache(features), torch.arange(t).expand(n, t),
                             torch.ones(n, t + 1, dtype=torch.long))
    assert torch.allclose(ours, lm_logits(state, features, ids), atol=1e-4, rtol=1e-4)


def test_incomplete_checkpoint_is_refused_naming_the_key(tmp_path, gpt2_bpe_dir):
    state = synthetic_rgrg_state()
    del state[f"{GPT}h.1.attn.uv.bias"]
    with pytest.raises(RGRGImportError, match=r"h\.1\.attn\.uv\.bias"):
        import_rgrg("x.pth", tmp_path / "b", vocab_json=gpt2_bpe_dir / "vocab.json",
                    merges_txt=gpt2_bpe_dir / "merges.txt", state=state)
    assert not (tmp_path / "b" / "manifest.json").exists()


def test_cli_import_reports_a_bad_checkpoint(tmp_path, gpt2_bpe_dir):
    ckpt = tmp_path / "broken.pth"
    torch.save({"model": {"object_detector.backbone.0.weight": torch.zeros(64, 1, 7, 7)}, "epoch": 3}, ckpt)
    result = CliRunner().invoke(models_app, [
        "import-rgrg", str(ckpt), str(tmp_path / "out"),
        "--vocab", str(gpt2_bpe_dir / "vocab.json"), "--merges", str(gpt2_bpe_dir / "merges.txt"),
    ])
    assert result.exit_code == 1
    assert "lacks" in result.output and "wte.weight" in result.output
