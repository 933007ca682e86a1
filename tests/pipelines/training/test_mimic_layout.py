"""The MIMIC-CXR + Chest ImaGenome adapter on a tiny fake tree laid out like the PhysioNet downloads."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from PIL import Image

from pipelines.constants import CHEXPERT_LABELS, REGIONS
from pipelines.training.data import (
    DatasetSpecError,
    ModelInputSet,
    collate,
    parse_dataset,
)

IMAGES = [
    # dicom_id, subject, study, (rows, cols)
    ("a1b2c3", "10000032", "50414267", (300, 240)),
    ("d4e5f6", "10000032", "53189527", (240, 320)),
]


def _make_tree(root):
    jpg = root / "mimic-cxr-jpg"
    genome = root / "chest-imagenome" / "silver_dataset"
    (genome / "scene_graph").mkdir(parents=True)
    (genome / "splits").mkdir(parents=True)
    with open(genome / "splits" / "train.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["dicom_id", "subject_id", "study_id"])
        for dicom_id, subject, study, _ in IMAGES:
            w.writerow([dicom_id, subject, study])
    jpg.mkdir()
    with open(jpg / "mimic-cxr-2.0.0-chexpert.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["subject_id", "study_id", *CHEXPERT_LABELS])
        first = {label: "" for label in CHEXPERT_LABELS} | {"Cardiomegaly": "1.0", "Edema": "-1.0", "Pneumonia": "0.0"}
        w.writerow(["10000032", "50414267", *(first[label] for label in CHEXPERT_LABELS)])
        w.writerow(["10000032", "53189527", *("1.0" if label == "No Finding" else "" for label in CHEXPERT_LABELS)])
    for k, (dicom_id, subject, study, (rows, cols)) in enumerate(IMAGES):
        folder = jpg / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}"
        folder.mkdir(parents=True)
        Image.fromarray(np.full((rows, cols), 100 + 50 * k, dtype=np.uint8)).save(folder / f"{dicom_id}.jpg")
        graph = {
            "image_id": dicom_id,
            "objects": [
                {"bbox_name": "right lung", "original_x1": 10, "original_y1": 20, "original_x2": 110,
                 "original_y2": 200},
                {"bbox_name": "cardiac silhouette", "original_x1": 80, "original_y1": 120, "original_x2": 180,
                 "original_y2": 220},
                {"bbox_name": "not a region", "original_x1": 0, "original_y1": 0, "original_x2": 5, "original_y2": 5},
            ],
            "attributes": [
                {"bbox_name": "cardiac silhouette", "phrases": ["The heart is enlarged."],
                 "attributes": [["anatomicalfinding|yes|cardiomegaly", "nlp|yes|abnormal"]]},
                {"bbox_name": "right lung", "phrases": ["The right lung is clear."],
                 "attributes": [["nlp|yes|normal"]]},
            ],
        }
        (genome / "scene_graph" / f"{dicom_id}_SceneGraph.json").write_text(json.dumps(graph))


def test_fake_tree_loads_as_samples(tmp_path):
    _make_tree(tmp_path)
    source = parse_dataset(f"mimic:{tmp_path},split=train")
    assert len(source) == 2
    s = source[0]
    assert s.key == "a1b2c3" and s.image.shape == (300, 240) and 0.0 <= s.image.min() <= s.image.max() <= 1.0
    heart, lung = REGIONS.index("cardiac silhouette"), REGIONS.index("right lung")
    assert s.boxes[heart].tolist() == [80, 120, 180, 220]
    assert np.isnan(s.boxes[REGIONS.index("spine")]).all()  # not annotated
    assert s.sentences[heart] == "The heart is enlarged." and s.abnormal[heart] and not s.abnormal[lung]
    assert s.selected.sum() == 2
    assert s.report == "The right lung is clear. The heart is enlarged."  # anatomical (REGIONS) order
    labels = dict(zip(CHEXPERT_LABELS, s.labels))
    assert labels["Cardiomegaly"] == 1 and labels["Pneumonia"] == 0 and labels["Fracture"] == 0
    assert math.isnan(labels["Edema"])  # uncertain -> unknown

    batch = collate([ModelInputSet(source, 64, 0.5, 0.25)[i] for i in range(2)])
    assert batch.images.shape == (2, 1, 64, 64)
    # the 300-row image is scaled by 64/300 and centred horizontally (as the engine letterboxes it)
    cols = round(240 * 64 / 300)
    sx, sy, left = cols / 240, 64 / 300, (64 - cols) // 2
    assert batch.boxes[0, heart].tolist() == pytest.approx([80 * sx + left, 120 * sy, 180 * sx + left, 220 * sy],
                                                           abs=1e-3)


def test_missing_parts_are_named(tmp_path):
    _make_tree(tmp_path)
    with pytest.raises(DatasetSpecError, match="splits/test.csv"):
        parse_dataset(f"mimic:{tmp_path},split=test")
    with pytest.raises(DatasetSpecError, match="unknown option"):
        parse_dataset(f"mimic:{tmp_path},fold=1")
    with pytest.raises(DatasetSpecError, match="count"):
        parse_dataset("phantoms:seed=3")
    with pytest.raises(DatasetSpecError, match="unknown data set"):
        parse_dataset("imagenet:everything")
