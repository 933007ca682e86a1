"""The region detector's inference with no per-image loop and no per-proposal RoIAlign tensor.

Same function as :meth:`pipelines.models.detector.RegionDetector.detect` for single-feature-map backbones (the
paper's ResNet-50, the tests' small CNN); FPN backbones fall back to the stock path. Three changes:

1. **Proposal filtering batched over images.** torchvision's RPN clips, filters and runs NMS image by image
   (several host synchronisations each). Here the per-image top-k is decoded, clipped and suppressed for the
   whole batch at once: greedy NMS is the unique fixed point of ``keep[i] = no kept j before i overlaps i``,
   reached by a few vectorised iterations on a ``[B, K, K]`` overlap matrix.
2. **The box head's first layer without the pooled tensor, when that is cheaper.** RoIAlign is linear in
   the feature map and separable in y and x (each bin's 2x2 bilinear samples), and ``fc6`` is linear in
   RoIAlign's output, so ``fc6(roi_align(F, box)) = A(box) @ G`` with ``G = F^T W6`` computed once per image
   (``[H*W*s*s, rep]``) and ``A(box) = wy (x) wx`` the box's bilinear weights. ``G`` costs a fixed 34 G
   multiply-adds per paper image, the stock path 134 M per proposal: with 1,000 proposals after NMS (a
   trained RPN keeps hundreds) ``G`` does 102 instead of 268 GFLOP and the 131-million-element pooled tensor
   (0.5 GB per image in float32) never exists; below ~290 proposals (random weights keep a few dozen) the
   stock RoIAlign + fc6 is cheaper and is used.
3. **Region features by the same identity**: the spatial mean of a box's RoIAlign is one weight per
   feature-map cell, so the 29 region features are one ``[29, H*W] @ [H*W, C]`` product per image.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import concat_box_prediction_layers
from torchvision.ops import clip_boxes_to_image

from pipelines.constants import NUM_REGIONS
from pipelines.models.detector import Detections, RegionDetector, _check_images, top1_per_class

#: Images per chunk in the box head (bounds the ``G`` and ``A`` working set: ~70 MB per paper image in bf16).
BOX_HEAD_CHUNK = 32


class FastDetector:
    """``detect(images[B,1,S,S], timer=None) -> Detections`` (also its ``__call__``) for a
    :class:`RegionDetector` in eval mode."""

    def __init__(self, detector: RegionDetector, channels_last: bool = False, box_head_mode: str = "auto",
                 fuse_batch_norm: bool = True) -> None:
        if detector.training:
            raise ValueError("FastDetector needs the detector in eval mode")
        if box_head_mode not in ("auto", "g", "roi"):
            raise ValueError("box_head_mode must be 'auto', 'g' or 'roi'")
        self.det = detector
        #: ``g``: fc6 through ``G``; ``roi``: torchvision's RoIAlign then fc6; ``auto``: the cheaper one.
        self.box_head_mode = box_head_mode
        #: A private copy of the backbone with eval-mode batch norm folded into the convolutions (one pass
        #: over each activation fewer), NHWC when ``channels_last`` (cuDNN's tensor-core layout).
        self.backbone = _fused_copy(detector.backbone) if fuse_batch_norm else detector.backbone
        self.channels_last = channels_last
        if channels_last:
            if self.backbone is detector.backbone:
                raise ValueError("channels_last needs fuse_batch_norm (it converts the private copy)")
            self.backbone.to(memory_format=torch.channels_last)
        pool = detector.roi_heads.box_roi_pool
        self.out_size = int(pool.output_size[0])
        self.sampling = int(pool.sampling_ratio)
        self._wt: dict[torch.dtype, Tensor] = {}

    def supported(self, maps: dict[str, Tensor]) -> bool:
        return len(maps) == 1 and self.sampling > 0

    def _fc6_by_cell(self, channels: int, dtype: torch.dtype) -> Tensor:
        """fc6's weight ``[rep, C*s*s]`` rearranged to ``[C, s*s*rep]`` (columns ordered bin, output)."""
        if dtype not in self._wt:
            w = self.det.roi_heads.box_head.fc6.weight.detach()
            ss = self.out_size ** 2
            self._wt[dtype] = w.view(-1, channels, ss).permute(1, 2, 0).reshape(channels, -1).to(dtype).contiguous()
        return self._wt[dtype]

    # -- forward ---------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def detect(self, images: Tensor, timer: Callable[[str], AbstractContextManager] | None = None) -> Detections:
        """``timer(name)``, when given, wraps each sub-stage (benchmark profiling)."""
        det, stage = self.det, timer or (lambda _name: nullcontext())
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with stage("det.backbone"):
            _check_images(images, det.image_size)
            out = self.backbone(images)
            maps = out if isinstance(out, OrderedDict) else OrderedDict([("0", out)])
        if not self.supported(maps):
            return det.detect(maps, det._image_list(images))
        fmap = maps["0"]
        with stage("det.rpn"):
            proposals, valid = self.proposals(images, fmap)
        with stage("det.box_head"):
            logits, regression = self.box_head(fmap, proposals, valid)
        with stage("det.top1_features"):
            top = top1_per_class(logits, regression, proposals, valid, det.roi_heads.box_coder, det.image_size)
            features = self.region_features(fmap, top.proposals)
        return Detections(top.boxes, top.scores, top.detected, features, top.proposals)

    __call__ = detect
    #: :meth:`pipelines.engine.Engine.infer` hands its stage timer to :meth:`detect`.
    timed = True

    def proposals(self, images: Tensor, fmap: Tensor) -> tuple[Tensor, Tensor]:
        """RPN proposals as ``boxes[B,P,4]`` plus ``valid[B,P]``, each image's kept boxes first in the order
        torchvision returns them (descending objectness)."""
        rpn, size = self.det.rpn, self.det.image_size
        b = images.shape[0]
        objectness, deltas = rpn.head([fmap])
        anchors = rpn.anchor_generator(ImageList(images[:1], [(size, size)]), [fmap])[0]  # same for every image
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        objectness = objectness.view(b, -1)
        deltas = deltas.view(b, -1, 4)
        k = min(rpn.pre_nms_top_n(), objectness.shape[1])
        top, idx = objectness.topk(k, dim=1)
        rows = torch.arange(b, device=images.device)[:, None]
        boxes = rpn.box_coder.decode_single(deltas[rows, idx].reshape(-1, 4), anchors[idx].reshape(-1, 4))
        boxes = clip_boxes_to_image(boxes, (size, size)).view(b, k, 4)
        wh = boxes[..., 2:] - boxes[..., :2]
        valid = (wh >= rpn.min_size).all(-1) & (torch.sigmoid(top) >= rpn.score_thresh)
        keep = greedy_nms(boxes, valid, rpn.nms_thresh)
        keep &= keep.cumsum(1) <= rpn.post_nms_top_n()
        width = max(int(keep.sum(1).max()), 1)
        order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices[:, :width]
        return boxes[rows, order], keep[rows, order]

    def box_head(self, fmap: Tensor, proposals: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        """Class logits ``[B*P,30]`` and box regression ``[B*P,120]`` for every (padded) proposal.

        ``G`` costs ``H*W*C*s*s*rep`` multiply-adds per image whatever the number of proposals, the stock
        RoIAlign + fc6 ``P*C*s*s*rep``: the cheaper of the two is used (trained RPNs keep hundreds of
        proposals after NMS; random weights a few dozen)."""
        heads, det = self.det.roi_heads, self.det
        b, c, h, w = fmap.shape
        p = proposals.shape[1]
        use_g = p * (c - h * w) > h * w * c if self.box_head_mode == "auto" else self.box_head_mode == "g"
        if use_g:
            return self._box_head_g(fmap, proposals)
        flat = valid.flatten()
        rois = proposals.reshape(-1, 4)[flat]
        pooled = heads.box_roi_pool({"0": fmap}, list(rois.split(valid.sum(1).tolist())),
                                    [(det.image_size, det.image_size)] * b)
        logits, regression = heads.box_predictor(heads.box_head(pooled))
        out_logits = logits.new_zeros((b * p, logits.shape[1]))
        out_regression = regression.new_zeros((b * p, regression.shape[1]))
        out_logits[flat], out_regression[flat] = logits, regression
        return out_logits, out_regression

    def _box_head_g(self, fmap: Tensor, proposals: Tensor) -> tuple[Tensor, Tensor]:
        heads, det = self.det.roi_heads, self.det
        b, c, h, w = fmap.shape
        s = self.out_size
        scale = 2.0 ** round(math.log2(h / det.image_size))  # torchvision's MultiScaleRoIAlign scale
        wt = self._fc6_by_cell(c, fmap.dtype)
        fc6 = heads.box_head.fc6
        outs = []
        for lo in range(0, b, BOX_HEAD_CHUNK):
            f = fmap[lo:lo + BOX_HEAD_CHUNK]
            n, p = f.shape[0], proposals.shape[1]
            g = torch.matmul(f.flatten(2).transpose(1, 2), wt).view(n, h * w * s * s, -1)  # [n, HW*ss, rep]
            wy, wx = roi_align_weights(proposals[lo:lo + BOX_HEAD_CHUNK].reshape(-1, 4).float(), scale, h, w, s,
                                       self.sampling)
            a = torch.einsum("piy,pjx->pyxij", wy, wx).reshape(n, p, -1).to(fmap.dtype)
            outs.append(torch.bmm(a, g) + fc6.bias.to(fmap.dtype))
        x = F.relu(torch.cat(outs).flatten(0, 1))
        x = F.relu(heads.box_head.fc7(x))
        return heads.box_predictor(x)

    def region_features(self, fmap: Tensor, boxes: Tensor) -> Tensor:
        """``[B,29,D]``: ``region_proj`` of the RoIAlign of each of ``boxes[B,29,4]`` (the winning proposals)
        averaged over its bins."""
        b, _, h, w = fmap.shape
        scale = 2.0 ** round(math.log2(h / self.det.image_size))
        wy, wx = roi_align_weights(boxes.reshape(-1, 4).float(), scale, h, w, self.out_size, self.sampling)
        cell = (wy.mean(1).unsqueeze(2) * wx.mean(1).unsqueeze(1)).view(b, NUM_REGIONS, h * w)  # [B,29,HW]
        pooled = torch.bmm(cell, fmap.float().flatten(2).transpose(1, 2))  # [B,29,C], float32 like RoIAlign
        return self.det.region_proj(pooled.to(fmap.dtype))


def _fused_copy(backbone: torch.nn.Module) -> torch.nn.Module:
    """``backbone`` with Conv2d+BatchNorm2d pairs folded (torch.fx); the original when it cannot be traced."""
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(backbone, inplace=False)
    except Exception:  # noqa: BLE001 - e.g. control flow fx cannot trace: the unfused module computes the same
        return backbone


def roi_align_weights(boxes: Tensor, scale: float, height: int, width: int, bins: int, sampling: int
                      ) -> tuple[Tensor, Tensor]:
    """torchvision ``roi_align(aligned=False)``'s sampling as separable weights: ``wy[P,bins,H]`` and
    ``wx[P,bins,W]`` such that bin ``(i, j)`` of box ``p`` is ``sum_yx wy[p,i,y] wx[p,j,x] F[:,y,x]``
    (its ``sampling x sampling`` bilinear samples averaged; samples outside the map contribute zero)."""
    x1, y1, x2, y2 = (boxes * scale).unbind(-1)
    return _axis_weights(y1, y2, height, bins, sampling), _axis_weights(x1, x2, width, bins, sampling)


def _axis_weights(start: Tensor, end: Tensor, size: int, bins: int, grid: int) -> Tensor:
    length = (end - start).clamp(min=1.0)
    bin_size = (length / bins)[:, None, None]
    i = torch.arange(bins, device=start.device, dtype=start.dtype)[None, :, None]
    g = torch.arange(grid, device=start.device, dtype=start.dtype)[None, None, :]
    c = start[:, None, None] + i * bin_size + (g + 0.5) * bin_size / grid  # [P, bins, grid] sample coords
    inside = ((c >= -1.0) & (c <= size)).to(start.dtype) / grid
    c = c.clamp(min=0.0)
    low = c.floor().long()
    last = low >= size - 1
    low = low.clamp(max=size - 1)
    c = torch.where(last, low.to(c.dtype), c)
    high = torch.where(last, low, low + 1)
    frac = c - low.to(c.dtype)
    out = torch.zeros((*c.shape[:2], size), device=c.device, dtype=c.dtype)
    out.scatter_add_(2, low, (1.0 - frac) * inside)
    out.scatter_add_(2, high, frac * inside)
    return out


def greedy_nms(boxes: Tensor, valid: Tensor, threshold: float) -> Tensor:
    """Greedy NMS on ``boxes[B,K,4]`` already in priority order, per image: a box is kept unless an earlier
    kept box overlaps it with IoU > ``threshold``; invalid boxes are never kept and suppress nothing.

    The answer is the unique fixed point of that rule (box i depends only on boxes before it), so iterating it
    from "all kept" converges to exactly torchvision's sequential result; each iteration is one batched
    boolean reduction and a chain of k suppressions needs at most k of them."""
    k = boxes.shape[1]
    bx = boxes.float()
    area = (bx[..., 2] - bx[..., 0]) * (bx[..., 3] - bx[..., 1])
    lt = torch.maximum(bx[:, :, None, :2], bx[:, None, :, :2])
    rb = torch.minimum(bx[:, :, None, 2:], bx[:, None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    iou = inter / (area[:, :, None] + area[:, None, :] - inter)
    earlier = torch.ones(k, k, dtype=torch.bool, device=boxes.device).tril(-1)  # [i, j]: j comes before i
    suppresses = (iou > threshold) & earlier & valid[:, None, :]  # [B, i, j]
    keep = valid.clone()
    while True:
        for _ in range(4):  # a few iterations between host checks
            nxt = valid & ~(suppresses & keep[:, None, :]).any(-1)
            nxt, keep = keep, nxt
        if bool((nxt == keep).all()):  # the last iteration changed nothing: fixed point reached
            return keep
