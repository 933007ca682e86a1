"""WADO-RS (PS3.18 10.4): studies, series and instances as ``multipart/related; type="application/dicom"``
(each instance as stored, streamed from the store), their metadata as DICOM JSON, and an instance
``/rendered`` as PNG or JPEG — for received images and for the node's own results alike.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.pixels import apply_voi_lut

from pacs_node.web.dicomweb.multipart import multipart_body, new_boundary, quoted
from storage.schema import Instance

#: A rendered image is scaled down to at most this many pixels on its longer side.
MAX_RENDERED_SIDE = 2048


def dicom_parts(store_path: Any, instances: Sequence[Instance]) -> tuple[str, Iterator[bytes]]:
    """(Content-Type, body) of a multipart/related response holding ``instances``."""
    boundary = new_boundary()
    parts = [(f"application/dicom; transfer-syntax={quoted(row.transfer_syntax_uid)}", store_path(row.path))
             for row in instances if row.path]
    content_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
    return content_type, multipart_body(parts, boundary)


def metadata(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """DICOM JSON of each instance, without its pixel data (PS3.18 10.4.1.1.2)."""
    out = []
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        ds.remove_private_tags()
        out.append(ds.to_json_dict(bulk_data_threshold=1 << 20,
                                   bulk_data_element_handler=lambda _element: ""))
    return out


def rendered(path: Path, media_type: str, max_side: int = MAX_RENDERED_SIDE) -> bytes:
    """The image as 8-bit grey PNG or JPEG: its VOI LUT or window applied (else the full range),
    MONOCHROME1 inverted, scaled down to ``max_side``, as a viewer would first show it."""
    from PIL import Image

    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array
    if pixels.ndim == 3 and ds.get("SamplesPerPixel", 1) == 1:
        pixels = pixels[0]  # the first frame
    if ds.get("SamplesPerPixel", 1) == 1:
        pixels = apply_voi_lut(pixels, ds).astype(np.float64)
        low, high = float(pixels.min()), float(pixels.max())
        pixels = (pixels - low) / (high - low or 1.0) * 255.0
        if ds.get("PhotometricInterpretation") == "MONOCHROME1":
            pixels = 255.0 - pixels
        image = Image.fromarray(pixels.astype(np.uint8), mode="L")
    else:
        image = Image.fromarray(pixels.astype(np.uint8))
    image.thumbnail((max_side, max_side))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG" if media_type == "image/jpeg" else "PNG")
    return buffer.getvalue()
