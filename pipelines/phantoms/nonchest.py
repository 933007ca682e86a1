"""Images a chest model must not read, for measuring the content gate (:mod:`pipelines.gate`).

Every probe is a ``(kind, image)`` pair, ``image`` float32 ``[rows, cols]`` in [0, 1] (1 = white on
MONOCHROME2), deterministic in its seed:

* ``hand``, ``knee``, ``skull``: synthetic radiographs of other body parts (bones as soft-edged dense
  shapes on soft tissue, the same exposure noise as the chest phantoms);
* ``texture``: natural-image-like scenes, 1/f ("pink") noise with a few smooth objects, as a photograph's
  statistics are;
* ``pattern``: stripes, checkerboards, gradients (test patterns, screenshots);
* ``noise``: uniform and Gaussian pixel noise; ``blank``: constant images;
* ``inverted``, ``rotated``: chest phantoms with the grey scale inverted, or turned by 90, 180, 270 degrees
  (what a wrong Photometric Interpretation or a mis-hung image gives);
* ``dicom``: the grayscale single-frame images among pydicom's test files (CT, MR, US, secondary captures,
  and the DCMTK-made ones it ships), decoded as the node would.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

from pipelines.phantoms.generator import generate_phantom
from pipelines.phantoms.render import smooth_noise

if TYPE_CHECKING:
    import pydicom

Probe = tuple[str, np.ndarray]


def _grid(rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    v, u = np.mgrid[0:rows, 0:cols].astype(np.float32)
    return u / cols, v / rows


def _capsule(u: np.ndarray, v: np.ndarray, p0: tuple[float, float], p1: tuple[float, float], r: float) -> np.ndarray:
    du, dv = p1[0] - p0[0], p1[1] - p0[1]
    t = np.clip(((u - p0[0]) * du + (v - p0[1]) * dv) / (du * du + dv * dv + 1e-9), 0, 1)
    d = np.hypot(u - p0[0] - t * du, v - p0[1] - t * dv)
    return np.clip((r - d) / (0.25 * r), 0, 1)


def _expose(density: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    img = 1 - np.exp(-density * rng.uniform(1.5, 3.0))
    img = ndimage.gaussian_filter(img, 1.0) + rng.normal(0, 0.02, img.shape)
    return np.clip(img, 0, 1).astype(np.float32)


def hand(seed: int, size: int = 320) -> np.ndarray:
    rng = np.random.default_rng([seed, 11])
    rows, cols = size, int(size * rng.uniform(0.7, 0.9))
    u, v = _grid(rows, cols)
    density = 0.4 * _capsule(u, v, (0.5, 0.95), (0.5, 0.55), rng.uniform(0.2, 0.26))  # palm soft tissue
    bone = np.zeros_like(u)
    spread = rng.uniform(0.08, 0.13)
    for finger in range(5):
        x = 0.5 + (finger - 2) * spread + rng.normal(0, 0.01)
        top = 0.12 + abs(finger - 2) * 0.05 + rng.uniform(-0.03, 0.03) if finger else 0.45
        x0 = x if finger else 0.2
        density += 0.35 * _capsule(u, v, (x0, top), (x, 0.6), 0.045)
        joints = np.linspace(top, 0.85, 4)
        for a, b in zip(joints[:-1], joints[1:]):
            bone = np.maximum(bone, _capsule(u, v, (x0 + (x - x0) * 0.0, a + 0.01), (x, b - 0.01), 0.018))
    return _expose(density + 1.2 * bone, rng)


def knee(seed: int, size: int = 320) -> np.ndarray:
    rng = np.random.default_rng([seed, 12])
    rows, cols = size, int(size * rng.uniform(0.6, 0.8))
    u, v = _grid(rows, cols)
    density = 0.5 * _capsule(u, v, (0.5, -0.1), (0.5, 1.1), rng.uniform(0.3, 0.38))
    femur = _capsule(u, v, (0.5, -0.1), (0.5, 0.42), 0.1) + _capsule(u, v, (0.35, 0.45), (0.65, 0.45), 0.09)
    tibia = _capsule(u, v, (0.5, 0.58), (0.5, 1.1), 0.09) + _capsule(u, v, (0.36, 0.56), (0.64, 0.56), 0.07)
    return _expose(density + 1.3 * np.clip(femur, 0, 1) + 1.3 * np.clip(tibia, 0, 1), rng)


def skull(seed: int, size: int = 320) -> np.ndarray:
    rng = np.random.default_rng([seed, 13])
    u, v = _grid(size, size)
    r = np.hypot((u - 0.5) / rng.uniform(0.36, 0.42), (v - 0.5) / rng.uniform(0.42, 0.47))
    vault = np.clip(1 - np.abs(r - 0.95) / 0.06, 0, 1)
    brain = 0.5 * (r < 0.95)
    jaw = _capsule(u, v, (0.3, 0.85), (0.7, 0.85), 0.05)
    return _expose(brain + 1.5 * vault + jaw, rng)


def texture(seed: int, size: int = 320) -> np.ndarray:
    rng = np.random.default_rng([seed, 14])
    rows, cols = size, int(size * rng.uniform(1.0, 1.5))
    spectrum = np.fft.fftfreq(rows)[:, None] ** 2 + np.fft.fftfreq(cols)[None, :] ** 2
    amplitude = 1 / np.maximum(spectrum, 1e-6) ** rng.uniform(0.9, 1.2)
    field = np.real(np.fft.ifft2(amplitude * np.exp(2j * np.pi * rng.random((rows, cols)))))
    img = (field - field.mean()) / (field.std() + 1e-9) * 0.15 + 0.5
    u, v = _grid(rows, cols)
    for _ in range(rng.integers(2, 6)):  # a few smooth objects (an animal, a cup, a face) on the scene
        cx, cy, rx, ry = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.05, 0.3), rng.uniform(0.05, 0.3)
        blob = np.clip(1 - np.hypot((u - cx) / rx, (v - cy) / ry), 0, 1) ** 0.3
        img = img * (1 - blob) + blob * (rng.uniform(0.1, 0.9) + 0.05 * smooth_noise(rng, (rows, cols), 8))
    return np.clip(img, 0, 1).astype(np.float32)


def pattern(seed: int, size: int = 320) -> np.ndarray:
    rng = np.random.default_rng([seed, 15])
    u, v = _grid(size, size)
    kind = seed % 3
    if kind == 0:
        period = rng.uniform(0.02, 0.2)
        angle = rng.uniform(0, np.pi)
        img = 0.5 + 0.5 * np.sign(np.sin(2 * np.pi * (u * np.cos(angle) + v * np.sin(angle)) / period))
    elif kind == 1:
        n = rng.integers(2, 16)
        img = ((np.floor(u * n) + np.floor(v * n)) % 2).astype(np.float32)
    else:
        angle = rng.uniform(0, 2 * np.pi)
        img = u * np.cos(angle) + v * np.sin(angle)
        img = (img - img.min()) / (np.ptp(img) + 1e-9)
    return img.astype(np.float32)


def noise(seed: int, size: int = 320) -> np.ndarray:
    rng = np.random.default_rng([seed, 16])
    if seed % 2:
        return rng.random((size, size), dtype=np.float32)
    return np.clip(rng.normal(0.5, rng.uniform(0.05, 0.3), (size, size)), 0, 1).astype(np.float32)


def blank(value: float, size: int = 320) -> np.ndarray:
    return np.full((size, size), value, dtype=np.float32)


def chest_variants(seed: int, size: int = 320) -> Iterator[Probe]:
    """One chest phantom inverted and turned three ways."""
    image = generate_phantom(seed, size).image
    yield "inverted", 1.0 - image
    for turns in (1, 2, 3):
        yield "rotated", np.ascontiguousarray(np.rot90(image, turns))


def pydicom_images() -> Iterator[Probe]:
    """pydicom's grayscale single-frame test images that decode (those needing a download are skipped)."""
    import warnings

    import pydicom
    from pydicom.data import get_testdata_files

    from pipelines.interface import PreprocessError
    from pipelines.preprocess import dicom_to_unit

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in sorted(get_testdata_files("*.dcm")):
            try:
                ds = pydicom.dcmread(path)
                unit = dicom_to_unit(ds)
            except (PreprocessError, Exception):  # noqa: BLE001 - not an image, or not one the node decodes
                continue
            if min(unit.shape) >= 16:
                yield "dicom", unit


def probes(count: int = 24, size: int = 320) -> Iterator[Probe]:
    """The whole non-chest set: ``count`` of each synthetic kind, 4 blanks, ``count // 4`` chest phantoms
    four ways each, and pydicom's test images."""
    for seed in range(count):
        for name, make in (("hand", hand), ("knee", knee), ("skull", skull), ("texture", texture),
                           ("pattern", pattern), ("noise", noise)):
            yield name, make(seed, size)
    for value in (0.0, 0.25, 0.5, 1.0):
        yield "blank", blank(value, size)
    for seed in range(count // 4):
        yield from chest_variants(900_000 + seed, size)
    yield from pydicom_images()


def labelled_chest(image: np.ndarray, seed: int, **options: object) -> pydicom.Dataset:
    """``image`` wrapped as a DX that says it is a PA chest (Body Part Examined CHEST, View Position PA):
    what a mislabelled or misrouted image looks like to the node. The header marks it synthetic like every
    phantom; ``options`` are :func:`pipelines.phantoms.dicom.phantom_dataset`'s keywords."""
    from pipelines.phantoms.dicom import _stored_values, phantom_dataset

    ds = phantom_dataset(seed, 64, modality="DX", **options)
    ds.Rows, ds.Columns = image.shape
    ds.PixelData = _stored_values(image, int(ds.BitsStored), str(ds.PhotometricInterpretation)).tobytes()
    ds.ImageComments = "SYNTHETIC NON-CHEST IMAGE labelled as a chest radiograph - for testing - not a patient"
    return ds
