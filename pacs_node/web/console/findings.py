"""What the console shows of an analysed image, read back from the result objects the node stored —
never recomputed: the region boxes and per-region sentences and the finding probabilities from the AI
findings SR, the report text and impression from the narrative SR. What the page shows is therefore
exactly what was sent to the PACS.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pydicom
from pydicom import Dataset
from pydicom.uid import UID

from pacs_node.ops.context import ServerContext

_AI_SR_CLASSES = ("1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.88.33")  # Comprehensive 3D / SR
_NARRATIVE_SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.22"  # Enhanced SR


def _meaning(item: Dataset, attribute: str = "ConceptNameCodeSequence") -> str:
    codes = item.get(attribute)
    return str(codes[0].CodeMeaning) if codes else ""


def _walk(items: Any) -> Iterator[Dataset]:
    for item in items or []:
        yield item
        yield from _walk(item.get("ContentSequence"))


def ai_findings(sr: Dataset) -> dict[str, Any]:
    """``{"regions": [{name, box, sentence}], "findings": [{name, probability, present}], "notice"}``."""
    regions, findings, notice = [], [], None
    for item in _walk(sr.get("ContentSequence")):
        if item.get("ValueType") == "TEXT" and str(item.get("TextValue", "")).startswith("NOT FOR CLINICAL USE"):
            notice = str(item.TextValue)
        if item.get("ValueType") != "CONTAINER" or _meaning(item) != "Measurement Group":
            continue
        name, box, sentence, probability, present = None, None, None, None, None
        for child in item.get("ContentSequence") or []:
            kind, meaning = child.get("ValueType"), _meaning(child)
            if kind == "TEXT" and meaning == "Tracking Identifier":
                name = str(child.TextValue)
            elif kind == "TEXT" and meaning == "Finding":
                sentence = str(child.TextValue)
            elif kind == "SCOORD":
                points = [float(v) for v in child.GraphicData]
                xs, ys = points[0::2], points[1::2]
                box = [min(xs), min(ys), max(xs), max(ys)]
            elif kind == "NUM":
                probability = float(child.MeasuredValueSequence[0].NumericValue)
            elif kind == "CODE" and child.get("ConceptCodeSequence"):
                present = _meaning(child, "ConceptCodeSequence").lower() == "present"
        if box is not None:
            regions.append({"name": name, "box": box, "sentence": sentence})
        elif probability is not None and name:
            findings.append({"name": name.removesuffix(" classification"), "probability": probability,
                             "present": bool(present)})
    findings.sort(key=lambda f: -f["probability"])
    return {"regions": regions, "findings": findings, "notice": notice}


def narrative(sr: Dataset) -> dict[str, Any]:
    """``{"findings": [sentences], "impression": text | None, "notice": text | None}``."""
    sentences, impression, notice = [], None, None
    for item in _walk(sr.get("ContentSequence")):
        if item.get("ValueType") != "TEXT":
            continue
        meaning = _meaning(item)
        if meaning == "Finding":
            sentences.append(str(item.TextValue))
        elif meaning == "Impression":
            impression = str(item.TextValue)
        elif meaning == "Comment" and str(item.TextValue).startswith("NOT FOR CLINICAL USE"):
            notice = str(item.TextValue)
    return {"findings": sentences, "impression": impression, "notice": notice}


def study_findings(rt: ServerContext, report: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per received image of ``study_report``: what its stored results say (empty until analysed)."""
    images = []
    for item in report:
        image: dict[str, Any] = {"sop_instance_uid": item["sop_instance_uid"],
                                 "series_instance_uid": item["series_instance_uid"],
                                 "rows": item["rows"], "columns": item["columns"],
                                 "regions": [], "findings": [], "report": [], "impression": None, "notice": None,
                                 "results": [{**r, "class_name": UID(r["sop_class_uid"]).name}
                                             for r in item["results"]]}
        for result in item["results"]:
            if not result["path"]:
                continue
            try:
                ds = pydicom.dcmread(rt.store.path(result["path"]))
            except (OSError, ValueError):
                continue
            if result["sop_class_uid"] in _AI_SR_CLASSES:
                found = ai_findings(ds)
                image["regions"], image["findings"] = found["regions"], found["findings"]
                image["notice"] = image["notice"] or found["notice"]
            elif result["sop_class_uid"] == _NARRATIVE_SR_CLASS:
                text = narrative(ds)
                image["report"], image["impression"] = text["findings"], text["impression"]
                image["notice"] = text["notice"] or image["notice"]
        images.append(image)
    return images
