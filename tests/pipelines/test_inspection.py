"""``pacs-node models run``: one real radiograph through the demo bundle, printed and drawn."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image
from typer.testing import CliRunner

from pacs_node.cli.models import app
from pipelines.constants import CHEXPERT_LABELS, REGIONS

DEMO = Path(__file__).resolve().parents[2] / "pipelines" / "bundles" / "demo"


def test_run_prints_json_and_draws_the_real_radiograph(real_dicom_dir, tmp_path):
    png = tmp_path / "result.png"
    result = CliRunner().invoke(app, ["run", str(DEMO), str(real_dicom_dir / "RG1_UNCR.dcm"), "--json",
                                      "--png", str(png), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout[result.stdout.index("{"):])
    assert [r["name"] for r in data["regions"]] == list(REGIONS)
    assert set(data["label_probs"]) == set(CHEXPERT_LABELS)
    selected = [r for r in data["regions"] if r["selected"]]
    assert selected and all(r["sentence"] for r in selected) and data["report"]
    with Image.open(png) as im:
        assert im.format == "PNG" and im.height == 1200 and im.width > 1200


def test_run_names_a_file_that_is_not_dicom(tmp_path):
    bogus = tmp_path / "x.dcm"
    bogus.write_bytes(b"not dicom")
    result = CliRunner().invoke(app, ["run", str(DEMO), str(bogus), "--device", "cpu"])
    assert result.exit_code == 1 and "not a readable DICOM file" in " ".join(result.output.split())
