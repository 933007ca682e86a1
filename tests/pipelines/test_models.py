"""The model modules on their own: configs, shapes, losses, decoding."""

from __future__ import annotations

import json

import pytest
import torch

from pipelines.constants import NUM_LABELS, NUM_REGIONS
from pipelines.models import ConfigError, CRRGModel, ModelConfig, preset
from pipelines.models.detector import pad_per_image, top1_per_class
from tests.pipelines.conftest import exercised_model, tiny_config


@pytest.mark.parametrize("name", ["paper", "demo", "tiny"])
def test_presets_round_trip_through_json(name):
    cfg = preset(name)
    assert ModelConfig.from_json(cfg.to_json()) == cfg


def test_config_errors_name_the_key():
    data = preset("tiny").to_dict()
    with pytest.raises(ConfigError, match="decoder_widht"):
        ModelConfig.from_dict({**data, "decoder_widht": 3})
    with pytest.raises(ConfigError, match="image_size"):
        ModelConfig.from_dict({**data, "image_size": "big"})
    with pytest.raises(ConfigError, match="decoder_heads"):
        ModelConfig.from_dict({**data, "decoder_heads": 5})
    with pytest.raises(ConfigError, match="preset"):
        ModelConfig.from_dict({k: v for k, v in data.items() if k != "preset"})


def test_paper_preset_has_rgrg_sizes():
    """Built on the meta device: the full paper model without allocating its weights."""
    with torch.device("meta"):
        model = CRRGModel.from_config(preset("paper"))
    assert model.detector.region_proj.weight.shape == (1024, 2048)
    assert model.detector.roi_heads.box_head.fc6.weight.shape == (1024, 2048 * 8 * 8)
    assert [m.out_features for m in model.selector.classifier if isinstance(m, torch.nn.Linear)] == [512, 128, 1]
    lm = model.decoder.lm.config
    assert (lm.n_layer, lm.n_embd, lm.n_head, lm.vocab_size) == (24, 1024, 16, 50257)
    assert model.clip.image_size == 224


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    return exercised_model(tiny_config(tiny_tokenizer))


def test_detector_eval_returns_29_boxes_and_features(model):
    cfg = model.config
    with torch.no_grad():
        det = model.detector(torch.randn(3, 1, cfg.image_size, cfg.image_size))
    assert det.boxes.shape == (3, NUM_REGIONS, 4)
    assert det.features.shape == (3, NUM_REGIONS, cfg.feature_dim)
    assert det.detected.dtype == torch.bool and det.detected.any()
    assert (det.boxes[..., 2:] >= det.boxes[..., :2]).all()
    assert det.boxes.min() >= 0 and det.boxes.max() <= cfg.image_size
    full = torch.tensor([0.0, 0.0, cfg.image_size, cfg.image_size])
    assert (det.boxes[~det.detected] == full).all()  # missing class: full-image fallback
    assert (det.scores[~det.detected] == 0).all()


def test_top1_per_class_picks_best_voting_proposal():
    """Two images; image 0 has proposals voting for classes 1 and 2 (two for class 1), image 1 has none."""
    from torchvision.models.detection._utils import BoxCoder

    logits = torch.full((3, NUM_REGIONS + 1), -10.0)
    logits[0, 1] = 2.0  # class index 1 -> region 0
    logits[1, 1] = 5.0  # better vote for region 0
    logits[2, 2] = 3.0  # region 1
    regression = torch.zeros(3, (NUM_REGIONS + 1) * 4)
    proposals = [torch.tensor([[0.0, 0, 10, 10], [5, 5, 20, 20], [1, 1, 4, 4]]), torch.zeros((0, 4))]
    padded, valid = pad_per_image(torch.cat(proposals), [3, 0])
    boxes, scores, detected, _ = top1_per_class(pad_per_image(logits, [3, 0])[0],
                                                pad_per_image(regression, [3, 0])[0], padded, valid,
                                                BoxCoder((10.0, 10.0, 5.0, 5.0)), 64)
    assert detected[0, :2].tolist() == [True, True] and not detected[0, 2:].any() and not detected[1].any()
    assert boxes[0, 0].tolist() == pytest.approx([5, 5, 20, 20])
    assert boxes[0, 1].tolist() == pytest.approx([1, 1, 4, 4])
    assert boxes[1, 5].tolist() == [0, 0, 64, 64]
    assert scores[0, 0] > scores[0, 1] > 0


def test_detector_training_returns_torchvision_losses(model):
    cfg = model.config
    model.detector.train()
    try:
        targets = [{"boxes": torch.tensor([[4.0, 4, 30, 40], [10, 8, 50, 60]]), "labels": torch.tensor([1, 25])}] * 2
        losses = model.detector(torch.randn(2, 1, cfg.image_size, cfg.image_size), targets)
        assert set(losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}
        sum(losses.values()).backward()
        with pytest.raises(ValueError, match="labels must be region classes"):
            model.detector(torch.randn(1, 1, cfg.image_size, cfg.image_size),
                           [{"boxes": torch.tensor([[1.0, 1, 5, 5]]), "labels": torch.tensor([30])}])
    finally:
        model.detector.eval()
        model.zero_grad(set_to_none=True)


def test_region_features_are_differentiable(model):
    cfg = model.config
    images = torch.randn(2, 1, cfg.image_size, cfg.image_size, requires_grad=True)
    boxes = torch.tensor([[0.0, 0, 32, 32], [16, 16, 60, 50]]).expand(2, 2, 4)
    feats = model.detector.region_features(model.detector.feature_maps(images), boxes)
    assert feats.shape == (2, 2, cfg.feature_dim)
    feats.sum().backward()
    assert images.grad is not None
    model.zero_grad(set_to_none=True)


def test_decoder_loss_ignores_padding(model, tiny_tokenizer):
    from pipelines.tokenizer import encode_sentences

    ids, mask = encode_sentences(tiny_tokenizer, ["The lungs are clear.", "No pneumothorax."], max_tokens=10)
    assert (ids[:, 0] == tiny_tokenizer.eos_token_id).all() and mask[:, 0].all()
    feats = torch.randn(2, model.config.feature_dim)
    loss = model.decoder(feats, ids, mask)
    assert torch.isfinite(loss)
    garbage = ids.masked_fill(mask == 0, 7)  # different padding tokens, same mask
    assert torch.allclose(model.decoder(feats, garbage, mask), loss)


def test_greedy_generation_is_batch_invariant_and_matches_one_beam(model):
    feats = torch.randn(5, model.config.feature_dim)
    batched = model.decoder.generate(feats)
    assert batched.dtype == torch.long and batched.shape[0] == 5
    assert batched.shape[1] <= model.config.max_sentence_tokens
    for i in range(5):
        single = model.decoder.generate(feats[i:i + 1])
        width = single.shape[1]
        assert torch.equal(single[0], batched[i, :width])
        assert (batched[i, width:] == model.config.pad_token_id).all()
    assert torch.equal(model.decoder._beam(feats, model.config.max_sentence_tokens, 1), batched)
    beams = model.decoder.generate(feats, num_beams=3)
    assert beams.shape[0] == 5


def test_generation_stops_at_eos(tiny_tokenizer):
    cfg = tiny_config(tiny_tokenizer)
    model = CRRGModel.from_config(cfg).eval()
    with torch.no_grad():  # constant hidden state along EOS's (tied, enlarged) embedding: EOS always wins
        tr = model.decoder.lm.transformer
        tr.wte.weight[cfg.eos_token_id] *= 100.0
        tr.ln_f.weight.zero_()
        tr.ln_f.bias.copy_(tr.wte.weight[cfg.eos_token_id] / tr.wte.weight[cfg.eos_token_id].norm())
    feats = torch.randn(4, cfg.feature_dim)
    assert model.decoder.generate(feats).tolist() == [[cfg.eos_token_id]] * 4
    beams = model.decoder.generate(feats, num_beams=2)
    assert beams.shape[1] < cfg.max_sentence_tokens and (beams == cfg.eos_token_id).all()  # EOS, then PAD
    assert model.decoder.generate(feats[:0]).shape == (0, 0)


def test_clip_scores_14_labels_zero_shot_and_with_head(tiny_tokenizer):
    cfg = tiny_config(tiny_tokenizer)
    images = torch.randn(3, 1, cfg.image_size, cfg.image_size)
    zero_shot = CRRGModel.from_config(cfg).clip.eval()
    with torch.no_grad():
        probs = zero_shot.label_probs(images)
    assert probs.shape == (3, NUM_LABELS) and ((probs > 0) & (probs < 1)).all()
    assert zero_shot.prompt_embeddings is not None  # cached for the next batch
    with_head = CRRGModel.from_config(cfg.replace(clip_label_head=True)).clip.eval()
    with torch.no_grad():
        expected = with_head.label_head(with_head.encode_image(images)).sigmoid()
        assert torch.allclose(with_head.label_probs(images), expected)
    loss = zero_shot.contrastive_loss(images, zero_shot.tokenize(["a", "b", "c"]))
    assert torch.isfinite(loss)


def test_config_json_is_plain_json():
    json.loads(preset("demo").to_json())
