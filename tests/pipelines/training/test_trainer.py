"""Training smoke tests: every stage runs and learns, a run resumes where it stopped, export loads."""

from __future__ import annotations

import json

import pytest

from pipelines.bundle import load_bundle, verify_bundle
from pipelines.training.trainer import (
    STAGES,
    StagePlan,
    Trainer,
    TrainSettings,
    iter_log,
)

STEPS = 6


def _settings(run_dir, preset="tiny", stages=STAGES, steps=STEPS, count=8, **kw) -> TrainSettings:
    plans = {s: StagePlan(steps=steps, lr=2e-3, batch_size=4)
             for s in STAGES}
    return TrainSettings(run_dir=run_dir, train_data=f"phantoms:seed=0,count={count}", preset=preset,
                         demo_overrides=preset != "tiny", workers=0, plans=plans, stages=tuple(stages),
                         log_every=1, checkpoint_every=2, progress=False, vocab_size=300, **kw)


def _losses(run_dir, stage):
    return [r["loss"] for r in iter_log(run_dir) if r["stage"] == stage and "event" not in r]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    trainer = Trainer(_settings(run))
    trainer.prepare()
    trainer.run()
    yield trainer, run
    trainer.close()


@pytest.mark.parametrize("stage", ["detector", "heads", "decoder", "labels"])
def test_each_stage_lowers_its_loss(trained, stage):
    _, run = trained
    losses = _losses(run, stage)
    assert len(losses) == STEPS
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2, losses


def test_clip_stage_runs(trained):
    _, run = trained
    assert len(_losses(run, "clip")) == STEPS


def test_export_gives_a_loadable_bundle(trained, tmp_path):
    trainer, _ = trained
    out = trainer.export(tmp_path / "bundle", name="smoke", version="0")
    assert verify_bundle(out) == []
    bundle = load_bundle(out)
    assert bundle.clinical_use is False and bundle.config.preset == "tiny"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["training"]["synthetic"] is True
    assert manifest["training"]["reproduce"].startswith("pacs-node train ")
    assert f"detector={STEPS}" in manifest["training"]["reproduce"]


def test_interrupted_stage_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    first = Trainer(_settings(tmp_path, stages=["detector"]))
    first.prepare()
    calls = {"n": 0}
    original = first._detector_step

    def crash_on_step_four(indices, batch):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return original(indices, batch)

    first._detector_step = crash_on_step_four
    with pytest.raises(KeyboardInterrupt):
        first.run()
    first.close()
    # checkpoints every 2 steps: steps 0-1 and 2-3 were saved... the crash came during step 3
    second = Trainer(_settings(tmp_path, stages=["detector", "heads"]))
    second.prepare()
    assert second.state["stage"] == "detector" and second.state["step"] == 2
    second.run()
    second.close()
    steps = [r["step"] for r in iter_log(tmp_path) if r["stage"] == "detector" and "event" not in r]
    assert steps == [0, 1, 2, 2, 3, 4, 5]  # 0-2 before the crash, then on from the checkpoint at 2
    assert second.state["done"] == ["detector", "heads"]
    # a finished run started again trains nothing more
    third = Trainer(_settings(tmp_path, stages=["detector", "heads"]))
    third.prepare()
    assert third.run() == {}
    third.close()


def test_demo_preset_learns_on_cpu(tmp_path):
    """The real demo architecture (MobileNetV3-FPN detector at 320 px) takes a few CPU steps, loss falls."""
    trainer = Trainer(_settings(tmp_path, preset="demo", stages=["detector"], steps=4, count=2))
    trainer.s.plans["detector"].batch_size = 2
    trainer.prepare()
    trainer.run()
    trainer.close()
    losses = _losses(tmp_path, "detector")
    assert len(losses) == 4 and losses[-1] < losses[0], losses
