"""The CLIP half of CRRG-CLIP: an open_clip image/text model that scores the 14 CheXpert findings.

Built from an architecture dict (``ModelConfig.clip_model``) with ``open_clip.CLIP(**cfg)`` — the same
constructor ``open_clip.create_model(name, pretrained=None)`` ends in, without touching open_clip's global
model registry and never any pretrained weights. Text is tokenised with open_clip's own BPE
(``SimpleTokenizer``), whose vocabulary file ships inside the open_clip wheel: nothing is fetched.

Two ways to turn an image into 14 probabilities:

* zero-shot: for each label a (positive, negative) prompt pair; ``P(label) = softmax(scale * cos)[pos]``;
* a trained linear head on the image embedding (``label_head``), used whenever the config says it exists.
"""

from __future__ import annotations

import open_clip
import torch
import torch.nn.functional as F
from open_clip.tokenizer import SimpleTokenizer
from torch import Tensor, nn

from pipelines.constants import NUM_LABELS
from pipelines.models.config import ModelConfig


class ChestCLIP(nn.Module):
    """``encode_image(images[B,1,S,S])``, ``encode_text(tokens)``, ``contrastive_loss(images, tokens)``,
    ``label_probs(images) -> [B,14]``. Images arrive as the normalised grayscale model input at any size;
    they are resized to the CLIP input size and repeated to three channels."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.model = open_clip.CLIP(**cfg.clip_model)
        self.image_size = cfg.clip_image_size
        self.context_length = int(cfg.clip_model["text_cfg"]["context_length"])
        self.label_head = nn.Linear(int(cfg.clip_model["embed_dim"]), NUM_LABELS) if cfg.clip_label_head else None
        self.prompts = cfg.label_prompts
        self._tokenizer: SimpleTokenizer | None = None
        # normalised (positive, negative) prompt embeddings [2, 14, E], computed once per eval session
        self.register_buffer("prompt_embeddings", None, persistent=False)

    # -- towers ---------------------------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> Tensor:
        if self._tokenizer is None:
            self._tokenizer = SimpleTokenizer(context_length=self.context_length)
        return self._tokenizer(texts)

    def encode_image(self, images: Tensor, normalize: bool = True) -> Tensor:
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear",
                                   align_corners=False, antialias=True)
        return self.model.encode_image(images.expand(-1, 3, -1, -1), normalize=normalize)

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

    def label_logits(self, images: Tensor) -> Tensor:
        """``[B,14]`` logits: the trained head's when present, else zero-shot positive-vs-negative logits."""
        emb = self.encode_image(images)
        if self.label_head is not None:
            return self.label_head(emb)
        prompts = self._prompt_embeddings(images.device).to(emb.dtype)
        sims = self.model.logit_scale.exp() * torch.einsum("be,sle->bsl", emb, prompts)  # [B, 2, 14]
        return sims[:, 0] - sims[:, 1]  # softmax over the pair == sigmoid of the difference

    def label_probs(self, images: Tensor) -> Tensor:
        return self.label_logits(images).float().sigmoid()
