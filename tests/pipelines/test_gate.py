"""The content gate: fitted statistics, the demo bundle's calibration, and the pipeline refusing to interpret
what its models were not trained on (while reading an in-distribution phantom as before)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from pipelines.gate import fit_gate
from pipelines.interface import ImageResult, NotInterpreted
from pipelines.phantoms.dicom import phantom_dataset
from pipelines.phantoms.nonchest import hand, labelled_chest, probes, texture

DEMO = Path(__file__).resolve().parents[2] / "pipelines" / "bundles" / "demo"


def test_the_threshold_is_the_stated_margin_times_the_stated_percentile() -> None:
    rng = np.random.default_rng(0)
    scale = np.linspace(0.5, 3, 20)
    fit, cal = rng.normal(0, 1, (400, 20)) * scale, rng.normal(0, 1, (200, 20)) * scale
    gate = fit_gate(fit, cal, percentile=95.0, shrinkage=0.1, margin=1.0)
    assert np.mean(gate.score(cal) <= gate.threshold) == pytest.approx(0.95, abs=0.01)
    assert fit_gate(fit, cal, percentile=95.0, shrinkage=0.1, margin=1.25).threshold == \
        pytest.approx(1.25 * gate.threshold)
    new = rng.normal(0, 1, (2000, 20)) * scale
    assert np.mean([gate.accepts(s) for s in gate.score(new)]) > 0.9
    assert not any(gate.accepts(s) for s in gate.score(new + 8 * scale))  # far from the training features
    with pytest.raises(ValueError, match="percentile"):
        fit_gate(fit, cal, percentile=0)
    with pytest.raises(ValueError, match="margin"):
        fit_gate(fit, cal, margin=0.5)


def test_the_demo_bundle_is_calibrated_and_meets_its_targets() -> None:
    gate = json.loads((DEMO / "manifest.json").read_text())["gate"]
    evaluation = gate["evaluation"]
    assert evaluation["held_out_accepted"] >= 0.99 and gate["fitted_on"]["held_out"] >= 100
    assert evaluation["non_chest_rejected"] >= 0.99 and evaluation["non_chest_count"] >= 150
    assert evaluation["non_chest_min_score"] > gate["threshold"] > 0
    assert set(evaluation["non_chest_rejected_by_kind"]) >= {"hand", "texture", "noise", "blank", "inverted",
                                                              "rotated", "dicom"}


def test_every_kind_of_non_chest_probe_is_generated() -> None:
    kinds = {kind for kind, image in probes(count=4) if image.ndim == 2 and 0 <= image.min() <= image.max() <= 1}
    assert kinds == {"hand", "knee", "skull", "texture", "pattern", "noise", "blank", "inverted", "rotated", "dicom"}


@pytest.fixture(scope="module")
def demo_pipeline():
    from pipelines.engine import load_pipeline

    return load_pipeline(DEMO, device="cpu", batch_size=4)


def test_chest_labelled_non_chest_images_are_not_interpreted(demo_pipeline) -> None:
    phantom = phantom_dataset(777_001, 320, modality="DX")
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    from pipelines.preprocess import dicom_to_unit

    images = [phantom, labelled_chest(hand(5), 777_002), labelled_chest(texture(5), 777_003),
              labelled_chest(dicom_to_unit(ct), 777_004)]
    assert all(ds.BodyPartExamined == "CHEST" and ds.ViewPosition == "PA" for ds in images)
    outcomes = demo_pipeline.analyse(images)
    assert isinstance(outcomes[0], ImageResult)
    assert outcomes[0].gate_score is not None and outcomes[0].gate_score <= outcomes[0].gate_threshold
    for outcome in outcomes[1:]:
        assert isinstance(outcome, NotInterpreted)
        assert outcome.gate_score > outcome.gate_threshold
        assert "outside what the model was trained on" in outcome.reason
    assert demo_pipeline.views == ("PA", "AP")


def test_calibrate_writes_the_gate_into_the_bundle_from_png_and_dicom(tiny_bundle: Path, tmp_path: Path) -> None:
    """``models calibrate``'s work on a tiny bundle: 8- and 16-bit PNGs and DICOM files read alike, the
    statistics file checksummed in the manifest, and the bundle loads with its gate afterwards."""
    import shutil

    from PIL import Image

    from pipelines.bundle import load_bundle, verify_bundle
    from pipelines.calibrate import calibrate_bundle, read_unit
    from pipelines.phantoms.generator import generate_phantom
    from pipelines.phantoms.nonchest import blank, noise

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    dataset = tmp_path / "phantoms"
    dataset.mkdir()
    for seed in range(10):
        image = generate_phantom(600_000 + seed, 64).image
        if seed % 2:
            Image.fromarray((image * 65535).astype(np.uint16)).save(dataset / f"{seed}.png")
        else:
            Image.fromarray((image * 255).astype(np.uint8)).save(dataset / f"{seed}.png")
    phantom_dataset(600_100, 64).save_as(dataset / "extra.dcm", enforce_file_format=True)
    assert read_unit(dataset / "1.png").max() <= 1.0 and read_unit(dataset / "extra.dcm").shape[0] == 64

    section = calibrate_bundle(bundle, dataset, probes=[("noise", noise(1, 64)), ("blank", blank(0.0, 64))])
    assert section["fitted_on"] == {"dataset": "phantoms", "fit": 7, "calibration": 2, "held_out": 2, "seed": 0}
    assert set(section["evaluation"]["non_chest_rejected_by_kind"]) == {"noise", "blank"}
    assert verify_bundle(bundle) == []
    loaded = load_bundle(bundle)
    assert loaded.gate is not None and loaded.gate.threshold == pytest.approx(section["threshold"], abs=1e-3)
    assert loaded.views == ("PA", "AP")
