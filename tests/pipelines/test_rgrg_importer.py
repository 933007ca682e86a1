"""RGRG checkpoint -> bundle, on a synthetic checkpoint with RGRG's key names and (reduced) shapes.

The ResNet-50 backbone and RPN keep their real shapes (they are fixed by the architecture); the box head,
region features and the GPT-2 are narrowed so that the test stays fast. The decoder is checked against an
independent implementation of RGRG's pseudo self-attention forward pass, including its use of ``wte`` for
position embeddings.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet50
from typer.testing import CliRunner

from pacs_node.cli.models import app as models_app
from pipelines.bundle import load_bundle, verify_bundle
from pipelines.importers.rgrg import RGRGImportError, import_rgrg
from pipelines.models.config import paper, tiny

D, REP, E, LAYERS, HEADS, POSITIONS, VOCAB, MLP = 48, 16, 64, 2, 16, 40, 50257, (24, 8)  # RGRG: 16 heads
GPT = "language_model.gpt_with_lm_head.transformer."


def synthetic_rgrg_state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    net = resnet50(weights=None)
    net.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    for key, value in nn.Sequential(*list(net.children())[:-2]).state_dict().items():
        sd[f"object_detector.backbone.{key}"] = value
    anchors = 10 * 16
    r = lambda *shape: torch.randn(*shape) * 0.02
    sd |= {
        "object_detector.rpn.head.conv.weight": r(2048, 2048, 3, 3),  # pre-0.13 torchvision RPNHead names
        "object_detector.rpn.head.conv.bias": r(2048),
        "object_detector.rpn.head.cls_logits.weight": r(anchors, 2048, 1, 1),
        "object_detector.rpn.head.cls_logits.bias": r(anchors),
        "object_detector.rpn.head.bbox_pred.weight": r(anchors * 4, 2048, 1, 1),
        "object_detector.rpn.head.bbox_pred.bias": r(anchors * 4),
        "object_detector.roi_heads.box_head.fc6.weight": r(REP, 2048 * 8 * 8),
        "object_detector.roi_heads.box_head.fc6.bias": r(REP),
        "object_detector.roi_heads.box_head.fc7.weight": r(REP, REP),
        "object_detector.roi_heads.box_head.fc7.bias": r(REP),
        "object_detector.roi_heads.box_predictor.cls_score.weight": r(30, REP),
        "object_detector.roi_heads.box_predictor.cls_score.bias": r(30),
        "object_detector.roi_heads.box_predictor.bbox_pred.weight": r(120, REP),
        "object_detector.roi_heads.box_predictor.bbox_pred.bias": r(120),
        "object_detector.roi_heads.dim_reduction.weight": r(D, 2048),
        "object_detector.roi_heads.dim_reduction.bias": r(D),
    }
    for head in ("binary_classifier_region_selection", "binary_classifier_region_abnormal"):
        widths = (D, *MLP, 1)
        for i, (w_in, w_out) in enumerate(itertools.pairwise(widths)):
            sd[f"{head}.classifier.{2 * i}.weight"] = torch.randn(w_out, w_in)
            sd[f"{head}.classifier.{2 * i}.bias"] = torch.randn(w_out)
    wte = torch.randn(VOCAB, E) * 0.5
    sd[GPT + "wte.weight"] = wte
    sd[GPT + "wpe.weight"] = r(POSITIONS, E)  # present in RGRG's state dict, unused by its forward
    for i in range(LAYERS):
        p = f"{GPT}h.{i}."
        sd |= {
            p + "ln_1.weight": 1 + r(E), p + "ln_1.bias": r(E),
            p + "attn.c_attn.weight": torch.randn(E, 3 * E) * 0.3, p + "attn.c_attn.bias": r(3 * E),
            p + "attn.c_proj.weight": torch.randn(E, E) * 0.3, p + "attn.c_proj.bias": r(E),
            p + "attn.uk.weight": torch.randn(E, E) * 0.3, p + "attn.uk.bias": r(E),
            p + "attn.uv.weight": torch.randn(E, E) * 0.3, p + "attn.uv.bias": r(E),
            p + "attn.causal_mask": torch.tril(torch.ones(POSITIONS, POSITIONS, dtype=torch.uint8)).view(
                1, 1, POSITIONS, POSITIONS),
            p + "attn.mask_out_value": torch.tensor(-1e4),
            p + "ln_2.weight": 1 + r(E), p + "ln_2.bias": r(E),
            p + "mlp.c_fc.weight": torch.randn(E, 4 * E) * 0.3, p + "mlp.c_fc.bias": r(4 * E),
            p + "mlp.c_proj.weight": torch.randn(4 * E, E) * 0.3, p + "mlp.c_proj.bias": r(E),
        }
    sd[GPT + "ln_f.weight"], sd[GPT + "ln_f.bias"] = 1 + r(E), r(E)
    sd["language_model.gpt_with_lm_head.lm_head.weight"] = wte  # tied, as in GPT2LMHeadModel
    sd["language_model.wte.weight"] = wte  # RGRG's module aliases appear in its state dict too
    sd["language_model.gpt2_blocks.0.0.weight"] = sd[GPT + "h.0.ln_1.weight"]
    for idx, w_in in ((0, D), (2, E)):
        sd[f"language_model.feature_space_transformation_nn.{idx}.weight"] = torch.randn(E, w_in) * 0.3
        sd[f"language_model.feature_space_transformation_nn.{idx}.bias"] = r(E)
    return sd


def rgrg_decoder_logits(sd, features, input_ids):
    """RGRG's language model forward, written from its description: image key/value per layer via uk/uv on
    the transformed feature, prepended to the words' keys/values; positions embedded with wte."""
    n, t = input_ids.shape
    hd = E // HEADS
    f = "language_model.feature_space_transformation_nn."
    image = F.linear(F.relu(F.linear(features, sd[f + "0.weight"], sd[f + "0.bias"])), sd[f + "2.weight"],
                     sd[f + "2.bias"])
    wte = sd[GPT + "wte.weight"]
    x = wte[input_ids] + wte[torch.arange(t)]
    visible = torch.ones(t, t + 1, dtype=torch.bool).tril(diagonal=1)  # key 0 (image) always visible

    def heads(z):
        return z.view(n, -1, HEADS, hd).transpose(1, 2)

    for i in range(LAYERS):
        p = f"{GPT}h.{i}."
        h = F.layer_norm(x, (E,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"])
        q, k, v = (h @ sd[p + "attn.c_attn.weight"] + sd[p + "attn.c_attn.bias"]).split(E, dim=-1)
        k = torch.cat([F.linear(image, sd[p + "attn.uk.weight"], sd[p + "attn.uk.bias"])[:, None], k], dim=1)
        v = torch.cat([F.linear(image, sd[p + "attn.uv.weight"], sd[p + "attn.uv.bias"])[:, None], v], dim=1)
        att = (heads(q) @ heads(k).transpose(-1, -2)) / math.sqrt(hd)
        att = att.masked_fill(~visible, float("-inf")).softmax(-1)
        out = (att @ heads(v)).transpose(1, 2).reshape(n, t, E)
        x = x + out @ sd[p + "attn.c_proj.weight"] + sd[p + "attn.c_proj.bias"]
        h = F.layer_norm(x, (E,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"])
        h = F.gelu(h @ sd[p + "mlp.c_fc.weight"] + sd[p + "mlp.c_fc.bias"], approximate="tanh")
        x = x + h @ sd[p + "mlp.c_proj.weight"] + sd[p + "mlp.c_proj.bias"]
    x = F.layer_norm(x, (E,), sd[GPT + "ln_f.weight"], sd[GPT + "ln_f.bias"])
    return x @ wte.T


@pytest.fixture(scope="module")
def imported(tmp_path_factory, gpt2_bpe_dir):
    state = synthetic_rgrg_state()
    out = tmp_path_factory.mktemp("rgrg") / "bundle"
    # RGRG has no CLIP: keep the random one small; fewer proposals keep the CPU forward pass quick
    base = paper().replace(clip_model=tiny().clip_model, rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50)
    import_rgrg("synthetic.pth", out, vocab_json=gpt2_bpe_dir / "vocab.json", merges_txt=gpt2_bpe_dir / "merges.txt",
                base=base, state=state, dtype=torch.float32)
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
    assert torch.allclose(ours, rgrg_decoder_logits(state, features, ids), atol=1e-4, rtol=1e-4)


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
