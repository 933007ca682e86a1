"""Published chest-radiograph CLIP checkpoints as the CLIP half of a bundle.

Two checkpoint formats:

``openai``
    An OpenAI-CLIP state dict (``visual.*``, ``transformer.resblocks.*``, ``token_embedding``, ...), as
    OpenAI's ``clip`` package and CheXzero (Tiu et al., Nature BME 2022; rajpurkarlab/CheXzero) save it.
    The architecture is read off the tensor shapes (ViT or modified-ResNet image tower, QuickGELU), as
    open_clip's ``build_model_from_openai_state_dict`` does.
``open_clip``
    A checkpoint written by open_clip (``{"state_dict": ...}`` from its trainer, or a bare state dict, with
    or without DistributedDataParallel's ``module.`` prefix) of any architecture open_clip builds without a
    download; the architecture is open_clip's named model config (``--model ViT-B-32``) or a JSON file
    holding one (``open_clip_config.json``'s ``model_cfg`` or a bare model config).

Each model keeps what it was trained and evaluated with, written into the bundle's config and manifest:

* preprocessing: ``chexzero`` - the image letterboxed onto a 320-pixel square, on the 0-255 scale,
  normalised with CheXzero's mean 101.48761 and std 83.43944 and resized bicubic (torchvision's tensor
  resize: no antialiasing) to the model's input size; ``open_clip`` - [0, 1] RGB, the shorter side resized to the
  model's input size and the centre cut out (bicubic, antialiased and saturating as PIL resizes), normalised
  with the model's mean/std (OpenAI's unless given);
* tokenizer and context length: CLIP's BPE at the checkpoint's positional-embedding length;
* zero-shot scheme: a positive and a negative template per label (CheXzero: ``"{}"`` and ``"no {}"``)
  compared by a softmax over the pair, on raw cosine similarities (CheXzero) or scaled by the learned
  logit scale (open_clip).

The weights keep the checkpoint's own precision unless a dtype is asked for.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from torch import Tensor

from pipelines.bundle import sha256_file
from pipelines.constants import CHEXPERT_LABELS

FORMATS = ("openai", "open_clip")
SCHEMES = ("chexzero", "open_clip")

#: CheXzero's image statistics on the 0-255 scale (its ``zero_shot.make``) and its letterbox side
#: (``data_process.preprocess``), and its prompt pair (its README / notebook ``cxr_pair_template``).
CHEXZERO_MEAN, CHEXZERO_STD, CHEXZERO_CANVAS = 101.48761, 83.43944, 320
CHEXZERO_TEMPLATES = ("{}", "no {}")

#: keys OpenAI's released state dicts carry besides tensors of the model
_OPENAI_EXTRA = ("input_resolution", "context_length", "vocab_size")


class ClipImportError(ValueError):
    """The checkpoint cannot be imported; the message names the file, key or option at fault."""


@dataclass
class ClipHalf:
    """A CLIP model ready to be written into a bundle: the config fields it needs
    (``pipelines.models.config.CLIP_FIELDS``), its ``ChestCLIP`` state dict and where it came from."""

    config: dict[str, Any]
    state: dict[str, Tensor]
    source: dict[str, Any]


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a checkpoint file (.safetensors, a torch pickle, or a TorchScript archive as OpenAI
    publishes), unwrapped from ``{"state_dict": ...}`` / ``{"model": ...}`` and without a ``module.`` prefix."""
    path = Path(path)
    if not path.is_file():
        raise ClipImportError(f"{path}: checkpoint not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj: Any = load_file(str(path))
    else:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except RuntimeError as exc:
            if "TorchScript" not in str(exc) and "constants.pkl" not in str(exc):
                raise ClipImportError(f"{path}: unreadable checkpoint ({exc})") from None
            obj = torch.jit.load(str(path), map_location="cpu").state_dict()
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not obj:
        raise ClipImportError(f"{path}: not a state dict")
    state = {str(k).removeprefix("module."): v for k, v in obj.items() if k not in _OPENAI_EXTRA}
    bad = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if bad:
        raise ClipImportError(f"{path}: {bad[0]!r} is not a tensor")
    return state


def _blocks(state: Mapping[str, Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in state if (m := pattern.match(k))}
    return max(found) + 1 if found else 0


def _need(state: Mapping[str, Tensor], key: str) -> Tensor:
    if key not in state:
        raise ClipImportError(f"not an OpenAI-CLIP state dict: {key!r} is missing")
    return state[key]


def openai_architecture(state: Mapping[str, Tensor]) -> dict[str, Any]:
    """open_clip's model config for an OpenAI-format state dict, from its tensor shapes."""
    width = int(_need(state, "ln_final.weight").shape[0])
    text_cfg = {
        "context_length": int(_need(state, "positional_embedding").shape[0]),
        "vocab_size": int(_need(state, "token_embedding.weight").shape[0]),
        "width": width,
        "heads": width // 64,
        "layers": _blocks(state, "transformer.resblocks."),
    }
    if "visual.proj" in state:  # ViT image tower
        conv = _need(state, "visual.conv1.weight")
        grid = round((int(_need(state, "visual.positional_embedding").shape[0]) - 1) ** 0.5)
        vision_cfg: dict[str, Any] = {
            "image_size": int(conv.shape[-1]) * grid,
            "layers": _blocks(state, "visual.transformer.resblocks."),
            "width": int(conv.shape[0]),
            "patch_size": int(conv.shape[-1]),
        }
    else:  # modified ResNet
        grid = round((int(_need(state, "visual.attnpool.positional_embedding").shape[0]) - 1) ** 0.5)
        vision_cfg = {
            "image_size": 32 * grid,
            "layers": [_blocks(state, f"visual.layer{i}.") for i in range(1, 5)],
            "width": int(_need(state, "visual.layer1.0.conv1.weight").shape[0]),
        }
    return {"embed_dim": int(_need(state, "text_projection").shape[1]), "vision_cfg": vision_cfg,
            "text_cfg": text_cfg, "quick_gelu": True}


def open_clip_architecture(model: str) -> dict[str, Any]:
    """open_clip's config for a named model (shipped in its wheel), or the one in a JSON file."""
    path = Path(model)
    if path.suffix == ".json":
        if not path.is_file():
            raise ClipImportError(f"{path}: model config not found")
        data = json.loads(path.read_text())
        arch = data.get("model_cfg", data)
    else:
        arch = open_clip.get_model_config(model)
        if arch is None:
            raise ClipImportError(f"--model {model!r}: not an open_clip model name (see open_clip.list_models()) "
                                  "nor a .json model config")
    if not isinstance(arch, dict) or not {"embed_dim", "vision_cfg", "text_cfg"} <= set(arch):
        raise ClipImportError(f"--model {model!r}: a model config needs embed_dim, vision_cfg and text_cfg")
    return arch


def preprocess_spec(scheme: str, image_size: int, mean: tuple[float, ...] | None = None,
                    std: tuple[float, ...] | None = None) -> dict[str, Any]:
    """``ModelConfig.clip_preprocess`` for a scheme (see the module docstring)."""
    if scheme == "chexzero":
        return {"canvas": CHEXZERO_CANVAS, "scale": 255.0, "mean": list(mean or (CHEXZERO_MEAN,) * 3),
                "std": list(std or (CHEXZERO_STD,) * 3), "size": image_size, "interpolation": "bicubic",
                "antialias": False, "clamp": False}
    if scheme == "open_clip":
        return {"canvas": None, "scale": 1.0, "mean": list(mean or open_clip.OPENAI_DATASET_MEAN),
                "std": list(std or open_clip.OPENAI_DATASET_STD), "size": image_size, "interpolation": "bicubic",
                "antialias": True, "clamp": True}
    raise ClipImportError(f"--scheme {scheme!r}: choose one of {', '.join(SCHEMES)}")


def import_clip(checkpoint: str | Path, fmt: str, *, model: str | None = None, scheme: str | None = None,
                templates: tuple[str, str] | None = None, logit_scale: bool | None = None,
                mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
                dtype: torch.dtype | None = None) -> ClipHalf:
    """Read ``checkpoint`` and load it into the node's CLIP module (strict: every tensor must fit).

    Defaults by format: ``openai`` takes CheXzero's preprocessing and prompt scheme, ``open_clip`` open_clip's
    (``"{}"`` / ``"no {}"`` with the learned logit scale); each can be overridden."""
    from pipelines.models.clip import build_open_clip
    from pipelines.models.config import ConfigError

    if fmt not in FORMATS:
        raise ClipImportError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    state = read_state_dict(checkpoint)
    if fmt == "openai":
        arch = openai_architecture(state)
    else:
        if model is None:
            raise ClipImportError("--format open_clip needs --model (an open_clip model name or a .json config)")
        arch = open_clip_architecture(model)
    scheme = scheme or ("chexzero" if fmt == "openai" else "open_clip")
    size = arch["vision_cfg"]["image_size"]
    size = int(size if isinstance(size, int) else size[0])
    pos, neg = templates or CHEXZERO_TEMPLATES
    try:
        with torch.device("meta"):  # names and shapes only: no time spent initialising weights
            module = build_open_clip(arch)
    except ConfigError as exc:
        raise ClipImportError(str(exc)) from None
    if "positional_embedding" in state and not hasattr(module, "positional_embedding"):
        state = open_clip.model.convert_to_custom_text_state_dict(state)  # open_clip's old text-tower names
    reference = module.state_dict()
    missing = sorted(set(reference) - set(state))
    unexpected = sorted(set(state) - set(reference))
    if missing or unexpected:
        what = f"{missing[0]!r} is missing" if missing else f"{unexpected[0]!r} is not in the architecture"
        raise ClipImportError(f"{checkpoint}: {what} ({len(missing)} missing, {len(unexpected)} unexpected)")
    for key, want in reference.items():
        if tuple(state[key].shape) != tuple(want.shape):
            raise ClipImportError(f"{checkpoint}: {key!r} has shape {list(state[key].shape)}, the architecture "
                                  f"needs {list(want.shape)}")
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in state.values() if t.is_floating_point()})
    clip_state = {f"model.{k}": (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
                  for k, v in state.items()}
    use_scale = (scheme != "chexzero") if logit_scale is None else logit_scale
    config = {
        "clip_model": arch,
        "clip_label_head": False,
        "label_prompts": [[pos.format(label), neg.format(label)] for label in CHEXPERT_LABELS],
        "clip_preprocess": preprocess_spec(scheme, size, mean, std),
        "clip_logit_scale": use_scale,
    }
    source = {
        "checkpoint": Path(checkpoint).name,
        "checkpoint_sha256": sha256_file(Path(checkpoint)),
        "format": fmt,
        "model": model,
        "scheme": scheme,
        "checkpoint_dtypes": dtypes,
        "stored_dtype": str(dtype).removeprefix("torch.") if dtype is not None else "as in the checkpoint",
        "zero_shot": {"positive": pos, "negative": neg, "softmax_over": "positive, negative",
                      "logit_scale": use_scale},
        "tokenizer": {"kind": "CLIP BPE (open_clip SimpleTokenizer)",
                      "context_length": int(arch["text_cfg"]["context_length"])},
    }
    return ClipHalf(config, clip_state, source)
