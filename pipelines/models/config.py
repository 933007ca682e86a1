"""One frozen description of every size and shape in the CRRG-CLIP model stack.

A bundle stores its :class:`ModelConfig` as JSON in ``manifest.json``; loading rebuilds exactly the modules
whose weights were saved, so nothing about architecture is ever inferred from a checkpoint. Three presets:

``paper``
    RGRG as published (Tanida et al., CVPR 2023): ResNet-50 single-feature-map Faster R-CNN at 512 px,
    RoIAlign 8x8 average-pooled 2048 -> 1024 region features, GPT-2 medium (24 x 1024 x 16) with pseudo
    self-attention, plus an open_clip ViT-B-16 classifier at 224 px.
``demo``
    Small enough to report a radiograph on two CPU cores in well under a second: MobileNetV3-Large-FPN at
    320 px, 256-d region features, a 3-layer x 256 decoder, a small ViT CLIP.
``tiny``
    Random-weight unit tests only.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from pipelines.constants import CHEXPERT_LABELS

#: Positive/negative prompt pair per CheXpert label for zero-shot scoring (in ``CHEXPERT_LABELS`` order).
DEFAULT_LABEL_PROMPTS: tuple[tuple[str, str], ...] = tuple(
    (f"chest radiograph showing {label.lower()}", f"chest radiograph without {label.lower()}")
    for label in CHEXPERT_LABELS
)

_GPT2_EOS = 50256  # "<|endoftext|>" in the GPT-2 BPE: BOS, EOS and padding at once, as in RGRG


class ConfigError(ValueError):
    """A model configuration value is missing, unknown or malformed; the message names the key."""


@dataclass(frozen=True)
class ModelConfig:
    """Every architectural choice of the stack. Field groups are prefixed by the module they shape."""

    preset: str

    # -- input -------------------------------------------------------------------------------------------
    #: Side of the square model input in pixels; the longest image side is resized to this and padded.
    image_size: int
    #: Normalisation of the [0, 1] grayscale image: ``(x - mean) / std`` (RGRG: 0.471, 0.302).
    image_mean: float = 0.5
    image_std: float = 0.25
    #: ``bilinear`` (the node's own) or ``area-uint8`` (RGRG's 8-bit OpenCV INTER_AREA): :mod:`pipelines.preprocess`.
    image_resize: str = "bilinear"

    # -- detector ----------------------------------------------------------------------------------------
    #: ``resnet50`` (single stride-32 map, as RGRG), ``mobilenet_v3_large_fpn`` or ``small_cnn`` (tests).
    detector_backbone: str = "resnet50"
    #: Channel widths of ``small_cnn``'s stride-2 conv stages (ignored by the other backbones).
    small_cnn_channels: tuple[int, ...] = (16, 32)
    #: Anchor sizes per feature map (one inner tuple per map the backbone returns).
    anchor_sizes: tuple[tuple[int, ...], ...] = ((20, 40, 60, 80, 100, 120, 140, 160, 180, 300),)
    #: Anchor aspect ratios (height / width), shared by all maps; chest regions range from the flat
    #: hemidiaphragms to the tall spine.
    anchor_aspect_ratios: tuple[float, ...] = (
        0.2, 0.25, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.3, 1.5, 2.1, 2.6, 3.0, 5.0, 8.0)
    rpn_pre_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_train: int = 2000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_test: int = 1000
    #: RoIAlign output side (8 in RGRG) for both the box head and the region features.
    roi_output_size: int = 8
    #: Width of the two-layer box head that classifies and regresses proposals.
    box_head_dim: int = 1024
    #: D: width of the region feature fed to the selector, abnormality classifier and decoder.
    feature_dim: int = 1024

    # -- region MLPs -------------------------------------------------------------------------------------
    mlp_hidden: tuple[int, ...] = (512, 128)

    # -- decoder -----------------------------------------------------------------------------------------
    vocab_size: int = 50257
    decoder_layers: int = 24
    decoder_width: int = 1024
    decoder_heads: int = 16
    decoder_positions: int = 1024
    #: Longest generated sentence, in tokens (EOS included).
    max_sentence_tokens: int = 64
    bos_token_id: int = _GPT2_EOS
    eos_token_id: int = _GPT2_EOS
    pad_token_id: int = _GPT2_EOS

    # -- CLIP --------------------------------------------------------------------------------------------
    #: open_clip ``CLIP(**clip_model)`` keyword arguments: ``embed_dim``, ``vision_cfg``, ``text_cfg``.
    clip_model: dict[str, Any] = field(default_factory=dict)
    #: Whether the CLIP classifier has a trained linear head (14 outputs) used instead of zero-shot.
    clip_label_head: bool = False
    label_prompts: tuple[tuple[str, str], ...] = DEFAULT_LABEL_PROMPTS
    #: How the CLIP tower sees the image (:meth:`pipelines.models.clip.ChestCLIP.clip_input`). Empty: the
    #: detector's input resized to the CLIP size, as the node's own CLIP is trained. Otherwise the
    #: published model's own steps, applied to the original [0, 1] image (``preprocess.fit_to_clip``):
    #: ``canvas`` (longest side resized to it and padded to a square first, or null: the shorter side resized
    #: to ``size`` and the centre cropped, as open_clip), ``scale`` (the value of white: 255 for models trained on
    #: 0-255 tensors), per-channel ``mean``/``std`` on that scale, ``size``, ``interpolation`` (bilinear or
    #: bicubic), ``antialias`` and ``clamp`` (whether the resized image saturates at [0, scale], as a resize
    #: of an 8-bit PIL image does).
    clip_preprocess: dict[str, Any] = field(default_factory=dict)
    #: Zero-shot logits are ``logit_scale * cos`` (open_clip's usage) when true, the raw cosine similarity
    #: (CheXzero's positive-vs-negative softmax) when false.
    clip_logit_scale: bool = True

    def __post_init__(self) -> None:
        _check(self)

    # -- derived -----------------------------------------------------------------------------------------
    @property
    def clip_image_size(self) -> int:
        size = self.clip_model["vision_cfg"]["image_size"]
        return int(size if isinstance(size, int) else size[0])

    # -- (de)serialisation -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Rebuild from :meth:`to_dict` output; an unknown, missing or mistyped key is named in the error."""
        if not isinstance(data, dict):
            raise ConfigError(f"model config must be a JSON object, got {type(data).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ConfigError(f"unknown model config key(s): {', '.join(unknown)}")
        hints = typing.get_type_hints(cls)
        kwargs = {name: _coerce(name, hints[name], value) for name, value in data.items()}
        try:
            return cls(**kwargs)
        except TypeError as exc:  # a required key is absent
            raise ConfigError(f"model config: {exc}") from None

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        return cls.from_dict(json.loads(text))

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def _coerce(name: str, hint: Any, value: Any) -> Any:
    """JSON has lists where the config has tuples; convert them and check scalar types on the way."""
    origin = typing.get_origin(hint)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"model config key {name!r} must be a list, got {value!r}")
        args = typing.get_args(hint)
        inner = args[0]
        return tuple(_coerce(name, inner, v) for v in value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"model config key {name!r} must be an object, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"model config key {name!r} must be true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"model config key {name!r} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"model config key {name!r} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"model config key {name!r} must be a string, got {value!r}")
        return value
    if isinstance(hint, types.UnionType):  # not used today; refuse rather than guess
        raise ConfigError(f"model config key {name!r} has an unsupported type")
    return value


_BACKBONES = ("resnet50", "mobilenet_v3_large_fpn", "small_cnn")


def _check(cfg: ModelConfig) -> None:
    def need(ok: bool, key: str, why: str) -> None:
        if not ok:
            raise ConfigError(f"model config key {key!r}: {why}")

    need(cfg.image_size >= 32, "image_size", "must be at least 32")
    need(cfg.image_std > 0, "image_std", "must be positive")
    need(cfg.image_resize in ("bilinear", "area-uint8"), "image_resize", "must be 'bilinear' or 'area-uint8'")
    need(cfg.detector_backbone in _BACKBONES, "detector_backbone", f"must be one of {_BACKBONES}")
    need(len(cfg.anchor_sizes) >= 1 and all(cfg.anchor_sizes), "anchor_sizes", "needs one non-empty tuple per map")
    need(all(r > 0 for r in cfg.anchor_aspect_ratios), "anchor_aspect_ratios", "must be positive")
    need(cfg.decoder_width % cfg.decoder_heads == 0, "decoder_heads", "must divide decoder_width")
    need(cfg.max_sentence_tokens >= 1, "max_sentence_tokens", "must be at least 1")
    need(cfg.max_sentence_tokens < cfg.decoder_positions, "max_sentence_tokens",
         "must be below decoder_positions")
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        need(0 <= getattr(cfg, key) < cfg.vocab_size, key, "must be a token id below vocab_size")
    need(len(cfg.label_prompts) == len(CHEXPERT_LABELS) and all(len(p) == 2 for p in cfg.label_prompts),
         "label_prompts", f"needs one (positive, negative) pair per CheXpert label ({len(CHEXPERT_LABELS)})")
    need({"embed_dim", "vision_cfg", "text_cfg"} <= set(cfg.clip_model), "clip_model",
         "needs embed_dim, vision_cfg and text_cfg")
    if cfg.clip_preprocess:
        missing = sorted({"scale", "mean", "std", "size", "interpolation"} - set(cfg.clip_preprocess))
        need(not missing, "clip_preprocess", f"lacks {', '.join(missing)}")
        need(cfg.clip_preprocess["interpolation"] in ("bilinear", "bicubic"), "clip_preprocess",
             "interpolation must be bilinear or bicubic")
        need(len(cfg.clip_preprocess["mean"]) == 3 and len(cfg.clip_preprocess["std"]) == 3, "clip_preprocess",
             "mean and std need three (RGB) values")


#: The ModelConfig fields that describe the CLIP half of a bundle; every other field describes the regions
#: half (detector, region classifiers, decoder). ``pipelines.bundle.compose_bundle`` combines the two.
CLIP_FIELDS: tuple[str, ...] = ("clip_model", "clip_label_head", "label_prompts", "clip_preprocess",
                                "clip_logit_scale")


def _vit_b16() -> dict[str, Any]:
    """open_clip's ViT-B-16 architecture (its ``model_configs/ViT-B-16.json``), spelled out so that a bundle
    never depends on what a later open_clip release calls ViT-B-16."""
    return {
        "embed_dim": 512,
        "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12},
    }


def paper() -> ModelConfig:
    """RGRG's published sizes plus a ViT-B-16 CLIP (see the module docstring)."""
    return ModelConfig(preset="paper", image_size=512, clip_model=_vit_b16())


def demo() -> ModelConfig:
    """Sub-second on two CPU cores; same structure as ``paper``. Per image: detector 3.5 GFLOP, CLIP 1.1
    GFLOP; the decoder's output layer dominates it at ``2 x 256 x vocab_size`` FLOP per token, so a demo
    bundle should pair this preset with a small BPE (``pipelines.tokenizer.train_bpe``), not GPT-2's 50257."""
    return ModelConfig(
        preset="demo",
        image_size=320,
        detector_backbone="mobilenet_v3_large_fpn",
        anchor_sizes=((24, 48, 96, 160, 256),) * 3,
        anchor_aspect_ratios=(0.25, 0.5, 1.0, 2.0, 4.0),
        rpn_pre_nms_top_n_train=1000,
        rpn_post_nms_top_n_train=500,
        rpn_pre_nms_top_n_test=300,
        rpn_post_nms_top_n_test=150,
        roi_output_size=7,
        box_head_dim=512,
        feature_dim=256,
        mlp_hidden=(256, 64),
        vocab_size=50257,
        decoder_layers=3,
        decoder_width=256,
        decoder_heads=4,
        decoder_positions=128,
        max_sentence_tokens=40,
        clip_model={
            "embed_dim": 128,
            "vision_cfg": {"image_size": 160, "layers": 4, "width": 192, "head_width": 64, "patch_size": 16},
            "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 2},
        },
    )


def tiny() -> ModelConfig:
    """Smallest thing that exercises every code path; for unit tests."""
    return ModelConfig(
        preset="tiny",
        image_size=64,
        detector_backbone="small_cnn",
        small_cnn_channels=(8, 16, 16),
        anchor_sizes=((8, 16, 32, 64),),
        anchor_aspect_ratios=(0.5, 1.0, 2.0),
        rpn_pre_nms_top_n_train=200,
        rpn_post_nms_top_n_train=100,
        rpn_pre_nms_top_n_test=200,
        rpn_post_nms_top_n_test=100,
        roi_output_size=4,
        box_head_dim=32,
        feature_dim=32,
        mlp_hidden=(16, 8),
        vocab_size=50257,
        decoder_layers=2,
        decoder_width=32,
        decoder_heads=2,
        decoder_positions=64,
        max_sentence_tokens=12,
        clip_model={
            "embed_dim": 16,
            "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
        },
    )


PRESETS = {"paper": paper, "demo": demo, "tiny": tiny}


def preset(name: str) -> ModelConfig:
    """The named preset; ``KeyError`` lists the valid names."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise KeyError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}") from None
