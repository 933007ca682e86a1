"""The CLIP half of CRRG-CLIP: an open_clip image/text model that scores the 14 CheXpert findings.

Built from an architecture dict (``ModelConfig.clip_model``: open_clip's model config, e.g. the contents of
its ``model_configs/ViT-B-32.json``, plus ``quick_gelu`` for OpenAI-trained towers) with the class open_clip's
own factory picks for it (``CLIP``, or ``CustomTextCLIP`` for ``custom_text`` configs), without touching
open_clip's model registry and never any pretrained weights. Text is tokenised with open_clip's BPE
(``SimpleTokenizer``, the same vocabulary as OpenAI's CLIP; it ships inside the open_clip wheel) at the
model's own context length: nothing is fetched. Towers that need Hugging Face downloads (``hf_model_name``,
``hf_tokenizer_name``) and CoCa are refused with a :class:`ConfigError`.

Each published model keeps its own image preprocessing (``ModelConfig.clip_preprocess``), applied to the
original image by :func:`pipelines.preprocess.fit_to_clip` (``Preprocessed.clip``, what the engine uses):
CheXzero's 320-px letterbox on the 0-255 scale normalised with its own mean/std and resized bicubic,
open_clip's [0, 1] RGB resized and centre-cropped, normalised with the model's mean/std.

Two ways to turn an image into 14 probabilities:

* zero-shot: for each label a (positive, negative) prompt pair; ``P(label) = softmax(s * cos)[pos]`` with
  ``s`` the learned logit scale, or 1 where the model was evaluated on raw cosines (CheXzero);
* a trained linear head on the image embedding (``label_head``), used whenever the config says it exists.
"""

from __future__ import annotations

import copy
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from open_clip.tokenizer import SimpleTokenizer
from torch import Tensor, nn

from pipelines.constants import NUM_LABELS
from pipelines.models.config import ConfigError, ModelConfig
from pipelines.preprocess import normalize_for_clip, resize_square


def build_open_clip(architecture: dict[str, Any]) -> nn.Module:
    """The untrained open_clip module ``architecture`` describes (the class choice open_clip's
    ``create_model`` makes, with weights left at their initialisation)."""
    arch = copy.deepcopy(architecture)
    text_cfg = arch.get("text_cfg", {})
    if "multimodal_cfg" in arch:
        raise ConfigError("model config key 'clip_model': CoCa models are not supported (no zero-shot head)")
    for key in ("hf_model_name", "hf_tokenizer_name"):
        if key in text_cfg:
            raise ConfigError(f"model config key 'clip_model': text_cfg.{key} needs files from the Hugging Face "
                              "hub, which this node never downloads")
    if "timm_model_name" in arch.get("vision_cfg", {}):
        arch["vision_cfg"]["timm_model_pretrained"] = False
    custom_text = bool(arch.pop("custom_text", False))
    cls = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    return cls(**arch)


class ChestCLIP(nn.Module):
    """``encode_image(images[B,1,S,S])``, ``encode_text(tokens)``, ``contrastive_loss(images, tokens)``,
    ``label_probs(images) -> [B,14]``. Images arrive as the detector's normalised grayscale input (the
    letterboxed square, any size), which :meth:`clip_input` turns into what this CLIP model was trained on,
    or (``prepared=True``) as that CLIP input ``[B,3,s,s]`` already made from the original image."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.model = build_open_clip(cfg.clip_model)
        self.image_size = cfg.clip_image_size
        text_cfg = cfg.clip_model["text_cfg"]
        self.context_length = int(text_cfg["context_length"])
        self.tokenizer_kwargs = dict(text_cfg.get("tokenizer_kwargs", {}))
        self.label_head = nn.Linear(int(cfg.clip_model["embed_dim"]), NUM_LABELS) if cfg.clip_label_head else None
        self.prompts = cfg.label_prompts
        self.preprocess = dict(cfg.clip_preprocess)
        self.logit_scaled = cfg.clip_logit_scale
        self.input_mean, self.input_std = cfg.image_mean, cfg.image_std
        self._tokenizer: SimpleTokenizer | None = None
        # normalised (positive, negative) prompt embeddings [2, 14, E], computed once per eval session
        self.register_buffer("prompt_embeddings", None, persistent=False)

    # -- inputs ---------------------------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> Tensor:
        if self._tokenizer is None:
            self._tokenizer = SimpleTokenizer(context_length=self.context_length, **self.tokenizer_kwargs)
        return self._tokenizer(texts)

    def clip_input(self, images: Tensor) -> Tensor:
        """``[B,3,s,s]`` CLIP input from the detector's input ``images[B,1,S,S]``.

        Without a ``clip_preprocess`` spec: the detector input resized (bilinear, antialiased), which is what
        the node's own CLIP training sees. With one, an approximation of the published model's steps from the
        detector input (training; callers without the original image): the detector normalisation undone (the
        letterboxed [0, 1] image), resized to ``canvas`` if given, then
        :func:`~pipelines.preprocess.normalize_for_clip`. The engine gives an imported model its exact input
        instead, made from the original image (:func:`~pipelines.preprocess.fit_to_clip`,
        ``Preprocessed.clip``)."""
        spec = self.preprocess
        if not spec:
            return resize_square(images, self.image_size, "bilinear", True).expand(-1, 3, -1, -1)
        x = (images.float() * self.input_std + self.input_mean).clamp_(0.0, 1.0)
        if spec.get("canvas"):
            x = resize_square(x, int(spec["canvas"]), "bilinear", True)
        return normalize_for_clip(x, spec)

    # -- towers ---------------------------------------------------------------------------------------------
    def encode_image(self, images: Tensor, normalize: bool = True, prepared: bool = False) -> Tensor:
        """``[B,E]`` embeddings of the detector input ``images[B,1,S,S]`` or, when ``prepared``, of the CLIP
        input ``images[B,3,s,s]`` itself (``Preprocessed.clip``)."""
        return self.model.encode_image(images if prepared else self.clip_input(images), normalize=normalize)

    def encode_text(self, tokens: Tensor, normalize: bool = True) -> Tensor:
        return self.model.encode_text(tokens, normalize=normalize)

    def contrastive_loss(self, images: Tensor, tokens: Tensor) -> Tensor:
        """Symmetric InfoNCE over the batch (image i belongs with text i)."""
        img, txt = self.encode_image(images), self.encode_text(tokens)
        logits = self.model.logit_scale.exp() * img @ txt.T
        target = torch.arange(len(img), device=img.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2

    # -- classification -------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> ChestCLIP:
        self.prompt_embeddings = None  # weights may change (or just did): recompute on next use
        return super().train(mode)

    def _prompt_embeddings(self, device: torch.device) -> Tensor:
        if self.prompt_embeddings is None or self.training:
            texts = [p for p, _ in self.prompts] + [n for _, n in self.prompts]
            emb = self.encode_text(self.tokenize(texts).to(device))
            self.prompt_embeddings = emb.view(2, NUM_LABELS, -1)
        return self.prompt_embeddings

    def label_logits(self, images: Tensor, prepared: bool = False) -> Tensor:
        """``[B,14]`` logits: the trained head's when present, else zero-shot positive-vs-negative logits
        (``images``, ``prepared``: :meth:`encode_image`)."""
        emb = self.encode_image(images, prepared=prepared)
        if self.label_head is not None:
            return self.label_head(emb)
        prompts = self._prompt_embeddings(images.device).to(emb.dtype)
        sims = torch.einsum("be,sle->bsl", emb, prompts)  # [B, 2, 14] cosine similarities
        if self.logit_scaled:
            sims = self.model.logit_scale.exp() * sims
        return sims[:, 0] - sims[:, 1]  # softmax over the pair == sigmoid of the difference

    def label_probs(self, images: Tensor, prepared: bool = False) -> Tensor:
        return self.label_logits(images, prepared).float().sigmoid()

