"""Phantoms as DICOM: readable by pydicom, valid per dciodvfy, marked synthetic, pixels as drawn."""

from __future__ import annotations

import subprocess

import numpy as np
import pydicom
import pytest
from typer.testing import CliRunner

from pipelines.phantoms import generate_phantom
from pipelines.phantoms.dicom import is_phantom, phantom_dataset, write_phantom_dicom
from tests.support import require_tool

SIZE = 256
CASES = [
    ("CR", "MONOCHROME1", 12, "explicit"),
    ("CR", "MONOCHROME2", 16, "j2k-lossless"),
    ("DX", "MONOCHROME2", 14, "explicit"),
    ("DX", "MONOCHROME1", 15, "j2k-lossy"),
]


@pytest.mark.parametrize(("modality", "photometric", "bits", "encoding"), CASES)
def test_written_phantom_is_valid_dicom(tmp_path, modality, photometric, bits, encoding):
    dciodvfy = require_tool("dciodvfy")
    path = tmp_path / "p.dcm"
    write_phantom_dicom(path, 3, SIZE, modality=modality, photometric=photometric, bits_stored=bits,
                        encoding=encoding)
    ds = pydicom.dcmread(path)
    assert ds.Modality == modality and ds.PhotometricInterpretation == photometric and ds.BitsStored == bits
    assert str(ds.PatientName).startswith("PHANTOM^") and is_phantom(ds)
    pixels = ds.pixel_array
    assert pixels.shape == (ds.Rows, ds.Columns) and int(pixels.max()) < 2**bits
    report = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=60)
    errors = [line for line in (report.stdout + report.stderr).splitlines() if "Error" in line]
    assert not errors, "\n".join(errors)


def test_pixels_are_the_phantom_and_monochrome1_is_inverted():
    phantom = generate_phantom(5, SIZE)
    mono2 = phantom_dataset(5, SIZE, photometric="MONOCHROME2", bits_stored=12, phantom=phantom)
    mono1 = phantom_dataset(5, SIZE, photometric="MONOCHROME1", bits_stored=12, phantom=phantom)
    lossless = phantom_dataset(5, SIZE, photometric="MONOCHROME2", bits_stored=12, encoding="j2k-lossless",
                               phantom=phantom)
    expected = np.rint(phantom.image * 4095).astype(np.uint16)
    assert np.array_equal(mono2.pixel_array, expected)
    assert np.array_equal(mono1.pixel_array, 4095 - expected)
    assert np.array_equal(lossless.pixel_array, expected)
    # same phantom, other encoding: same study, other instance
    assert mono1.StudyInstanceUID == mono2.StudyInstanceUID and mono1.SOPInstanceUID != mono2.SOPInstanceUID
    assert phantom_dataset(5, SIZE, phantom=phantom).SOPInstanceUID == phantom_dataset(5, SIZE).SOPInstanceUID


def test_bad_options_are_refused_by_name():
    with pytest.raises(ValueError, match="bits_stored"):
        phantom_dataset(1, 64, bits_stored=8)
    with pytest.raises(ValueError, match="photometric"):
        phantom_dataset(1, 64, photometric="RGB")


def test_cli_writes_phantoms(tmp_path):
    from pipelines.training.cli import app

    result = CliRunner().invoke(app, ["phantoms", "write", "--count", "2", "--out", str(tmp_path), "--size", "200",
                                      "--seed", "40", "--encoding", "j2k-lossless"])
    assert result.exit_code == 0, result.output
    files = sorted(tmp_path.glob("*.dcm"))
    assert [f.name for f in files] == ["phantom-000040.dcm", "phantom-000041.dcm"]
    assert all(pydicom.dcmread(f).Rows == 200 for f in files)
