"""DICOM -> model input, and model boxes -> source pixels."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
import torch
from pydicom.dataset import FileMetaDataset
from pydicom.pixels import apply_modality_lut
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from pipelines.interface import PreprocessError
from pipelines.preprocess import dicom_to_unit, preprocess, preprocess_many

SIZE, MEAN, STD = 128, 0.5, 0.25


def make_ds(pixels: np.ndarray, photometric: str = "MONOCHROME2", **attrs) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPInstanceUID = generate_uid()
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    bits = 8 if pixels.dtype == np.uint8 else 16
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, attrs.pop("BitsStored", bits), bits - 1
    ds.PixelRepresentation = 0
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.tobytes()
    return ds


def _crossings(profile: torch.Tensor) -> tuple[float, float]:
    """Sub-pixel positions (pixel-edge coordinates) where a bright plateau's profile crosses 0.5: the
    antialiasing filter is symmetric, so the half-height point of the blurred step is the true edge."""
    above = torch.nonzero(profile >= 0.5).flatten()
    first, last = int(above[0]), int(above[-1])

    def cross(i: int, j: int) -> float:  # between the centres of pixels i (< 0.5) and j (>= 0.5)
        return i + 0.5 + (j - i) * float((0.5 - profile[i]) / (profile[j] - profile[i]))

    start = cross(first - 1, first) if first > 0 else 0.0
    end = cross(last + 1, last) if last + 1 < len(profile) else float(len(profile))
    return start, end


def bright_box(tensor: torch.Tensor) -> torch.Tensor:
    """Model-pixel box (x1, y1, x2, y2) of the bright rectangle in a normalised model input."""
    unit = tensor[0] * STD + MEAN
    ys, xs = torch.nonzero(unit > 0.5, as_tuple=True)
    mid_y, mid_x = int(ys.float().mean()), int(xs.float().mean())
    x1, x2 = _crossings(unit[mid_y])
    y1, y2 = _crossings(unit[:, mid_x])
    return torch.tensor([x1, y1, x2, y2])


@pytest.mark.parametrize(
    "shape, rect, photometric",
    [
        ((400, 300), (60, 100, 180, 220), "MONOCHROME2"),  # portrait: padded left/right
        ((300, 512), (256, 40, 400, 168), "MONOCHROME1"),  # landscape, inverted
        ((257, 257), (0, 0, 64, 32), "MONOCHROME1"),  # square, touching the corner
    ],
)
def test_bright_rectangle_maps_back_to_its_source_pixels(shape, rect, photometric):
    x1, y1, x2, y2 = rect
    rows, cols = shape
    bright, dark = (200, 3000) if photometric == "MONOCHROME1" else (3000, 200)
    pixels = np.full(shape, dark, dtype=np.uint16)
    pixels[y1:y2, x1:x2] = bright
    ds = make_ds(pixels, photometric, BitsStored=12)
    prep = preprocess(ds, SIZE, MEAN, STD)
    assert prep.tensor.shape == (1, SIZE, SIZE)
    # the rectangle is the brightest thing in the model input; the padding is black
    assert prep.tensor.max() == pytest.approx((1 - MEAN) / STD)
    found = bright_box(prep.tensor)
    back = prep.transform.to_source(found)
    assert back.tolist() == pytest.approx([x1, y1, x2, y2], abs=1.0)  # within one source pixel
    assert torch.allclose(prep.transform.to_model(torch.tensor(rect, dtype=torch.float32)), found, atol=0.5)


def test_transform_is_exact_on_the_padded_frame():
    prep = preprocess(make_ds(np.arange(300 * 200, dtype=np.uint16).reshape(300, 200)), SIZE, MEAN, STD)
    t = prep.transform
    # the resized image occupies the centre columns: its model-pixel frame maps to the whole source image
    frame = torch.tensor([t.offset_x, t.offset_y, t.offset_x + 200 * t.scale_x, t.offset_y + 300 * t.scale_y])
    assert t.to_source(frame).tolist() == pytest.approx([0, 0, 200, 300], abs=1e-4)
    # boxes reaching into the padding are clipped to the image
    assert t.to_source(torch.tensor([0.0, 0.0, SIZE, SIZE])).tolist() == pytest.approx([0, 0, 200, 300])


def test_window_modality_lut_and_monochrome1():
    pixels = np.array([[0, 100], [200, 300]], dtype=np.uint16)
    ds = make_ds(pixels, WindowCenter=150, WindowWidth=101, RescaleSlope=2, RescaleIntercept=-100)
    unit = dicom_to_unit(ds)  # values -100, 100, 300, 500 against window [99.5, 200.5]
    np.testing.assert_allclose(unit, [[0.0, 0.005], [1.0, 1.0]], atol=1e-6)
    ds.PhotometricInterpretation = "MONOCHROME1"
    np.testing.assert_allclose(dicom_to_unit(ds), [[1.0, 0.995], [0.0, 0.0]], atol=1e-6)


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT"])
@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
@pytest.mark.parametrize("rescale", [None, (1, 0), (0.5, -1024)])
def test_the_float32_window_is_the_standards_float64_pipeline(function, photometric, rescale):
    """The one-affine fast path against pydicom's modality LUT and the window formulas in float64."""
    pixels = np.random.default_rng(1).integers(0, 2**15, size=(300, 200)).astype(np.uint16)
    attrs = {"WindowCenter": 9000, "WindowWidth": 12000, "VOILUTFunction": function}
    if rescale is not None:
        attrs.update(RescaleSlope=rescale[0], RescaleIntercept=rescale[1])
    ds = make_ds(pixels, photometric, BitsStored=15, **attrs)
    values = apply_modality_lut(pixels, ds).astype(np.float64)
    c, w = 9000, 12000
    if function == "LINEAR":
        expected = np.clip((values - (c - 0.5)) / (w - 1) + 0.5, 0.0, 1.0)
    else:
        expected = np.clip((values - c) / w + 0.5, 0.0, 1.0)
    if photometric == "MONOCHROME1":
        expected = 1.0 - expected
    np.testing.assert_allclose(dicom_to_unit(ds), expected, atol=2e-6)


def test_voi_lut_sequence_wins_over_window():
    pixels = np.array([[0, 1], [2, 3]], dtype=np.uint16)
    ds = make_ds(pixels, WindowCenter=0, WindowWidth=2)
    item = pydicom.Dataset()
    item.LUTDescriptor = [4, 0, 8]
    item.LUTData = [0, 255, 51, 102]
    ds.VOILUTSequence = pydicom.Sequence([item])
    np.testing.assert_allclose(dicom_to_unit(ds), [[0.0, 1.0], [0.2, 0.4]], atol=1e-6)


def test_no_window_uses_robust_percentiles():
    rng = np.random.default_rng(0)
    pixels = rng.integers(1000, 2000, size=(64, 64)).astype(np.uint16)
    pixels[0, 0] = 65535  # one hot pixel must not squash the rest
    unit = dicom_to_unit(make_ds(pixels))
    assert unit.min() == 0.0 and unit.max() == 1.0
    assert 0.4 < float(np.median(unit)) < 0.6


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda ds: delattr(ds, "PixelData"), "no Pixel Data"),
        (lambda ds: setattr(ds, "PhotometricInterpretation", "RGB"), "not grayscale"),
        (lambda ds: setattr(ds, "PixelData", ds.PixelData[:100]), "cannot decode pixel data"),
        (lambda ds: setattr(ds, "BitsAllocated", 32), "Bits Allocated 32"),
        (lambda ds: setattr(ds, "NumberOfFrames", 3), "multi-frame"),
        (lambda ds: setattr(ds, "PixelData", bytes(len(ds.PixelData))), "no contrast"),
    ],
)
def test_unusable_pixel_data_is_a_clear_preprocess_error(mutate, reason):
    ds = make_ds(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64))
    mutate(ds)
    with pytest.raises(PreprocessError, match=reason):
        preprocess(ds, SIZE, MEAN, STD)


def _voi_lut_sequence(ds: pydicom.Dataset) -> None:
    item = pydicom.Dataset()
    item.LUTDescriptor = [4096, 0, 12]
    item.LUTData = list(range(4095, -1, -1))
    ds.VOILUTSequence = pydicom.Sequence([item])


@pytest.mark.parametrize(
    "pixels, photometric, attrs",
    [
        # 16 bits stored: values >= 32768 travel to the device as negative int16 bits and must come back
        (np.random.default_rng(2).integers(0, 2**16, (300, 200)).astype(np.uint16), "MONOCHROME1",
         {"WindowCenter": 40000, "WindowWidth": 30000}),
        (np.random.default_rng(3).integers(0, 2**12, (200, 310)).astype(np.uint16), "MONOCHROME2",
         {"BitsStored": 12, "WindowCenter": 2048, "WindowWidth": 4096, "RescaleSlope": 0.5, "RescaleIntercept": -7,
          "VOILUTFunction": "LINEAR_EXACT"}),
        (np.random.default_rng(4).integers(0, 256, (150, 150)).astype(np.uint8), "MONOCHROME1",
         {"WindowCenter": 128, "WindowWidth": 200}),
        (np.random.default_rng(5).integers(0, 2**12, (120, 90)).astype(np.uint16), "MONOCHROME2",
         {"BitsStored": 12}),  # no window: percentiles on the host, the identity on the device
        (np.random.default_rng(6).integers(0, 2**12, (90, 120)).astype(np.uint16), "MONOCHROME2",
         {"BitsStored": 12, "_voi": _voi_lut_sequence}),
    ],
    ids=["uint16-full-range", "rescale-linear-exact", "uint8", "percentiles", "voi-lut"],
)
def test_mapping_and_resize_on_a_device_compute_the_host_path(pixels, photometric, attrs):
    """``preprocess(device=...)`` runs the same float32 operations in the same order as the host path; run on
    the CPU here, it must give identical tensors (on a GPU the one difference is the resize kernel's
    summation order)."""
    attrs = dict(attrs)
    voi = attrs.pop("_voi", None)
    ds = make_ds(pixels, photometric, **attrs)
    if voi is not None:
        voi(ds)
    host = preprocess(ds, SIZE, MEAN, STD)
    device = preprocess(ds, SIZE, MEAN, STD, device=torch.device("cpu"))
    assert device.transform == host.transform
    assert torch.equal(device.tensor, host.tensor)


def test_batch_helper_keeps_each_error_in_its_slot():
    good = make_ds(np.arange(64 * 80, dtype=np.uint16).reshape(64, 80))
    bad = make_ds(np.arange(64 * 80, dtype=np.uint16).reshape(64, 80), "PALETTE COLOR")
    out = preprocess_many([good, bad, good], SIZE, MEAN, STD, workers=2)
    assert isinstance(out[1], PreprocessError)
    assert torch.equal(out[0].tensor, out[2].tensor)


# -- the real radiograph in three transfer syntaxes ---------------------------------------------------------

@pytest.fixture(scope="module")
def rg1(real_dicom_dir):
    return {name: pydicom.dcmread(real_dicom_dir / f"RG1_{name}.dcm") for name in ("UNCR", "J2KR", "J2KI")}


def test_real_rg1_lossless_copies_give_identical_tensors(rg1):
    out = {name: preprocess(ds, 256, MEAN, STD) for name, ds in rg1.items()}
    assert torch.equal(out["UNCR"].tensor, out["J2KR"].tensor)
    assert out["UNCR"].transform == out["J2KR"].transform == out["J2KI"].transform
    assert (out["UNCR"].tensor - out["J2KI"].tensor).abs().max() < 0.1  # lossy, but the same image
    t = out["UNCR"].transform
    assert (t.source_rows, t.source_columns) == (1955, 1841)


def test_real_rg1_preprocessed_on_a_device_is_the_host_result(rg1):
    for ds in rg1.values():
        assert torch.equal(preprocess(ds, 256, MEAN, STD, device=torch.device("cpu")).tensor,
                           preprocess(ds, 256, MEAN, STD).tensor)


def test_real_rg1_is_inverted_so_that_lungs_are_dark(rg1):
    """MONOCHROME1: stored low = white. After preprocessing, the (air-filled) lung fields must be darker
    than the mediastinum between them."""
    unit = dicom_to_unit(rg1["UNCR"])
    rows, cols = unit.shape
    band = unit[rows // 3: rows // 2]
    lungs = (band[:, cols // 5: cols // 3].mean() + band[:, 2 * cols // 3: 4 * cols // 5].mean()) / 2
    mediastinum = band[:, 9 * cols // 20: 11 * cols // 20].mean()
    assert lungs < mediastinum


def test_corrupt_jpeg2000_stream_is_a_preprocess_error(rg1):
    ds = pydicom.dcmread(rg1["J2KR"].filename)
    frames = list(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = pydicom.encaps.encapsulate([frames[0][: len(frames[0]) // 50]])
    with pytest.raises(PreprocessError, match="JPEG 2000"):
        preprocess(ds, SIZE, MEAN, STD)


def test_ybr_full_422_is_read_by_its_luminance() -> None:
    """A colour capture (native YBR_FULL_422, subsampled chroma) is the grey image of its Y samples."""
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("SC_ybr_full_422_uncompressed.dcm"))
    unit = dicom_to_unit(ds)
    reference = pydicom.dcmread(get_testdata_file("SC_ybr_full_422_uncompressed.dcm"))
    reference.pixel_array_options(as_rgb=False)
    y = reference.pixel_array[..., 0].astype(np.float32)
    assert unit.shape == (100, 100)
    np.testing.assert_allclose(unit, (y - y.min()) / (y.max() - y.min()), atol=1 / 255)
