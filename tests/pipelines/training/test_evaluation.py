"""The evaluation can tell a trained model from an untrained one, and its text metrics behave on real
report text (IU X-ray, read from ../shared, never copied)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from pipelines.bundle import load_bundle, save_bundle
from pipelines.evaluation.evaluate import evaluate_bundle
from pipelines.evaluation.metrics import report_scores
from pipelines.models import CRRGModel
from tests.support import REPO

DEMO = REPO / "pipelines" / "bundles" / "demo"
HELD_OUT = "phantoms:seed=2000000,count=6,size=256"  # seeds no training run uses


def test_identical_reports_score_one_shuffled_score_low(shared_dir):
    path = shared_dir / "data" / "iu-xray-reports" / "reports.jsonl"
    texts = [r["findings"] for r in map(json.loads, path.read_text().splitlines()) if r.get("findings")][:150]
    same = report_scores(texts, texts)
    assert same["bleu_4"] == pytest.approx(1.0, abs=1e-6)
    assert same["rouge_l"] == pytest.approx(1.0) and same["meteor"] == pytest.approx(1.0, abs=1e-3)
    shuffled = texts[:]
    random.Random(0).shuffle(shuffled)
    other = report_scores(texts, shuffled, meteor=False)
    assert other["bleu_4"] < 0.15 and other["rouge_l"] < 0.4 and other["cider"] < 0.5


@pytest.fixture(scope="module")
def untrained_bundle(tmp_path_factory) -> Path:
    """The demo architecture and tokenizer with fresh random weights."""
    demo = load_bundle(DEMO)
    torch.manual_seed(0)
    model = CRRGModel(demo.config)
    return save_bundle(model, demo.config, tmp_path_factory.mktemp("untrained") / "bundle", name="untrained",
                       version="0", tokenizer=demo.tokenizer, intended_use="test", clinical_use=False)


def test_evaluation_separates_trained_from_untrained(tmp_path, untrained_bundle):
    if not (DEMO / "manifest.json").is_file():
        pytest.skip("the demo bundle is not in this checkout")
    trained = evaluate_bundle(DEMO, HELD_OUT, tmp_path / "trained", device="cpu", examples=2, meteor=False,
                              progress=False)
    untrained = evaluate_bundle(untrained_bundle, HELD_OUT, tmp_path / "untrained", device="cpu", examples=2,
                                meteor=False, progress=False)
    t, u = trained["summary"], untrained["summary"]
    for key in ("bleu_1", "bleu_4", "rouge_l", "cider", "region_mean_iou", "region_hit_rate", "selector_f1",
                "macro_auc"):
        assert key in t and key in u
    assert set(trained["classification"]["auc"]) >= {"Cardiomegaly", "Pleural Effusion"}
    assert len(trained["detection"]["per_region_iou"]) == 29
    for name in ("metrics.json", "predictions.jsonl", "roc.png", "examples.png"):
        assert (tmp_path / "trained" / name).stat().st_size > 0
    assert t["bleu_4"] > 0.4 and t["rouge_l"] > 0.6 and t["region_mean_iou"] > 0.75 and t["macro_auc"] > 0.85
    assert u["bleu_4"] < 0.05 and u["region_mean_iou"] < 0.4 and u["macro_auc"] < 0.75
