"""The phantom generator: deterministic by seed, boxes where the anatomy is, findings where they belong."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.constants import CHEXPERT_LABELS, REGIONS
from pipelines.phantoms import generate_phantom
from pipelines.phantoms.render import attenuation

SIZE = 128
BOX = {name: i for i, name in enumerate(REGIONS)}


def _centre(p, name):
    x1, y1, x2, y2 = p.boxes[BOX[name]]
    return (x1 + x2) / 2, (y1 + y2) / 2


def test_same_seed_same_phantom_other_seed_other_phantom():
    a, b = generate_phantom(7, SIZE), generate_phantom(7, SIZE)
    assert np.array_equal(a.image, b.image)
    assert np.array_equal(a.boxes, b.boxes)
    assert a.report == b.report and a.findings == b.findings
    c = generate_phantom(8, SIZE)
    assert not np.array_equal(a.image, c.image)


def test_seed_is_the_same_patient_at_every_size():
    small, large = generate_phantom(11, SIZE), generate_phantom(11, 4 * SIZE)
    assert small.report == large.report and small.findings == large.findings
    ratio = large.image.shape[0] / small.image.shape[0]
    # boxes are measured on different grids: equal up to a few small-image pixels
    assert np.allclose(large.boxes / ratio, small.boxes, atol=3.0)


@pytest.mark.parametrize("seed", range(12))
def test_boxes_are_inside_the_image_and_follow_the_anatomy(seed):
    p = generate_phantom(seed, SIZE)
    rows, cols = p.image.shape
    b = p.boxes
    assert np.isfinite(b).all()
    assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= cols).all() and (b[:, 3] <= rows).all()
    assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
    # the patient's right is on the image's left (PA view)
    assert _centre(p, "right lung")[0] < _centre(p, "spine")[0] < _centre(p, "left lung")[0]
    assert _centre(p, "right clavicle")[0] < _centre(p, "left clavicle")[0]
    for side in ("right", "left"):
        lung = b[BOX[f"{side} lung"]]
        zones = [f"{side} {z} lung zone" for z in ("upper", "mid", "lower")]
        assert [_centre(p, z)[1] for z in zones] == sorted(_centre(p, z)[1] for z in zones)
        for part in (*zones, f"{side} apical zone", f"{side} costophrenic angle"):
            x1, y1, x2, y2 = b[BOX[part]]
            assert lung[0] - 1 <= x1 and y1 >= lung[1] - 1 and x2 <= lung[2] + 1 and y2 <= lung[3] + 1, part
        assert _centre(p, f"{side} hemidiaphragm")[1] > _centre(p, f"{side} mid lung zone")[1]
    assert _centre(p, "trachea")[1] < _centre(p, "carina")[1] < _centre(p, "cardiac silhouette")[1]
    assert _centre(p, "upper mediastinum")[1] < _centre(p, "cardiac silhouette")[1] < _centre(p, "abdomen")[1]


@pytest.mark.parametrize("seed", range(12))
def test_labels_report_and_selection_agree(seed):
    p = generate_phantom(seed, 64)
    labels = dict(zip(CHEXPERT_LABELS, p.labels))
    pathologies = [k for k, v in labels.items() if v and k not in ("No Finding", "Support Devices")]
    assert bool(labels["No Finding"]) == (not pathologies)
    assert p.selected.sum() == sum(s is not None for s in p.sentences)
    for s in p.sentences:
        if s is not None:
            assert s in p.report
    for f in p.findings:  # every finding's sentence region is selected and abnormal
        for region in f.report_regions():
            assert p.selected[BOX[region]] and p.region_abnormal[BOX[region]]


def _seed_with(kind: str) -> int:
    for seed in range(500):
        if any(f.kind == kind for f in generate_phantom(seed, 64).findings):
            return seed
    raise AssertionError(f"no phantom with {kind} in 500 seeds")


@pytest.mark.parametrize("kind", ["nodule", "consolidation", "pneumothorax", "et_tube", "central_line"])
def test_a_finding_changes_the_pixels_of_its_regions_only(kind):
    p = generate_phantom(_seed_with(kind), SIZE)
    finding = next(f for f in p.findings if f.kind == kind)
    rest = tuple(f for f in p.findings if f is not finding)
    u, v = p.placement.grid(*p.image.shape)
    diff = (attenuation(p.anatomy, p.findings, u, v, np.random.default_rng(0))
            - attenuation(p.anatomy, rest, u, v, np.random.default_rng(0)))
    changed = np.abs(diff) > 0.03
    assert changed.sum() >= 4, "the finding is not visible"
    boxes = p.boxes[[BOX[r] for r in finding.affected_regions()]]
    x1, y1 = boxes[:, :2].min(0) - 2
    x2, y2 = boxes[:, 2:].max(0) + 2
    ys, xs = np.nonzero(changed)
    inside = (xs + 0.5 >= x1) & (xs + 0.5 <= x2) & (ys + 0.5 >= y1) & (ys + 0.5 <= y2)
    if kind == "central_line":  # the catheter enters from the neck, above the svc it ends in
        inside |= ys + 0.5 <= y2
    if kind == "et_tube":  # the tube comes from the mouth, above the image's trachea box
        inside |= (xs + 0.5 >= x1) & (xs + 0.5 <= x2)
    assert inside.mean() > 0.95, f"{kind}: {1 - inside.mean():.1%} of the change is outside its regions"
