"""A synthetic RGRG checkpoint: RGRG's exact state-dict key names, biased so that every path RGRG has is taken.

Shapes: the ResNet-50 backbone and the RPN have the paper's (they are fixed by the architecture); the box head
(``REP``), the region features (``D``), the classifiers (``MLP``) and GPT-2 (``E`` wide, ``LAYERS`` layers,
``POSITIONS`` positions; the real vocabulary of 50,257) are narrowed so that a CPU test stays in seconds (the
paper: 1024, 1024, (512, 128), GPT-2 medium 1024 x 24 with 1024 positions).

Plain random weights test almost nothing (one proposal covering the whole image, one class winning it, every
logit on one side of -1, GPT-2 never ending a sentence), so :func:`biased_rgrg_state` calibrates them on the
test image: the RPN proposes its anchors, slightly shifted; the box head is
standardised and its class rows aimed at 29 different proposals (all 29 regions detected), the classifiers'
last layers scaled and shifted so that some regions are selected and some abnormal, and GPT-2 given an EOS
direction that grows with position, so that sentences end at varied lengths.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn
from torchvision.models import resnet50
from torchvision.ops import roi_align

from pipelines.importers.rgrg import build_model, config_from_checkpoint
from pipelines.models.config import ModelConfig
from tests.pipelines.rgrg_reference import classify, roi_heads

D, REP, E, LAYERS, HEADS, POSITIONS, VOCAB, MLP = 48, 16, 64, 2, 16, 40, 50257, (24, 8)  # RGRG: 16 heads
GPT = "language_model.gpt_with_lm_head.transformer."
_ROI = "object_detector.roi_heads."
EOS = 50256


def synthetic_rgrg_state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    net = resnet50(weights=None)
    net.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    for key, value in nn.Sequential(*list(net.children())[:-2]).state_dict().items():
        sd[f"object_detector.backbone.{key}"] = value
    anchors = 10 * 16
    r = lambda *shape: torch.randn(*shape) * 0.02
    sd |= {
        "object_detector.rpn.head.conv.weight": r(2048, 2048, 3, 3),  # pre-0.13 torchvision RPNHead names
        "object_detector.rpn.head.conv.bias": r(2048),
        "object_detector.rpn.head.cls_logits.weight": r(anchors, 2048, 1, 1),
        "object_detector.rpn.head.cls_logits.bias": r(anchors),
        "object_detector.rpn.head.bbox_pred.weight": r(anchors * 4, 2048, 1, 1),
        "object_detector.rpn.head.bbox_pred.bias": r(anchors * 4),
        "object_detector.roi_heads.box_head.fc6.weight": r(REP, 2048 * 8 * 8),
        "object_detector.roi_heads.box_head.fc6.bias": r(REP),
        "object_detector.roi_heads.box_head.fc7.weight": r(REP, REP),
        "object_detector.roi_heads.box_head.fc7.bias": r(REP),
        "object_detector.roi_heads.box_predictor.cls_score.weight": r(30, REP),
        "object_detector.roi_heads.box_predictor.cls_score.bias": r(30),
        "object_detector.roi_heads.box_predictor.bbox_pred.weight": r(120, REP),
        "object_detector.roi_heads.box_predictor.bbox_pred.bias": r(120),
        "object_detector.roi_heads.dim_reduction.weight": r(D, 2048),
        "object_detector.roi_heads.dim_reduction.bias": r(D),
    }
    for head in ("binary_classifier_region_selection", "binary_classifier_region_abnormal"):
        widths = (D, *MLP, 1)
        for i, (w_in, w_out) in enumerate(itertools.pairwise(widths)):
            sd[f"{head}.classifier.{2 * i}.weight"] = torch.randn(w_out, w_in)
            sd[f"{head}.classifier.{2 * i}.bias"] = torch.randn(w_out)
    wte = torch.randn(VOCAB, E) * 0.5
    sd[GPT + "wte.weight"] = wte
    sd[GPT + "wpe.weight"] = r(POSITIONS, E)  # present in RGRG's state dict, unused by its forward
    for i in range(LAYERS):
        p = f"{GPT}h.{i}."
        sd |= {
            p + "ln_1.weight": 1 + r(E), p + "ln_1.bias": r(E),
            p + "attn.c_attn.weight": torch.randn(E, 3 * E) * 0.3, p + "attn.c_attn.bias": r(3 * E),
            p + "attn.c_proj.weight": torch.randn(E, E) * 0.3, p + "attn.c_proj.bias": r(E),
            p + "attn.uk.weight": torch.randn(E, E) * 0.3, p + "attn.uk.bias": r(E),
            p + "attn.uv.weight": torch.randn(E, E) * 0.3, p + "attn.uv.bias": r(E),
            p + "attn.causal_mask": torch.tril(torch.ones(POSITIONS, POSITIONS, dtype=torch.uint8)).view(
                1, 1, POSITIONS, POSITIONS),
            p + "attn.mask_out_value": torch.tensor(-1e4),
            p + "ln_2.weight": 1 + r(E), p + "ln_2.bias": r(E),
            p + "mlp.c_fc.weight": torch.randn(E, 4 * E) * 0.3, p + "mlp.c_fc.bias": r(4 * E),
            p + "mlp.c_proj.weight": torch.randn(4 * E, E) * 0.3, p + "mlp.c_proj.bias": r(E),
        }
    sd[GPT + "ln_f.weight"], sd[GPT + "ln_f.bias"] = 1 + r(E), r(E)
    sd["language_model.gpt_with_lm_head.lm_head.weight"] = wte  # tied, as in GPT2LMHeadModel
    sd["language_model.wte.weight"] = wte  # RGRG's module aliases appear in its state dict too
    sd["language_model.gpt2_blocks.0.0.weight"] = sd[GPT + "h.0.ln_1.weight"]
    for idx, w_in in ((0, D), (2, E)):
        sd[f"language_model.feature_space_transformation_nn.{idx}.weight"] = torch.randn(E, w_in) * 0.3
        sd[f"language_model.feature_space_transformation_nn.{idx}.bias"] = r(E)
    return sd


def biased_rgrg_state(image: torch.Tensor, base: ModelConfig, seed: int = 0, eos_drift: float = 0.1,
                      selected: int = 12, abnormal: int = 9) -> dict[str, torch.Tensor]:
    """:func:`synthetic_rgrg_state` calibrated on ``image[1,1,512,512]`` (see the module docstring)."""
    sd = synthetic_rgrg_state(seed)
    # the RPN's box deltas on random features are huge (every proposal the whole image): proposals = anchors
    # shifted a little, ranked by the random objectness
    sd["object_detector.rpn.head.bbox_pred.weight"] = torch.zeros_like(sd["object_detector.rpn.head.bbox_pred.weight"])
    sd["object_detector.rpn.head.bbox_pred.bias"] = 0.05 * torch.randn(sd["object_detector.rpn.head.bbox_pred.bias"].shape)
    model = build_model(sd, config_from_checkpoint(sd, base)).eval()
    det = model.detector
    with torch.no_grad():
        maps = det.feature_maps(image)
        proposals = det.rpn(det._image_list(image), maps)[0][0]
        fmap = maps["0"]
        pooled = roi_align(fmap, [proposals], output_size=8, spatial_scale=1 / 32, sampling_ratio=2).flatten(1)
        h = pooled
        for layer in ("fc6", "fc7"):  # standardise each box-head layer over this image's proposals
            w, b = sd[f"{_ROI}box_head.{layer}.weight"], sd[f"{_ROI}box_head.{layer}.bias"]
            z = h @ w.T + b
            mu, sigma = z.mean(0), z.std(0).clamp(min=1e-6)
            sd[f"{_ROI}box_head.{layer}.weight"] = w / sigma[:, None]
            sd[f"{_ROI}box_head.{layer}.bias"] = (b - mu) / sigma
            h = torch.relu((z - mu) / sigma)
        usable = (h.norm(dim=1) > 1e-3).nonzero().squeeze(1)
        aims = usable[torch.linspace(0, len(usable) - 1, 29).round().long()]
        rows = h[aims] / h[aims].norm(dim=1, keepdim=True)
        sd[f"{_ROI}box_predictor.cls_score.weight"] = torch.cat([torch.zeros(1, rows.shape[1]), 6.0 * rows])
        sd[f"{_ROI}box_predictor.cls_score.bias"] = torch.tensor([-5.0] + [0.0] * 29)
        features = roi_heads(sd, fmap, proposals)["features"]
        for head, count in (("selection", selected), ("abnormal", abnormal)):
            logits = classify(sd, head, features)
            ranked = logits.sort(descending=True).values
            middle = (ranked[count - 1] + ranked[count]) / 2  # ``count`` regions above the threshold
            gain = 3.0 / (ranked[count - 1] - ranked[count]).abs().clamp(min=1e-3).item()
            w, b = (sd[f"binary_classifier_region_{head}.classifier.4.{p}"] for p in ("weight", "bias"))
            sd[f"binary_classifier_region_{head}.classifier.4.weight"] = w * gain
            sd[f"binary_classifier_region_{head}.classifier.4.bias"] = (b - middle) * gain - 1.0
        # GPT-2: a direction v that EOS's row holds strongly and the position rows (RGRG embeds positions with
        # wte) hold more the later the position; position 0 cancels what BOS (= EOS) brings along v.
        wte = sd[GPT + "wte.weight"].clone()
        v = torch.randn(E, generator=torch.Generator().manual_seed(seed + 1))
        v /= v.norm()
        alpha = 2.0 * eos_drift * POSITIONS
        wte[EOS] += alpha * v
        wte[:POSITIONS] += eos_drift * torch.arange(POSITIONS, dtype=torch.float32)[:, None] * v
        wte[0] -= alpha * v
        for key in (GPT + "wte.weight", "language_model.gpt_with_lm_head.lm_head.weight", "language_model.wte.weight"):
            sd[key] = wte
    return sd
