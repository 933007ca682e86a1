"""Tiny random bundles for the model-stack tests: built once per session, self-contained (a BPE trained on
a few sentences, no ../shared needed), and nudged so that random weights still exercise every path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipelines.bundle import save_bundle
from pipelines.models import CRRGModel, ModelConfig, preset
from pipelines.tokenizer import train_bpe

SENTENCES = [
    "The heart size is normal.",
    "There is no pleural effusion.",
    "The lungs are clear.",
    "No pneumothorax is seen.",
    "Mild cardiomegaly is present.",
    "There is a small left pleural effusion.",
    "The mediastinal contours are unremarkable.",
    "Degenerative changes of the spine are noted.",
] * 4


def tiny_config(tokenizer) -> ModelConfig:
    special = tokenizer.eos_token_id
    return preset("tiny").replace(vocab_size=len(tokenizer), bos_token_id=special, eos_token_id=special,
                                  pad_token_id=special, decoder_positions=32,
                                  max_sentence_tokens=8)


def exercised_model(cfg: ModelConfig, seed: int = 0) -> CRRGModel:
    """Random weights, nudged so that every path runs: the box head is sharpened so that proposals vote
    for many different classes (most regions detected), the selector selects every detected region, and
    EOS is unlikely so that sentences are not empty."""
    torch.manual_seed(seed)
    model = CRRGModel.from_config(cfg).eval()
    heads = model.detector.roi_heads
    with torch.no_grad():
        heads.box_head.fc6.weight.mul_(40.0)
        heads.box_head.fc6.bias.zero_()
        heads.box_head.fc7.bias.zero_()
        heads.box_predictor.cls_score.bias.zero_()
        heads.box_predictor.cls_score.weight.mul_(10.0)
        model.selector.classifier[-1].bias.fill_(8.0)
        model.decoder.lm.transformer.wte.weight[cfg.eos_token_id].zero_()
    return model


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return train_bpe(SENTENCES, vocab_size=300, min_frequency=1)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_tokenizer) -> Path:
    cfg = tiny_config(tiny_tokenizer)
    out = tmp_path_factory.mktemp("bundles") / "tiny"
    save_bundle(exercised_model(cfg), cfg, out, name="tiny-test", version="0.1", tokenizer=tiny_tokenizer,
                intended_use="unit tests", clinical_use=False, training={"data": "none (random)"})
    return out
