"""One radiograph through one bundle, without a node: what ``pacs-node models run`` prints and draws.

The image goes through exactly the path the node's worker uses (:func:`pipelines.engine.load_pipeline`,
then ``analyse``), so what a model engineer sees here is what the node would send to the PACS. The picture
is the image as the model saw it (after the DICOM grey-level mapping), the boxes of the regions that got a
sentence, numbered, and beside it the numbered sentences, the report and the 14 label probabilities.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image, ImageDraw, ImageFont

from pipelines.interface import ImageResult, PipelineError
from pipelines.preprocess import decode

#: distinct box colours (Okabe-Ito, readable by colour-blind readers), cycled over the selected regions
_COLOURS = ("#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#FFFFFF")
_IMAGE_HEIGHT, _PANEL_WIDTH, _MARGIN = 1200, 900, 24


class InspectionError(Exception):
    """The file cannot be analysed; the message says why."""


def analyse_file(bundle_dir: str | Path, dicom_file: str | Path, device: str = "auto"
                 ) -> tuple[ImageResult, np.ndarray]:
    """The bundle's result for one DICOM file and the [0, 1] grey image it was computed from."""
    from pipelines.engine import load_pipeline  # torch and the models load only when a file is analysed

    try:
        ds = pydicom.dcmread(str(dicom_file))
    except (OSError, pydicom.errors.InvalidDicomError) as exc:
        raise InspectionError(f"{dicom_file}: not a readable DICOM file ({exc})") from None
    pipeline = load_pipeline(bundle_dir, device=device, batch_size=1)
    result = pipeline.analyse([ds])[0]
    if isinstance(result, PipelineError):
        raise InspectionError(f"{dicom_file}: {result}")
    return result, decode(ds).unit()


def result_json(result: ImageResult) -> dict[str, Any]:
    """The result as plain JSON-able data (boxes in source pixels, x = column, y = row)."""
    data = asdict(result)
    data["regions"] = [{**r, "box": [round(v, 1) for v in r["box"]]} for r in data["regions"]]
    return data


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _wrap(text: str, font, width: float) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and font.getlength(candidate) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    return [*lines, line] if line else lines


def draw_result(result: ImageResult, unit: np.ndarray, out_png: str | Path) -> Path:
    """Write the picture described in the module docstring as a PNG; a region the model's abnormality
    rule calls abnormal (:attr:`RegionResult.abnormal`) is marked so."""
    scale = _IMAGE_HEIGHT / unit.shape[0]
    width = max(1, round(unit.shape[1] * scale))
    grey = Image.fromarray(np.round(np.clip(unit, 0.0, 1.0) * 255).astype(np.uint8), mode="L")
    picture = grey.resize((width, _IMAGE_HEIGHT), Image.Resampling.LANCZOS).convert("RGB")
    canvas = Image.new("RGB", (width + _PANEL_WIDTH, _IMAGE_HEIGHT), "#101010")
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    small, body, title = _font(18), _font(21), _font(26)
    selected = [r for r in result.regions if r.selected]
    for n, region in enumerate(selected, start=1):
        colour = _COLOURS[(n - 1) % len(_COLOURS)]
        x1, y1, x2, y2 = (v * scale for v in region.box)
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=3)
        tag = str(n)
        tw = draw.textlength(tag, font=body)
        draw.rectangle((x1, y1, x1 + tw + 8, y1 + 26), fill=colour)
        draw.text((x1 + 4, y1 + 1), tag, fill="black", font=body)

    x, y, text_width = width + _MARGIN, _MARGIN, _PANEL_WIDTH - 2 * _MARGIN
    header = f"{result.model_name} {result.model_version}"
    draw.text((x, y), header, fill="white", font=title)
    y += 36
    if not result.clinical_use:
        draw.text((x, y), "NOT FOR CLINICAL USE - research / demonstration model", fill="#FF6060", font=body)
        y += 32
    y += 10
    for n, region in enumerate(selected, start=1):
        colour = _COLOURS[(n - 1) % len(_COLOURS)]
        flag = "  abnormal" if region.abnormal else ""
        draw.text((x, y), f"{n}. {region.name} (p abnormal {region.abnormal_prob:.2f}){flag}", fill=colour,
                  font=body)
        y += 27
        for line in _wrap(region.sentence or "(empty sentence)", small, text_width - 24):
            draw.text((x + 24, y), line, fill="#E0E0E0", font=small)
            y += 23
        y += 6
        if y > _IMAGE_HEIGHT * 0.55:
            remaining = len(selected) - n
            if remaining:
                draw.text((x, y), f"... and {remaining} more regions (see the printed result)", fill="#A0A0A0",
                          font=small)
                y += 27
            break
    if not selected:
        draw.text((x, y), "no region selected for a sentence", fill="#A0A0A0", font=body)
        y += 30
    y += 12
    draw.text((x, y), "Report", fill="white", font=title)
    y += 34
    for line in _wrap(result.report or "(empty)", small, text_width)[:8]:
        draw.text((x, y), line, fill="#E0E0E0", font=small)
        y += 23
    y += 14
    draw.text((x, y), "CheXpert label probabilities", fill="white", font=title)
    y += 34
    bar_x, bar_w = x + 300, text_width - 380
    for label, prob in sorted(result.label_probs.items(), key=lambda kv: -kv[1]):
        if y > _IMAGE_HEIGHT - 26:
            break
        draw.text((x, y), label, fill="#E0E0E0", font=small)
        draw.rectangle((bar_x, y + 4, bar_x + bar_w, y + 18), outline="#606060")
        draw.rectangle((bar_x, y + 4, bar_x + bar_w * prob, y + 18), fill="#56B4E9")
        draw.text((bar_x + bar_w + 10, y), f"{prob:.2f}", fill="#E0E0E0", font=small)
        y += 24
    out = Path(out_png)
    canvas.save(out, format="PNG")
    return out
