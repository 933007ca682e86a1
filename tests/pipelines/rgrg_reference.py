"""What RGRG's own code computes, written for the tests from reading it (ttanida/rgrg, not copied): straight
from an RGRG state dict, one image and one region at a time, sharing no code with the node's model stack
beyond torchvision's operators.

* :func:`roi_heads` — ``CustomRoIHeads``: RoIAlign of every proposal, box head, softmax; each proposal belongs
  to its arg-max foreground class; per class the best-scoring such proposal (index 0 when none: the arg-max of
  an all-zero column); its *pooled proposal* averaged and projected (``dim_reduction``) is the region feature,
  its box regression for the class (decoded, clipped) the region box.
* :func:`classify` — the two binary classifiers; RGRG's rules are ``logit > -1``.
* :func:`lm_logits` — ``LanguageModel.forward`` with pseudo self-attention (uk/uv of the transformed feature
  as an extra key/value per layer, ``wte`` used for the position embeddings too, -1e4 masking).
* :func:`greedy` / :func:`beam` — ``greedy_search`` and ``beam_search`` with transformers 4.19's
  ``BeamSearchScorer`` (``early_stopping=True``, ``length_penalty=1.0``) for one region, given a function of
  the beams' tokens (:func:`rgrg_next_logprobs`: the whole sequence recomputed at every step, no cache).
* :func:`transform` — ``LongestMaxSize(512, INTER_AREA)``, ``PadIfNeeded`` (centred, 0), ``Normalize(0.471,
  0.302)`` on an 8-bit image (needs OpenCV).
* :func:`assemble` — ``remove_duplicate_generated_sentences`` with the given splitter and similarity.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import clip_boxes_to_image, roi_align

DET = "object_detector.roi_heads."
GPT = "language_model.gpt_with_lm_head.transformer."
EOS = BOS = PAD = 50256


def roi_heads(sd: dict[str, torch.Tensor], fmap: torch.Tensor, proposals: torch.Tensor, image_size: int = 512
              ) -> dict[str, torch.Tensor]:
    """One image: ``fmap[1,2048,h,w]``, ``proposals[P,4]`` -> boxes[29,4], scores[29], detected[29],
    features[29,D], winner[29] (proposal indices)."""
    pooled = roi_align(fmap, [proposals], output_size=8, spatial_scale=fmap.shape[-1] / image_size,
                       sampling_ratio=2, aligned=False)  # [P, 2048, 8, 8]
    x = F.relu(F.linear(pooled.flatten(1), sd[DET + "box_head.fc6.weight"], sd[DET + "box_head.fc6.bias"]))
    x = F.relu(F.linear(x, sd[DET + "box_head.fc7.weight"], sd[DET + "box_head.fc7.bias"]))
    logits = F.linear(x, sd[DET + "box_predictor.cls_score.weight"], sd[DET + "box_predictor.cls_score.bias"])
    regression = F.linear(x, sd[DET + "box_predictor.bbox_pred.weight"], sd[DET + "box_predictor.bbox_pred.bias"])
    scores = F.softmax(logits, -1)[:, 1:]  # [P, 29]
    votes = F.one_hot(scores.argmax(1), num_classes=29)
    top, winner = (scores * votes).max(dim=0)
    detected = votes.sum(0) > 0
    features = F.linear(pooled.mean(dim=(2, 3))[winner], sd[DET + "dim_reduction.weight"], sd[DET + "dim_reduction.bias"])
    boxes = BoxCoder((10.0, 10.0, 5.0, 5.0)).decode(regression, [proposals]).view(-1, 30, 4)
    boxes = clip_boxes_to_image(boxes, (image_size, image_size))[:, 1:]
    return {"boxes": boxes[winner, torch.arange(29)], "scores": top, "detected": detected, "features": features,
            "winner": winner}


def classify(sd: dict[str, torch.Tensor], head: str, features: torch.Tensor) -> torch.Tensor:
    """``binary_classifier_region_<head>``'s logits ``[...]`` for ``features[..., D]``."""
    x = features
    for i in (0, 2, 4):
        x = F.linear(x, sd[f"binary_classifier_region_{head}.classifier.{i}.weight"],
                     sd[f"binary_classifier_region_{head}.classifier.{i}.bias"])
        x = F.relu(x) if i < 4 else x
    return x.squeeze(-1)


def lm_logits(sd: dict[str, torch.Tensor], features: torch.Tensor, input_ids: torch.Tensor,
              heads: int = 16, last_only: bool = False) -> torch.Tensor:
    """``LanguageModel.forward`` logits ``[N, T, V]`` for ``features[N, D]`` and ``input_ids[N, T]`` (only the
    last position's, ``[N, 1, V]``, with ``last_only``: what generation uses of them)."""
    n, t = input_ids.shape
    wte = sd[GPT + "wte.weight"]
    e = wte.shape[1]
    hd = e // heads
    f = "language_model.feature_space_transformation_nn."
    image = F.linear(F.relu(F.linear(features, sd[f + "0.weight"], sd[f + "0.bias"])), sd[f + "2.weight"],
                     sd[f + "2.bias"])
    x = wte[input_ids] + wte[torch.arange(t)]  # RGRG embeds the positions with wte
    causal = torch.ones(t + 1, t + 1, dtype=torch.bool).tril()[1:]  # queries: words; keys: image + words
    layers = 1 + max(int(k[len(GPT) + 2:].split(".")[0]) for k in sd if k.startswith(GPT + "h."))

    def split(z: torch.Tensor) -> torch.Tensor:
        return z.view(n, -1, heads, hd).transpose(1, 2)

    for i in range(layers):
        p = f"{GPT}h.{i}."
        h = F.layer_norm(x, (e,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"], eps=1e-5)
        q, k, v = (h @ sd[p + "attn.c_attn.weight"] + sd[p + "attn.c_attn.bias"]).split(e, dim=-1)
        k = torch.cat([F.linear(image, sd[p + "attn.uk.weight"], sd[p + "attn.uk.bias"])[:, None], k], dim=1)
        v = torch.cat([F.linear(image, sd[p + "attn.uv.weight"], sd[p + "attn.uv.bias"])[:, None], v], dim=1)
        att = (split(q) @ split(k).transpose(-1, -2)) / hd**0.5
        att = torch.where(causal, att, torch.tensor(-1e4)).softmax(-1)
        out = (att @ split(v)).transpose(1, 2).reshape(n, t, e)
        x = x + out @ sd[p + "attn.c_proj.weight"] + sd[p + "attn.c_proj.bias"]
        h = F.layer_norm(x, (e,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"], eps=1e-5)
        h = F.gelu(h @ sd[p + "mlp.c_fc.weight"] + sd[p + "mlp.c_fc.bias"], approximate="tanh")  # gelu_new
        x = x + h @ sd[p + "mlp.c_proj.weight"] + sd[p + "mlp.c_proj.bias"]
    x = F.layer_norm(x, (e,), sd[GPT + "ln_f.weight"], sd[GPT + "ln_f.bias"], eps=1e-5)
    return (x[:, -1:] if last_only else x) @ wte.T


def rgrg_next_logprobs(sd, feature: torch.Tensor):
    """``next_logprobs(beams) -> [len(beams), V]`` of RGRG's language model for one region ``feature[D]``."""
    def next_logprobs(beams: list[list[int]]) -> torch.Tensor:
        ids = torch.tensor(beams)
        return lm_logits(sd, feature.expand(len(beams), -1), ids, last_only=True)[:, -1].float().log_softmax(-1)
    return next_logprobs


def greedy(next_logprobs, max_length: int, bos: int = BOS, eos: int = EOS) -> list[int]:
    """``greedy_search`` for one region: tokens after BOS, through EOS (``max_length`` counts BOS)."""
    seq = [bos]
    while True:
        seq.append(int(next_logprobs([seq])[0].argmax()))
        if seq[-1] == eos or len(seq) >= max_length:
            return seq[1:]


class _Hypotheses:
    """4.19's ``BeamHypotheses``: a list, a worst score, the add/evict rule."""

    def __init__(self, k: int) -> None:
        self.k, self.beams, self.worst = k, [], 1e9

    def add(self, hyp: list[int], sum_logprobs: float) -> None:
        score = sum_logprobs / len(hyp)  # length_penalty 1.0; the length counts BOS, not EOS
        if len(self.beams) < self.k or score > self.worst:
            self.beams.append((score, hyp))
            if len(self.beams) > self.k:
                ranked = sorted((s, i) for i, (s, _) in enumerate(self.beams))
                del self.beams[ranked[0][1]]
                self.worst = ranked[1][0]
            else:
                self.worst = min(score, self.worst)


def beam(next_logprobs, k: int, max_length: int, bos: int = BOS, eos: int = EOS) -> list[int]:
    """``beam_search`` with 4.19's scorer (early stopping) for one region: tokens after BOS (EOS appended when
    the best hypothesis ended)."""
    beams, scores = [[bos]] * k, [0.0] + [-1e9] * (k - 1)
    pool = _Hypotheses(k)
    done = False
    while True:
        logp = next_logprobs(beams) + torch.tensor(scores)[:, None]
        vocab = logp.shape[1]
        top, index = logp.view(-1).topk(2 * k)
        live, live_scores = [], []
        for rank, (score, i) in enumerate(zip(top.tolist(), index.tolist())):
            source, token = beams[i // vocab], i % vocab
            if token == eos:
                if rank < k:
                    pool.add(list(source), score)
            else:
                live.append(source + [token])
                live_scores.append(score)
            if len(live) == k:
                break
        beams, scores = live, live_scores
        done = len(pool.beams) >= k
        if done or len(beams[0]) >= max_length:
            break
    if not done:
        for b in range(k):
            pool.add(beams[b], scores[b])
    best = sorted(pool.beams, key=lambda item: item[0]).pop()[1]
    return best[1:] + ([eos] if len(best) < max_length else [])


def transform(image: np.ndarray, size: int = 512, mean: float = 0.471, std: float = 0.302) -> torch.Tensor:
    """RGRG's validation transform of an 8-bit ``image[H, W]`` -> ``[1, size, size]`` float32."""
    import cv2

    h, w = image.shape
    scale = size / float(max(w, h))
    resized = cv2.resize(image, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
    rh, rw = resized.shape
    top, left = int((size - rh) / 2.0), int((size - rw) / 2.0)
    padded = np.pad(resized, ((top, size - rh - top), (left, size - rw - left)), constant_values=0)
    mean32 = np.float32(mean) * np.float32(255.0)
    inverse = np.reciprocal(np.float32(std) * np.float32(255.0), dtype=np.float32)
    return torch.from_numpy(((padded.astype(np.float32) - mean32) * inverse)[None])


def assemble(sentences: list[str], split, similarity, threshold: float = 0.9) -> str:
    """``convert_generated_sentences_to_report`` with ``split(text) -> sentences`` and ``similarity(a, b)``."""
    found = list(dict.fromkeys(split(" ".join(sentences))))
    to_remove: dict[str, list[str]] = defaultdict(list)

    def removed(sentence: str) -> bool:
        return any(sentence in lst for lst in to_remove.values())

    for i in range(len(found)):
        for j in range(i + 1, len(found)):
            if removed(found[i]):
                break
            if removed(found[j]):
                continue
            if similarity(found[i], found[j]) > threshold:
                if len(found[i]) > len(found[j]):
                    to_remove[found[i]].append(found[j])
                else:
                    to_remove[found[j]].append(found[i])
    return " ".join(s for s in found if not removed(s))
