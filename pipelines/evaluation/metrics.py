"""Metrics, each a plain function of arrays or strings, so that they can be checked on their own (the
report metrics against real report text, the others against hand-made cases).

* report text: BLEU-1..4, METEOR, ROUGE-L and CIDEr from pycocoevalcap (the implementations RGRG and the
  report-generation literature quote), on lower-cased, punctuation-split tokens;
* detection: IoU per (image, region), its mean, and the per-region hit rate at IoU >= 0.5;
* region selection / abnormality: precision, recall and F1 over all (image, region) pairs;
* classification: ROC AUC per CheXpert label and the macro average over the labels that have both
  classes in the evaluation set (AUC is undefined otherwise; those labels are listed, not guessed).
"""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Sequence

import numpy as np

_TOKEN = re.compile(r"[a-z0-9]+(?:[.'-][a-z0-9]+)*|[^\sa-z0-9]")


def tokenize(text: str) -> str:
    """Lower-case, split punctuation off words, drop the final full stops (they would inflate BLEU)."""
    tokens = [t for t in _TOKEN.findall(text.lower()) if t not in {".", ","}]
    return " ".join(tokens)


def report_scores(references: Sequence[str], hypotheses: Sequence[str], meteor: bool = True) -> dict[str, float]:
    """Corpus-level report metrics. ``meteor=False`` skips the one metric that needs Java."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    if not references:
        raise ValueError("no reports to score")
    # pycocoevalcap cannot score an empty hypothesis (division by zero inside ROUGE); one placeholder
    # token scores (almost) nothing, which is what an empty report deserves
    gts = {i: [tokenize(r) or "empty"] for i, r in enumerate(references)}
    res = {i: [tokenize(h) or "empty"] for i, h in enumerate(hypotheses)}
    out: dict[str, float] = {}
    with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its internals
        bleu, _ = Bleu(4).compute_score(gts, res)
    for n, value in enumerate(bleu, start=1):
        out[f"bleu_{n}"] = float(value)
    out["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
    out["cider"] = float(Cider().compute_score(gts, res)[0])
    if meteor:
        from pycocoevalcap.meteor.meteor import Meteor

        scorer = Meteor()
        try:
            out["meteor"] = float(scorer.compute_score(gts, res)[0])
        finally:
            _close_meteor(scorer)
    return out


def _close_meteor(scorer) -> None:
    """pycocoevalcap keeps a Java subprocess per scorer; stop it rather than leak it."""
    proc = getattr(scorer, "meteor_p", None)
    if proc is not None and proc.poll() is None:
        with contextlib.suppress(Exception):
            proc.stdin.close()
            proc.kill()
            proc.wait(timeout=10)


def box_iou(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Element-wise IoU of ``[..., 4]`` boxes (x1, y1, x2, y2); NaN where the true box is NaN."""
    x1 = np.maximum(pred[..., 0], true[..., 0])
    y1 = np.maximum(pred[..., 1], true[..., 1])
    x2 = np.minimum(pred[..., 2], true[..., 2])
    y2 = np.minimum(pred[..., 3], true[..., 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = lambda b: np.clip(b[..., 2] - b[..., 0], 0, None) * np.clip(b[..., 3] - b[..., 1], 0, None)
    union = area(pred) + area(true) - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def detection_scores(pred: np.ndarray, true: np.ndarray, names: Sequence[str]) -> dict[str, object]:
    """``pred``/``true``: ``[N, R, 4]``; true NaN rows (region absent from the ground truth) are skipped."""
    iou = box_iou(pred, true)
    valid = ~np.isnan(true).any(axis=-1)
    per_region_iou = {n: _nanmean(iou[:, r][valid[:, r]]) for r, n in enumerate(names)}
    hits = {n: _nanmean((iou[:, r][valid[:, r]] >= 0.5).astype(float)) for r, n in enumerate(names)}
    return {
        "mean_iou": _nanmean(iou[valid]),
        "hit_rate": _nanmean((iou[valid] >= 0.5).astype(float)),
        "per_region_iou": per_region_iou,
        "per_region_hit_rate": hits,
    }


def binary_scores(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """Precision / recall / F1 of boolean arrays of any (equal) shape, over all elements."""
    pred, true = pred.astype(bool).ravel(), true.astype(bool).ravel()
    tp = float(np.sum(pred & true))
    fp = float(np.sum(pred & ~true))
    fn = float(np.sum(~pred & true))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def classification_scores(probs: np.ndarray, labels: np.ndarray, names: Sequence[str]) -> dict[str, object]:
    """``probs``/``labels``: ``[N, L]``; label NaN = unknown (excluded for that label)."""
    from sklearn.metrics import roc_auc_score

    auc: dict[str, float | None] = {}
    undefined = []
    for j, name in enumerate(names):
        known = ~np.isnan(labels[:, j])
        y = labels[known, j]
        if len(np.unique(y)) < 2:
            auc[name] = None
            undefined.append(name)
            continue
        auc[name] = float(roc_auc_score(y, probs[known, j]))
    defined = [v for v in auc.values() if v is not None]
    return {
        "auc": auc,
        "macro_auc": float(np.mean(defined)) if defined else None,
        "auc_undefined": undefined,
    }


def _nanmean(x: np.ndarray) -> float | None:
    x = np.asarray(x, dtype=float)
    return float(np.mean(x)) if x.size else None
