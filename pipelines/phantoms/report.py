"""Radiology phrasing for phantom findings: one sentence per reported region.

The wording is varied across findings, grades, sides and zones but is a *function* of what is drawn, never
a coin toss: a sentence a model cannot infer from the pixels would only teach it to hedge. Normal
statements follow fixed rules (the heart, the mediastinum and each clear lung are always commented on),
so which regions a report mentions - the region selection labels - follows from the image too.
"""

from __future__ import annotations

from pipelines.constants import REGIONS
from pipelines.phantoms.findings import Finding


def finding_sentence(f: Finding) -> str:
    s, z = f.side_name, f.zone
    match f.kind:
        case "cardiomegaly":
            return {
                "mild": "The heart is mildly enlarged.",
                "moderate": "There is moderate cardiomegaly.",
                "severe": "The cardiac silhouette is severely enlarged.",
            }[f.severity]
        case "widened_mediastinum":
            return "The upper mediastinum is widened."
        case "effusion":
            return {
                "small": f"There is a small {s} pleural effusion blunting the costophrenic angle.",
                "moderate": f"A moderate {s} pleural effusion is present.",
                "large": f"There is a large {s} pleural effusion with adjacent compressive atelectasis.",
            }[f.severity]
        case "pneumothorax":
            return {
                "small": f"A small {s} apical pneumothorax is seen.",
                "large": f"There is a large {s} pneumothorax.",
            }[f.severity]
        case "consolidation":
            return f"Consolidation in the {s} {z} lung zone is concerning for pneumonia."
        case "opacity":
            return f"Hazy opacity is noted in the {s} {z} lung zone."
        case "nodule":
            return {
                "small": f"A small nodule is seen in the {s} {z} lung zone.",
                "medium": f"There is a nodule in the {s} {z} lung zone.",
                "mass": f"A large mass is present in the {s} {z} lung zone.",
            }[f.severity]
        case "atelectasis":
            return f"Plate-like atelectasis is present in the {s} lower lung zone."
        case "edema":
            return {
                "mild": "There is mild pulmonary edema.",
                "moderate": "Moderate pulmonary edema is present.",
            }[f.severity]
        case "et_tube":
            return {
                "standard": "An endotracheal tube terminates in standard position above the carina.",
                "low": "The endotracheal tube tip is low, just above the carina.",
            }[f.severity]
        case "central_line":
            return {
                "svc": "A right internal jugular catheter terminates in the mid svc.",
                "cavoatrial": "A right internal jugular catheter terminates at the cavoatrial junction.",
            }[f.severity]
    raise ValueError(f"unknown finding kind {f.kind!r}")


def region_sentences(findings: tuple[Finding, ...]) -> tuple[str | None, ...]:
    """The sentence of each of the 29 regions (``REGIONS`` order), ``None`` where it is not reported."""
    sentences: dict[str, str] = {}
    for f in findings:
        for region in f.report_regions():
            sentences[region] = finding_sentence(f)  # slots are disjoint by construction
    kinds = {f.kind for f in findings}
    if "cardiomegaly" not in kinds:
        sentences["cardiac silhouette"] = "The heart size is normal."
    if "widened_mediastinum" not in kinds:
        sentences["upper mediastinum"] = "The mediastinal contours are within normal limits."
    lung_findings = {f.side for f in findings if f.kind not in
                     ("cardiomegaly", "widened_mediastinum", "et_tube", "central_line")}
    clear = [s for s, name in ((-1, "right"), (1, "left")) if s not in lung_findings and 0 not in lung_findings]
    if len(clear) == 2:
        sentences["right lung"] = sentences["left lung"] = "The lungs are clear."
    elif clear:
        name = "right" if clear[0] == -1 else "left"
        sentences[f"{name} lung"] = f"The {name} lung is clear."
    if not kinds & {"effusion", "pneumothorax"}:
        sentences["right costophrenic angle"] = sentences["left costophrenic angle"] = (
            "There is no pleural effusion or pneumothorax."
        )
    return tuple(sentences.get(r) for r in REGIONS)


def assemble_report(sentences: tuple[str | None, ...]) -> str:
    """Join region sentences the way the engine does: anatomical order, each distinct sentence once."""
    seen: list[str] = []
    for s in sentences:
        if s and s not in seen:
            seen.append(s)
    return " ".join(seen)
