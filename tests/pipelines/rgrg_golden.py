"""Golden files: what RGRG's own code produced on a user's machine, compared with what the node's bundle computes.

A golden directory (``PACS_NODE_RGRG_GOLDEN``; layout in ``docs/rgrg.md``) holds the bundle imported from the
same checkpoint (``bundle/``, or ``PACS_NODE_RGRG_BUNDLE``) and one ``<case>.npz`` per image with the arrays
:data:`FIELDS` names. :func:`compare_case` lists every difference, so that one run reports them all.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipelines.engine import Engine
from pipelines.preprocess import fit_to_model

#: name -> (required, what RGRG's code calls it)
FIELDS: dict[str, tuple[bool, str]] = {
    "image": (True, "the uint8 image as get_image_tensor reads it (cv2.imread IMREAD_UNCHANGED), [H, W]"),
    "input": (False, "get_image_tensor's output, float32 [1, 1, 512, 512]"),
    "boxes": (True, 'detections["top_region_boxes"][0], [29, 4]'),
    "scores": (False, 'detections["top_scores"][0], [29]'),
    "detected": (True, "class_detected[0], bool [29]"),
    "features": (False, 'roi_heads_output["top_region_features"][0], [29, D]'),
    "selection_logits": (False, "the region selection classifier's logits, [29]"),
    "abnormal_logits": (False, "the abnormality classifier's logits, [29]"),
    "selected": (True, "selected_regions[0], bool [29]"),
    "token_ids": (True, "generate(num_beams=4, max_length=300, early_stopping=True)'s output ids, BOS first, [N, T]"),
    "report": (False, "the generated report (a 0-d string array)"),
}


def compare_case(engine: Engine, case: Path, atol: float = 1e-3) -> list[str]:
    """Differences between ``case`` (an ``.npz`` of RGRG outputs) and ``engine`` (float32) on its image."""
    golden = dict(np.load(case, allow_pickle=False))
    missing = [name for name, (required, _) in FIELDS.items() if required and name not in golden]
    if missing:
        return [f"{case.name}: lacks {', '.join(missing)}"]
    return [f"{case.name}: {p}" for p in differences(golden, node_outputs(engine, golden), atol)]


def node_outputs(engine: Engine, golden: dict[str, np.ndarray]) -> dict[str, object]:
    """What the node computes on the golden case's image (on RGRG's own input tensor, when the case has it)."""
    cfg = engine.cfg
    prepared = fit_to_model(torch.from_numpy(golden["image"].astype(np.float32)) / 255.0, cfg.image_size,
                            cfg.image_mean, cfg.image_std, cfg.image_resize)
    x = prepared.tensor[None]
    ours: dict[str, object] = {"input": x}
    if "input" in golden:
        x = torch.from_numpy(golden["input"]).reshape(x.shape)  # the model on RGRG's input, the transform alone
    with torch.inference_mode():
        det = engine.model.detector(x.to(engine.device))
        raw = engine.infer(x.to(engine.device))
        ours["selection_logits"] = engine.model.selector(det.features).float()[0].cpu()
        ours["abnormal_logits"] = engine.model.abnormality(det.features).float()[0].cpu()
    det = det.to("cpu")
    ours.update(boxes=det.boxes[0], scores=det.scores[0], detected=det.detected[0], features=det.features[0],
                selected=raw.selected[0].cpu(), token_ids=raw.token_ids.cpu().tolist(), eos=cfg.eos_token_id)
    kinds = {part["kind"] for part in engine.bundle.manifest.get("report", {}).values()}
    if "report" in golden and kinds <= {"spacy", "bertscore"}:  # the stand-ins do not reproduce RGRG's report
        ours["report"] = engine.run([prepared])[0].report
    return ours


def differences(golden: dict[str, np.ndarray], ours: dict[str, object], atol: float = 1e-3) -> list[str]:
    """Every difference between RGRG's outputs and the node's (:func:`node_outputs`)."""
    problems: list[str] = []

    def theirs(name: str) -> torch.Tensor:
        return torch.from_numpy(np.asarray(golden[name]))

    def close(name: str, value: torch.Tensor, tol: float) -> None:
        if name in golden:
            diff = float((value.float() - theirs(name).float().reshape(value.shape)).abs().max())
            if diff > tol:
                problems.append(f"{name} differ by up to {diff:.3g} (tolerance {tol:g})")

    close("input", ours["input"], 1e-5)
    detected = theirs("detected").bool()
    if not torch.equal(ours["detected"], detected):
        problems.append(f"detected differ for {int((ours['detected'] != detected).sum())} of 29")
    both = ours["detected"] & detected  # RGRG's boxes of undetected regions are placeholders
    close("boxes", torch.where(both[:, None], ours["boxes"], theirs("boxes").float()), atol)
    if "scores" in golden:
        close("scores", torch.where(both, ours["scores"], theirs("scores").float()), 1e-4)
    for name in ("features", "selection_logits", "abnormal_logits"):
        close(name, ours[name], 1e-4)
    selected = theirs("selected").bool()
    if not torch.equal(ours["selected"], selected):
        problems.append(f"selected differ for {int((ours['selected'] != selected).sum())} of 29")
        return problems
    eos = ours["eos"]
    mine = [_until_eos(row, eos) for row in ours["token_ids"]]
    rgrg = [_until_eos(row[1:], eos) for row in golden["token_ids"].tolist()]  # RGRG's rows start with BOS
    same = sum(a == b for a, b in zip(mine, rgrg))
    if len(mine) != len(rgrg) or same != len(rgrg):
        problems.append(f"{same} of {len(rgrg)} sentences' token ids identical")
    if "report" in ours and ours["report"] != str(golden["report"]):
        problems.append(f"report differs: {ours['report']!r} vs {str(golden['report'])!r}")
    return problems


def _until_eos(ids: list[int], eos: int) -> list[int]:
    return ids[: ids.index(eos) + 1] if eos in ids else ids
