"""Faster R-CNN that finds the 29 Chest ImaGenome regions and returns one box and one feature per region.

RGRG's object detector, re-expressed on top of torchvision's :class:`FasterRCNN` (backbone, RPN and box head
are torchvision's; their state-dict names are the ones RGRG checkpoints use). What changes is inference: no
per-class NMS. Every proposal votes for its arg-max foreground class, and each class keeps its single
best-scoring proposal (RGRG's "top-1 per class"), decoded with that class's box regression. A class that wins
no proposal is reported ``detected=False`` with a full-image fallback box, so every image always yields 29
boxes and 29 features and downstream shapes never depend on the data.

Region features are RGRG's: the RoIAlign of each class's *winning proposal* (before box regression; for a
class no proposal voted for, the image's first proposal, as RGRG's arg-max over all-zero scores picks),
average-pooled and projected to ``D`` (RGRG's ``avg_pool`` + ``dim_reduction``), in one batched RoIAlign over
all ``B x 29`` proposals. The regressed box is what is displayed and reported.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torchvision.models import resnet50
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import mobilenet_backbone
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import AnchorGenerator
from torchvision.ops import MultiScaleRoIAlign, clip_boxes_to_image

from pipelines.constants import NUM_REGIONS
from pipelines.models.config import ModelConfig

NUM_CLASSES = NUM_REGIONS + 1  # class 0 is background


@dataclass
class Detections:
    """Per image and region (``REGIONS`` order), all in model pixels of the square input."""

    boxes: Tensor  # [B, 29, 4] float, x1 y1 x2 y2: the winning proposal after box regression, clipped
    scores: Tensor  # [B, 29] float, softmax probability of the winning proposal (0 when not detected)
    detected: Tensor  # [B, 29] bool
    features: Tensor  # [B, 29, D] float, pooled on ``proposals``
    proposals: Tensor  # [B, 29, 4] float, the winning proposal itself (see the module docstring)

    def to(self, device: torch.device | str) -> Detections:
        return Detections(*(t.to(device) for t in (self.boxes, self.scores, self.detected, self.features,
                                                     self.proposals)))


def _small_cnn(channels: tuple[int, ...]) -> nn.Sequential:
    layers: list[nn.Module] = []
    c_in = 1
    for c_out in channels:
        layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out),
                   nn.ReLU(inplace=True)]
        c_in = c_out
    net = nn.Sequential(*layers)
    net.out_channels = c_in
    return net


def _resnet50_gray() -> nn.Sequential:
    """ResNet-50 without pool/fc, 1-channel stem: RGRG's backbone (``backbone.0`` is conv1 ... ``backbone.7``
    is layer4), 2048 channels at stride 32."""
    net = resnet50(weights=None)
    net.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    body = nn.Sequential(*list(net.children())[:-2])
    body.out_channels = 2048
    return body


def _mobilenet_fpn_gray() -> nn.Module:
    """MobileNetV3-Large + FPN (torchvision's mobile detector backbone) with a 1-channel stem and ordinary,
    trainable batch norm (the frozen default assumes ImageNet statistics we do not have)."""
    body = mobilenet_backbone(backbone_name="mobilenet_v3_large", weights=None, fpn=True,
                              trainable_layers=6, norm_layer=nn.BatchNorm2d)
    stem = body.body["0"][0]
    body.body["0"][0] = nn.Conv2d(1, stem.out_channels, stem.kernel_size, stem.stride, stem.padding, bias=False)
    return body


def build_backbone(cfg: ModelConfig) -> nn.Module:
    if cfg.detector_backbone == "resnet50":
        return _resnet50_gray()
    if cfg.detector_backbone == "mobilenet_v3_large_fpn":
        return _mobilenet_fpn_gray()
    return _small_cnn(cfg.small_cnn_channels)


class RegionDetector(FasterRCNN):
    """torchvision Faster R-CNN with 30 classes and RGRG's top-1-per-class inference.

    ``forward(images[B,1,S,S], targets=None)`` takes images already normalised and padded to the square model
    size (see :mod:`pipelines.preprocess`): torchvision's own resize/normalise transform is bypassed.

    * training: the torchvision loss dict (``loss_objectness``, ``loss_rpn_box_reg``, ``loss_classifier``,
      ``loss_box_reg``); ``targets`` is a list of ``{"boxes": [K,4] float model pixels, "labels": [K] int64
      in 1..29}``.
    * eval: :class:`Detections`.

    Training the region MLPs and the decoder needs features with gradients: use :meth:`feature_maps` then
    :meth:`region_features` on ground-truth or detected boxes.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        backbone = build_backbone(cfg)
        n_maps = len(cfg.anchor_sizes)
        anchors = AnchorGenerator(sizes=cfg.anchor_sizes, aspect_ratios=(cfg.anchor_aspect_ratios,) * n_maps)
        names = ["0"] if n_maps == 1 else [str(i) for i in range(n_maps - 1)]  # FPN's "pool" map: RPN only
        roi_pool = MultiScaleRoIAlign(featmap_names=names, output_size=cfg.roi_output_size, sampling_ratio=2)
        rep = cfg.box_head_dim
        box_head = TwoMLPHead(backbone.out_channels * cfg.roi_output_size**2, rep)
        super().__init__(
            backbone,
            num_classes=None,
            min_size=cfg.image_size,
            max_size=cfg.image_size,
            image_mean=[0.0],
            image_std=[1.0],
            rpn_anchor_generator=anchors,
            rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_top_n_train,
            rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
            rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_top_n_test,
            rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n_test,
            box_roi_pool=roi_pool,
            box_head=box_head,
            box_predictor=FastRCNNPredictor(rep, NUM_CLASSES),
        )
        self.image_size = cfg.image_size
        #: RGRG's ``roi_heads.dim_reduction``: average-pooled RoIAlign channels -> D.
        self.region_proj = nn.Linear(backbone.out_channels, cfg.feature_dim)

    # -- building blocks (public: the trainer composes them) ------------------------------------------------
    def feature_maps(self, images: Tensor) -> OrderedDict[str, Tensor]:
        _check_images(images, self.image_size)
        out = self.backbone(images)
        return out if isinstance(out, OrderedDict) else OrderedDict([("0", out)])

    def region_features(self, maps: OrderedDict[str, Tensor], boxes: Tensor) -> Tensor:
        """``boxes[B,R,4]`` (model pixels) -> ``[B,R,D]``: one RoIAlign over all boxes, mean, projection."""
        b, r, _ = boxes.shape
        sizes = [(self.image_size, self.image_size)] * b
        pooled = self.roi_heads.box_roi_pool(maps, list(boxes.unbind(0)), sizes)  # [B*R, C, s, s]
        return self.region_proj(pooled.mean(dim=(2, 3))).view(b, r, -1)

    def _image_list(self, images: Tensor) -> ImageList:
        return ImageList(images, [(self.image_size, self.image_size)] * images.shape[0])

    # -- forward --------------------------------------------------------------------------------------------
    def forward(self, images: Tensor, targets: list[dict[str, Tensor]] | None = None):  # type: ignore[override]
        maps = self.feature_maps(images)
        image_list = self._image_list(images)
        if self.training:
            _check_targets(targets, images.shape[0])
            proposals, rpn_losses = self.rpn(image_list, maps, targets)
            _, box_losses = self.roi_heads(maps, proposals, image_list.image_sizes, targets)
            return {**rpn_losses, **box_losses}
        return self.detect(maps, image_list)

    def detect(self, maps: OrderedDict[str, Tensor], image_list: ImageList) -> Detections:
        """Top-1 box per class for every image, vectorised over images and classes."""
        proposals, _ = self.rpn(image_list, maps)
        heads = self.roi_heads
        pooled = heads.box_roi_pool(maps, proposals, image_list.image_sizes)
        logits, regression = heads.box_predictor(heads.box_head(pooled))
        counts = [p.shape[0] for p in proposals]
        padded, valid = pad_per_image(torch.cat(proposals), counts)
        top = top1_per_class(pad_per_image(logits, counts)[0], pad_per_image(regression, counts)[0], padded, valid,
                             heads.box_coder, self.image_size)
        return Detections(top.boxes, top.scores, top.detected, self.region_features(maps, top.proposals),
                          top.proposals)


class Top1(NamedTuple):
    """The winner of each (image, region class), in model pixels; a class that no proposal voted for is not
    ``detected`` and gets the full-image fallback box and score 0."""

    boxes: Tensor  # [B, 29, 4] the winning proposal decoded with its class's box regression, clipped
    scores: Tensor  # [B, 29] its softmax probability for the class
    detected: Tensor  # [B, 29] bool
    proposals: Tensor  # [B, 29, 4] the winning proposal itself (before box regression); for a class that is not
    # detected the image's first proposal (RGRG's arg-max over all-zero scores), whose features RGRG still uses


def pad_per_image(rows: Tensor, counts: list[int]) -> tuple[Tensor, Tensor]:
    """``rows[sum(counts), ...]`` (every image's rows concatenated, as torchvision's RoI heads hold them) ->
    ``padded[B, P, ...]`` (zeros after each image's own rows, ``P = max(max(counts), 1)``) and ``valid[B, P]``."""
    width = max(max(counts, default=0), 1)
    padded = rows.new_zeros((len(counts), width, *rows.shape[1:]))
    valid = torch.zeros((len(counts), width), dtype=torch.bool, device=rows.device)
    for i, part in enumerate(rows.split(counts)):
        padded[i, : part.shape[0]] = part
        valid[i, : part.shape[0]] = True
    return padded, valid


def top1_per_class(logits: Tensor, regression: Tensor, proposals: Tensor, valid: Tensor, box_coder, image_size: int
                   ) -> Top1:
    """RGRG's selection: each proposal belongs to its arg-max foreground class; per (image, class) keep the
    proposal with the highest probability among those that chose it.

    ``logits[B,P,30]`` (or ``[B*P,30]``), ``regression[B,P,120]`` (or ``[B*P,120]``), ``proposals[B,P,4]`` and
    ``valid[B,P]`` (padding rows are never a winner) for every image's proposals, padded to a common ``P``."""
    b, p, _ = proposals.shape
    fg = logits.float().view(b, p, NUM_CLASSES).softmax(-1)[..., 1:]  # background still takes its share
    score, cls = fg.max(dim=-1)  # [B, P]
    score = score.masked_fill(~valid, -1.0)
    cls = cls.masked_fill(~valid, -1)
    classes = torch.arange(NUM_REGIONS, device=logits.device)
    votes = torch.where(cls.unsqueeze(-1) == classes, score.unsqueeze(-1), -1.0)  # [B, P, 29]
    top_score, top_idx = votes.max(dim=1)  # [B, 29]
    detected = top_score >= 0
    rows = torch.arange(b, device=logits.device)[:, None]
    deltas = regression.view(b, p, NUM_CLASSES, 4)[rows, top_idx, classes + 1]  # [B, 29, 4]: the winning class's
    won = proposals[rows, top_idx].float()  # [B, 29, 4]
    decoded = box_coder.decode_single(deltas.reshape(-1, 4).float(), won.reshape(-1, 4))
    decoded = clip_boxes_to_image(decoded, (image_size, image_size)).view(b, NUM_REGIONS, 4)
    fallback = decoded.new_tensor([0.0, 0.0, image_size, image_size])
    mask = detected.unsqueeze(-1)
    return Top1(torch.where(mask, decoded, fallback), top_score.clamp(min=0.0), detected, won)


def _check_images(images: Tensor, size: int) -> None:
    if images.dim() != 4 or images.shape[1] != 1 or images.shape[2] != size or images.shape[3] != size:
        raise ValueError(f"detector expects images [B, 1, {size}, {size}], got {list(images.shape)}")


def _check_targets(targets: list[dict[str, Tensor]] | None, batch: int) -> None:
    if targets is None or len(targets) != batch:
        raise ValueError("training the detector needs one target dict per image")
    for i, t in enumerate(targets):
        boxes, labels = t.get("boxes"), t.get("labels")
        if boxes is None or labels is None:
            raise ValueError(f"target {i} needs 'boxes' and 'labels'")
        if boxes.dim() != 2 or boxes.shape[-1] != 4 or not boxes.is_floating_point():
            raise ValueError(f"target {i}: boxes must be a float tensor [K, 4], got {list(boxes.shape)}")
        if labels.dtype != torch.int64 or labels.shape != boxes.shape[:1]:
            raise ValueError(f"target {i}: labels must be int64 [K] matching boxes")
        if labels.numel() and (labels.min() < 1 or labels.max() > NUM_REGIONS):
            raise ValueError(f"target {i}: labels must be region classes 1..{NUM_REGIONS}")
        if (boxes[:, 2:] <= boxes[:, :2]).any():
            raise ValueError(f"target {i}: degenerate box (x2 <= x1 or y2 <= y1)")
