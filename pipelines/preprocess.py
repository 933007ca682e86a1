"""From a DICOM dataset to the square, normalised tensor the models see, and the way back for boxes.

Steps, in the order the DICOM standard's grayscale pipeline defines them (PS3.3 C.11, C.7.6.3.1.2):

1. decode the pixel data in any transfer syntax pydicom has a handler for (native, RLE, JPEG, JPEG-LS,
   JPEG 2000 through the pylibjpeg plugins);
2. Modality LUT (Rescale Slope/Intercept or a Modality LUT Sequence);
3. VOI: the first VOI LUT of the dataset, else its first window (LINEAR, LINEAR_EXACT or SIGMOID), else the
   0.5-99.5 percentile range of the image, so a missing window never yields a black or white image;
4. MONOCHROME1 is inverted so that, as for MONOCHROME2, bright means dense;
5. the longest side is resized to the model size, the other keeps the aspect ratio, and the image is centred
   on a black square (as RGRG's LongestMaxSize + PadIfNeeded);
6. ``(x - mean) / std``.

Step 5 and 6 come in two flavours (``ModelConfig.image_resize``): ``bilinear``, the node's own (antialiased
bilinear on the float image), and ``area-uint8``, RGRG's (albumentations on an 8-bit image: the grey levels
rounded to 8 bits, OpenCV's ``INTER_AREA`` resize rounded to 8 bits, zero padding, then ``Normalize``'s
``(x - 255 mean) / (255 std)`` in float32).

:class:`BoxTransform` remembers step 5 so that boxes found in model pixels map back to source pixels.
Anything undecodable or not a single-frame grayscale image raises
:class:`pipelines.interface.PreprocessError` with the reason.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pydicom
import torch
import torch.nn.functional as F
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from pipelines.interface import PreprocessError

_PERCENTILES = (0.5, 99.5)


@dataclass(frozen=True)
class BoxTransform:
    """Source image -> model input geometry. Coordinates are pixel-edge based (0 = top-left corner of the
    top-left pixel), x = column, y = row: the DICOM SCOORD convention used by ``RegionResult.box``."""

    source_rows: int
    source_columns: int
    scale_x: float  # model pixels per source pixel
    scale_y: float
    offset_x: float  # padding on the left / top, model pixels
    offset_y: float

    def to_source(self, boxes: torch.Tensor) -> torch.Tensor:
        """``[..., 4]`` model-pixel boxes (x1, y1, x2, y2) -> source pixels, clipped to the image."""
        return boxes_to_source(boxes.unsqueeze(0), [self])[0]

    def to_model(self, boxes: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_source` (for training targets given in source pixels)."""
        shift = boxes.new_tensor([self.offset_x, self.offset_y, self.offset_x, self.offset_y])
        scale = boxes.new_tensor([self.scale_x, self.scale_y, self.scale_x, self.scale_y])
        return boxes * scale + shift


def boxes_to_source(boxes: torch.Tensor, transforms: Sequence[BoxTransform]) -> torch.Tensor:
    """:meth:`BoxTransform.to_source` for a batch: ``boxes[B, ..., 4]`` with one transform per image, in one
    vectorised operation."""
    params = torch.tensor([[t.offset_x, t.offset_y, t.scale_x, t.scale_y, t.source_columns, t.source_rows]
                           for t in transforms], dtype=boxes.dtype, device=boxes.device)
    shape = (len(transforms),) + (1,) * (boxes.dim() - 2) + (4,)
    shift, scale, limit = (params[:, [i, i + 1, i, i + 1]].view(shape) for i in (0, 2, 4))
    return torch.minimum(((boxes - shift) / scale).clamp(min=0.0), limit)


@dataclass(frozen=True)
class Preprocessed:
    tensor: torch.Tensor  # [1, S, S] float32, normalised
    transform: BoxTransform
    #: ``[3, s, s]`` float32: a published CLIP's input made from the unit image by its own preprocessing
    #: (:func:`fit_to_clip`); None where CLIP sees the detector input (the node's own CLIP, no spec)
    clip: torch.Tensor | None = None


# -- DICOM -> [0, 1] grayscale ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Decoded:
    """A radiograph decoded on the host, its grey-level mapping not yet applied:
    ``unit = clip(pixels * scale + offset, 0, 1)``.

    For the usual radiograph (steps 2-4 are one affine map, see :func:`_window_affine`) ``pixels`` are the
    stored integers, so that the mapping can run where the resize runs: on a GPU host the CPU then only
    decodes, and uploads half the bytes a float32 image would take. In every other case ``pixels`` already
    is the float32 unit image and the mapping is the identity."""

    pixels: np.ndarray  # [rows, cols]
    scale: float = 1.0
    offset: float = 0.0

    @property
    def mapped(self) -> bool:
        """True while ``pixels`` are stored values (integers) rather than the unit image."""
        return self.pixels.dtype != np.float32

    def unit(self) -> np.ndarray:
        """The float32 ``[rows, cols]`` unit image, computed on the host in place of one converted copy."""
        if not self.mapped:
            return self.pixels
        unit = self.pixels.astype(np.float32)
        unit *= np.float32(self.scale)
        unit += np.float32(self.offset)
        return np.clip(unit, 0.0, 1.0, out=unit)

    def unit_on(self, device: torch.device) -> torch.Tensor:
        """:meth:`unit` computed on ``device`` (the same float32 operations in the same order). To a GPU the
        host buffer goes through pinned memory, so the copy is DMA that overlaps the next image's decode."""
        pixels = np.ascontiguousarray(self.pixels)
        unsigned16 = pixels.dtype == np.uint16
        # int16 has every device kernel; uint16 is a "barebones" dtype in torch, so send its bits as int16
        host = torch.from_numpy(pixels.view(np.int16) if unsigned16 else pixels)
        if device.type == "cuda":
            host = host.pin_memory()
        values = host.to(device, non_blocking=True)
        if not self.mapped:
            return values
        unit = values.float()
        if unsigned16:
            unit = unit.remainder_(65536.0)  # -32768..-1 back to 32768..65535, exact in float32
        return unit.mul_(self.scale).add_(self.offset).clamp_(0.0, 1.0)


#: Photometric interpretations whose first sample is the luminance.
_LUMA_CHROMA = frozenset({"YBR_FULL", "YBR_FULL_422"})


def dicom_to_unit(ds: pydicom.Dataset) -> np.ndarray:
    """Decoded, LUT-applied, MONOCHROME2-oriented image as float32 ``[rows, cols]`` in [0, 1]."""
    return decode(ds).unit()


def decode(ds: pydicom.Dataset) -> Decoded:
    """Steps 1-4 up to the final affine map and clip (:class:`Decoded`); :class:`PreprocessError` with the
    reason if the dataset is not a decodable single-frame grayscale image with usable LUT attributes."""
    if "PixelData" not in ds:
        raise PreprocessError("dataset has no Pixel Data")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    # A radiograph captured in colour as luminance and chrominance (a digitiser, a secondary capture):
    # its luminance Y is the grey image, read as decoded, without a round trip through RGB.
    luma = photometric in _LUMA_CHROMA and int(ds.get("SamplesPerPixel", 1)) == 3
    if photometric not in ("MONOCHROME1", "MONOCHROME2") and not luma:
        raise PreprocessError(f"Photometric Interpretation {photometric or '(absent)'} is not grayscale "
                              f"(MONOCHROME1/2, or {'/'.join(sorted(_LUMA_CHROMA))} expected)")
    if int(ds.get("SamplesPerPixel", 1)) != 1 and not luma:
        raise PreprocessError(f"Samples per Pixel is {ds.SamplesPerPixel}, a grayscale image has 1")
    bits = int(ds.get("BitsAllocated", 0))
    if bits not in (8, 16):
        raise PreprocessError(f"Bits Allocated {bits} is not supported (8 or 16)")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows < 2 or cols < 2:
        raise PreprocessError(f"image size {rows}x{cols} is not usable")
    if int(ds.get("NumberOfFrames", 1) or 1) != 1:
        raise PreprocessError(f"multi-frame image ({ds.NumberOfFrames} frames): one radiograph per instance expected")
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    try:
        if luma:
            ds.pixel_array_options(as_rgb=False)
            raw = ds.pixel_array[..., 0]
        else:
            raw = ds.pixel_array
    except Exception as exc:  # pydicom/plugins raise many types for truncated or corrupt streams
        name = syntax.name if syntax is not None else "unknown transfer syntax"
        raise PreprocessError(f"cannot decode pixel data ({name}): {exc}") from None
    if raw.shape != (rows, cols):
        raise PreprocessError(f"decoded pixel array has shape {raw.shape}, Rows/Columns say {(rows, cols)}")
    try:
        decoded = _map(raw, ds, invert=photometric == "MONOCHROME1")
    except PreprocessError:
        raise
    except Exception as exc:  # malformed LUT / window attributes
        raise PreprocessError(f"cannot apply the modality/VOI LUT: {exc}") from None
    if not (np.isfinite(decoded.scale) and np.isfinite(decoded.offset)
            and (decoded.mapped or np.isfinite(decoded.pixels).all())):
        raise PreprocessError("pixel values are not finite after the LUTs")
    return decoded


def _map(raw: np.ndarray, ds: pydicom.Dataset, invert: bool) -> Decoded:
    """Steps 2-4. The usual radiograph (Rescale Slope/Intercept or none, then a LINEAR or LINEAR_EXACT
    window) is one affine map and a clip, left to :class:`Decoded` to apply in float32 in one converted
    copy: a chest image has ~7.5 M pixels, and the general path (pydicom's float64 modality LUT, the window,
    the inversion) makes five passes over them at twice the width. On a host feeding a GPU that memory
    traffic is the bottleneck."""
    affine = _window_affine(ds)
    if affine is None:
        values = apply_modality_lut(raw, ds)  # still integer unless rescaled: a VOI LUT indexes with it
        unit = _apply_voi(values, ds)
        unit = 1.0 - unit if invert else unit
        return Decoded(np.ascontiguousarray(unit, dtype=np.float32))
    scale, offset = affine
    if invert:  # 1 - clip(x) == clip(1 - x) on [0, 1]
        scale, offset = -scale, 1.0 - offset
    return Decoded(raw, scale, offset)


def _window_affine(ds: pydicom.Dataset) -> tuple[float, float] | None:
    """``(scale, offset)`` with ``unit = clip(raw * scale + offset, 0, 1)`` when the Modality LUT is a
    rescale and the VOI a valid LINEAR or LINEAR_EXACT window; None for every other case (LUT sequences,
    SIGMOID, no window, invalid widths), which :func:`_apply_voi` handles or refuses with the reason."""
    if ds.get("ModalityLUTSequence") or ds.get("VOILUTSequence"):
        return None
    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return None
    c, w = _first(ds.WindowCenter), _first(ds.WindowWidth)
    slope, intercept = 1.0, 0.0
    if "RescaleSlope" in ds and "RescaleIntercept" in ds:  # both or neither, as pydicom's apply_modality_lut
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
    function = str(ds.get("VOILUTFunction", "LINEAR")).strip().upper() or "LINEAR"
    if function == "LINEAR" and w > 1:  # PS3.3 C.11.2.1.2.1
        return slope / (w - 1), (intercept - (c - 0.5)) / (w - 1) + 0.5
    if function == "LINEAR_EXACT" and w > 0:  # C.11.2.1.3.2
        return slope / w, (intercept - c) / w + 0.5
    return None


def _first(value) -> float:
    return float(value[0] if isinstance(value, MultiValue) else value)


def _apply_voi(values: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    if ds.get("VOILUTSequence"):
        item = ds.VOILUTSequence[0]
        out_bits = int(item.LUTDescriptor[2])
        lut = apply_voi_lut(values, ds, index=0, prefer_lut=True).astype(np.float32)
        return np.clip(lut / float(2**out_bits - 1), 0.0, 1.0)
    values = values.astype(np.float32, copy=False)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        c, w = _first(ds.WindowCenter), _first(ds.WindowWidth)
        function = str(ds.get("VOILUTFunction", "LINEAR")).strip().upper() or "LINEAR"
        if function == "SIGMOID":
            if w <= 0:
                raise PreprocessError(f"Window Width {w} must be positive")
            return (1.0 / (1.0 + np.exp(-4.0 * (values - c) / w))).astype(np.float32)
        if function == "LINEAR_EXACT":
            if w <= 0:
                raise PreprocessError(f"Window Width {w} must be positive")
            return np.clip((values - c) / w + 0.5, 0.0, 1.0)
        if w < 1:
            raise PreprocessError(f"Window Width {w} must be >= 1 for a LINEAR window")
        if w == 1:  # the standard's degenerate case: a threshold at c - 0.5
            return (values > c - 0.5).astype(np.float32)
        return np.clip((values - (c - 0.5)) / (w - 1) + 0.5, 0.0, 1.0)
    lo, hi = np.percentile(values, _PERCENTILES)
    if hi <= lo:
        raise PreprocessError("image has no contrast (all pixels equal)")
    return np.clip((values - lo) / (hi - lo), 0.0, 1.0)


# -- [0, 1] grayscale -> model input ------------------------------------------------------------------------

RESIZES = ("bilinear", "area-uint8")


def fit_to_model(unit: np.ndarray | torch.Tensor, size: int, mean: float, std: float, resize: str = "bilinear"
                 ) -> Preprocessed:
    """Resize the longest side to ``size``, centre on a black square, normalise (``resize``: module docstring)."""
    image = torch.as_tensor(unit, dtype=torch.float32)  # a tensor stays on its device: the resize runs there
    rows, cols = image.shape
    scale = size / max(rows, cols)
    new_rows, new_cols = max(1, round(rows * scale)), max(1, round(cols * scale))
    top, left = (size - new_rows) // 2, (size - new_cols) // 2
    transform = BoxTransform(rows, cols, new_cols / cols, new_rows / rows, float(left), float(top))
    canvas = torch.zeros((1, size, size), dtype=torch.float32, device=image.device)
    if resize == "area-uint8":
        grey = torch.round(image.clamp(0.0, 1.0) * 255.0)  # the 8-bit image RGRG's JPEGs hold
        canvas[0, top:top + new_rows, left:left + new_cols] = resize_area_uint8(grey, new_rows, new_cols)
        return Preprocessed(normalize_uint8(canvas, mean, std), transform)
    if resize != "bilinear":
        raise ValueError(f"image_resize must be one of {RESIZES}, not {resize!r}")
    resized = F.interpolate(image[None, None], size=(new_rows, new_cols), mode="bilinear", align_corners=False,
                            antialias=True)[0, 0]
    canvas[0, top:top + new_rows, left:left + new_cols] = resized.clamp_(0.0, 1.0)
    return Preprocessed((canvas - mean) / std, transform)


def fit_to_clip(unit: np.ndarray | torch.Tensor, spec: Mapping[str, Any]) -> torch.Tensor:
    """``[3, s, s]`` input of a published CLIP from the unit image ``unit[H, W]``, by the model's own
    preprocessing (``ModelConfig.clip_preprocess``), on the unit image's device.

    With a ``canvas`` (CheXzero): the image letterboxed onto a ``canvas``-pixel square (as :func:`fit_to_model`
    does for the detector), then :func:`normalize_for_clip` (0-255 scale, bicubic resize to ``size``
    without antialiasing, its mean/std). Without (open_clip's ``Resize(size)`` + ``CenterCrop(size)``): the
    shorter side resized to ``size`` (the longer one truncated, as torchvision computes it), the centre
    ``size`` square cut out, then :func:`normalize_for_clip`."""
    image = torch.as_tensor(unit, dtype=torch.float32)
    size = int(spec["size"])
    if spec.get("canvas"):
        return normalize_for_clip(fit_to_model(image, int(spec["canvas"]), 0.0, 1.0).tensor[None], spec)[0]
    rows, cols = image.shape
    if rows <= cols:
        new_rows, new_cols = size, int(size * cols / rows)
    else:
        new_rows, new_cols = int(size * rows / cols), size
    resized = F.interpolate(image[None, None] * float(spec["scale"]), size=(new_rows, new_cols),
                            mode=spec["interpolation"], align_corners=False, antialias=bool(spec.get("antialias")))
    top, left = int(round((new_rows - size) / 2.0)), int(round((new_cols - size) / 2.0))
    return normalize_for_clip(resized[..., top:top + size, left:left + size], spec, scaled=True)[0]


def normalize_for_clip(images: torch.Tensor, spec: Mapping[str, Any], scaled: bool = False) -> torch.Tensor:
    """The steps a CLIP ``spec`` takes after its geometry: ``images[B, 1, h, w]`` in [0, 1] (or already
    multiplied by ``scale`` when ``scaled``) -> ``[B, 3, size, size]``: scaled to ``scale``, resized to ``size``
    (``interpolation``, ``antialias``; nothing to do when it is that size already), clamped to [0, scale] if
    ``clamp``, normalised per RGB channel with ``mean``/``std``."""
    x = images if scaled else images * float(spec["scale"])
    x = resize_square(x, int(spec["size"]), spec["interpolation"], bool(spec.get("antialias")))
    if spec.get("clamp"):
        x = x.clamp(0.0, float(spec["scale"]))
    mean = torch.tensor(spec["mean"], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(spec["std"], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x.expand(-1, 3, -1, -1) - mean) / std


def resize_square(images: torch.Tensor, size: int, mode: str, antialias: bool) -> torch.Tensor:
    """``images[B, C, h, w]`` resized to ``[B, C, size, size]``; returned as is when already that size."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode=mode, align_corners=False, antialias=antialias)


def normalize_uint8(grey: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """albumentations' ``Normalize(mean, std, max_pixel_value=255)`` on 0-255 grey levels, in its float32
    arithmetic: ``(x - float32(mean) * 255) * (1 / (float32(std) * 255))``."""
    mean32 = torch.tensor(mean, dtype=torch.float32) * 255.0
    inverse = torch.reciprocal(torch.tensor(std, dtype=torch.float32) * 255.0)
    return (grey.float() - mean32.to(grey.device)) * inverse.to(grey.device)


def resize_area_uint8(grey: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """OpenCV's ``resize(..., interpolation=INTER_AREA)`` of an 8-bit image ``grey[H, W]`` (0-255 values as
    float) to ``[rows, cols]``, in OpenCV's arithmetic so that the grey levels are identical (checked against
    opencv-python in the tests).

    Shrinking both axes: every output pixel is the mean of the source area it covers, partly covered pixels
    weighted by the covered fraction (OpenCV's ``computeResizeAreaTab``), accumulated in float32 in OpenCV's
    order and rounded half to even; an integer factor is OpenCV's block mean (a 2 x 2 block rounds halves up,
    as its SIMD path does). Otherwise OpenCV's linear interpolation with INTER_AREA's coefficients in its
    11-bit fixed point, with the vertical pass of its SIMD kernel."""
    h, w = grey.shape
    scale_y, scale_x = 1.0 / (rows / h), 1.0 / (cols / w)  # OpenCV: 1 / inv_scale
    if scale_y >= 1.0 and scale_x >= 1.0:
        int_y, int_x = round(scale_y), round(scale_x)
        if abs(scale_y - int_y) < 2.2e-16 and abs(scale_x - int_x) < 2.2e-16:
            blocks = grey.double()[: rows * int_y, : cols * int_x].reshape(rows, int_y, cols, int_x).sum((1, 3))
            if int_y == int_x == 2:
                return torch.floor((blocks + 2.0) / 4.0).float()
            return torch.round(blocks.float() * (1.0 / (int_y * int_x))).clamp_(0.0, 255.0)
        horizontal = _accumulate(grey.float(), *_area_taps(w, cols), dim=1)  # [H, cols]
        out = _accumulate(horizontal, *_area_taps(h, rows), dim=0)  # [rows, cols]
        return torch.round(out).clamp_(0.0, 255.0)  # saturate_cast: round half to even
    (y0, by0, y1, by1), (x0, bx0, x1, bx1) = (tuple(t.to(grey.device) for t in _linear_area_taps(n, m))
                                              for n, m in ((h, rows), (w, cols)))
    pixels = grey.long()
    horizontal = pixels[:, x0] * bx0 + pixels[:, x1] * bx1  # [H, cols], OpenCV's 11-bit fixed point
    # OpenCV's SIMD vertical pass: 16-bit high products of (row >> 4) and the coefficient, rounded by 2 bits
    value = ((horizontal[y0] >> 4) * by0[:, None] >> 16) + ((horizontal[y1] >> 4) * by1[:, None] >> 16)
    return ((value + 2) >> 2).clamp_(0, 255).float()


def _area_taps(src: int, dst: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One shrinking axis of OpenCV's INTER_AREA (``computeResizeAreaTab``): for each output index, the source
    indices ``[dst, taps]`` and float32 weights ``[dst, taps]`` in OpenCV's order (unused taps weigh 0)."""
    scale = 1.0 / (dst / src)
    rows: list[list[tuple[int, float]]] = []
    for d in range(dst):
        f1 = d * scale
        f2 = f1 + scale
        cell = min(scale, src - f1)
        s1, s2 = math.ceil(f1), math.floor(f2)
        s2 = min(s2, src - 1)
        s1 = min(s1, s2)
        taps = [(s1 - 1, (s1 - f1) / cell)] if s1 - f1 > 1e-3 else []
        taps += [(s, 1.0 / cell) for s in range(s1, s2)]
        if f2 - s2 > 1e-3:
            taps.append((s2, min(min(f2 - s2, 1.0), cell) / cell))
        rows.append(taps)
    width = max(len(t) for t in rows)
    index = torch.zeros((dst, width), dtype=torch.long)
    weight = torch.zeros((dst, width), dtype=torch.float32)
    for d, taps in enumerate(rows):
        for t, (s, a) in enumerate(taps):
            index[d, t], weight[d, t] = s, a
    return index, weight


def _accumulate(image: torch.Tensor, index: torch.Tensor, weight: torch.Tensor, dim: int) -> torch.Tensor:
    """OpenCV's float32 accumulation of one axis, tap after tap: ``sum_t image[.., index[:, t]] * weight[:, t]``
    along ``dim``, each product and each sum rounded to float32 in OpenCV's order."""
    index, weight = index.to(image.device), weight.to(image.device)
    out = None
    for t in range(index.shape[1]):
        term = image.index_select(dim, index[:, t]) * weight[:, t].view((1, -1) if dim == 1 else (-1, 1))
        out = term if out is None else out + term
    assert out is not None
    return out


def _linear_area_taps(src: int, dst: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """OpenCV's linear resize with INTER_AREA's coefficients along one axis: for each output index the two
    source indices and their 11-bit coefficients (``[dst]`` each)."""
    i0, c0, i1, c1 = [], [], [], []
    scale, inverse = 1.0 / (dst / src), dst / src
    for d in range(dst):
        s = math.floor(d * scale)
        f = (d + 1) - (s + 1) * inverse
        f = float(np.float32(0.0 if f <= 0 else f - math.floor(f)))  # OpenCV keeps it as a float
        if s < 0:
            s, f = 0, 0.0
        if s >= src - 1:
            s, f = src - 1, 0.0
        i0.append(s)
        i1.append(min(s + 1, src - 1))
        c0.append(int(_round_half_even((1.0 - f) * 2048.0)))
        c1.append(int(_round_half_even(f * 2048.0)))
    return torch.tensor(i0), torch.tensor(c0), torch.tensor(i1), torch.tensor(c1)


def _round_half_even(x: float) -> float:
    return float(np.rint(np.float32(x)))


def preprocess(ds: pydicom.Dataset, size: int, mean: float, std: float, device: torch.device | None = None,
               resize: str = "bilinear", clip: Mapping[str, Any] | None = None) -> Preprocessed:
    """One dataset to a model input; :class:`PreprocessError` if it cannot be used. With a ``clip`` spec
    (``ModelConfig.clip_preprocess``) also the CLIP input from the same unit image (:func:`fit_to_clip`).

    With ``device`` only decoding runs on the host; the grey-level mapping, resize and padding run on
    ``device`` and the result lives there. Where a GPU does the model's work this is where it pays: a chest
    image's grey-level mapping and antialiased resize cost ~7-8 ms of one CPU core each and microseconds of
    GPU time, so without it a 16-core host preprocesses fewer images per second than the GPU analyses."""
    decoded = decode(ds)
    unit = decoded.unit() if device is None else decoded.unit_on(device)
    prepared = fit_to_model(unit, size, mean, std, resize)
    return replace(prepared, clip=fit_to_clip(unit, clip)) if clip else prepared


def preprocess_many(datasets: Sequence[pydicom.Dataset], size: int, mean: float, std: float,
                    workers: int = 4, device: torch.device | None = None, resize: str = "bilinear",
                    clip: Mapping[str, Any] | None = None) -> list[Preprocessed | PreprocessError]:
    """:func:`preprocess` over a batch in a thread pool (decoders and numpy release the GIL); a dataset that
    fails yields its :class:`PreprocessError` in its slot."""

    def one(ds: pydicom.Dataset) -> Preprocessed | PreprocessError:
        try:
            return preprocess(ds, size, mean, std, device, resize, clip)
        except PreprocessError as exc:
            return exc

    if len(datasets) <= 1 or workers <= 1:
        return [one(ds) for ds in datasets]
    with ThreadPoolExecutor(max_workers=min(workers, len(datasets)), thread_name_prefix="preprocess") as pool:
        return list(pool.map(one, datasets))
