"""GPT-2 that writes one sentence about one region, conditioned on that region's feature.

Conditioning is RGRG's *pseudo self-attention* (Ziegler et al. 2019, "Encoder-Agnostic Adaptation"): the
region feature is mapped to the text width (RGRG's ``feature_space_transformation_nn``), then to one extra
key and one extra value per layer, which every word attends to in addition to the words before it. That is
exactly a one-position *KV-cache prefix*, so we implement it as such: the unmodified transformers
``GPT2LMHeadModel`` runs with a cache pre-filled by :meth:`ReportDecoder.prefix_cache`. Consequences:

* no forked attention code — any attention kernel transformers ships (eager, sdpa, flash) is used as is;
* generation is ordinary incremental decoding on top of that cache, so a static cache / CUDA graphs can
  replace :class:`~transformers.DynamicCache` later without touching the conditioning;
* RGRG checkpoints import losslessly: its per-layer ``uk``/``uv`` are the rows of :attr:`prefix_kv`.

Words take positions ``0..T-1`` (the prefix has no position). Sequences are ``[BOS] tokens... [EOS]``; with
the GPT-2 vocabulary BOS = EOS = PAD = ``<|endoftext|>``, told apart by ``attention_mask``.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel, GPT2Model

from pipelines.models.config import ModelConfig

# transformers 5.x renamed ``past_key_values`` to ``cache``; accept both so either release works.
_CACHE_KWARG = "cache" if "cache" in inspect.signature(GPT2Model.forward).parameters else "past_key_values"


class ReportDecoder(nn.Module):
    """``forward(features[N,D], input_ids[N,T], attention_mask[N,T]) -> loss`` (teacher forcing, padding
    ignored); ``generate(features[N,D], max_new_tokens, num_beams) -> LongTensor[N,T']``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        width = cfg.decoder_width
        self.gpt2_config = GPT2Config(
            vocab_size=cfg.vocab_size, n_positions=cfg.decoder_positions, n_embd=width,
            n_layer=cfg.decoder_layers, n_head=cfg.decoder_heads,
            bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
        )
        self.lm = GPT2LMHeadModel(self.gpt2_config)
        #: region feature -> text width (RGRG: Linear, ReLU, Linear).
        self.feature_proj = nn.Sequential(nn.Linear(cfg.feature_dim, width), nn.ReLU(), nn.Linear(width, width))
        #: one matmul for every layer's prefix key and value: rows ``[k_0 .. k_{L-1}, v_0 .. v_{L-1}]``.
        self.prefix_kv = nn.Linear(width, 2 * cfg.decoder_layers * width)
        self.layers, self.heads, self.width = cfg.decoder_layers, cfg.decoder_heads, width
        self.bos, self.eos, self.pad = cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id
        self.max_new_tokens = cfg.max_sentence_tokens

    # -- conditioning ---------------------------------------------------------------------------------------
    def prefix_cache(self, features: Tensor) -> DynamicCache:
        """A cache holding, for every layer, the one-position key/value the region feature contributes."""
        n = features.shape[0]
        kv = self.prefix_kv(self.feature_proj(features))  # [N, 2*L*E]
        kv = kv.view(n, 2, self.layers, self.heads, 1, self.width // self.heads)
        cache = DynamicCache()
        for layer in range(self.layers):
            cache.update(kv[:, 0, layer], kv[:, 1, layer], layer)
        return cache

    def _step(self, input_ids: Tensor, cache: DynamicCache, position_ids: Tensor,
              attention_mask: Tensor | None = None) -> Tensor:
        out = self.lm(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                      use_cache=True, **{_CACHE_KWARG: cache})
        return out.logits

    # -- training -------------------------------------------------------------------------------------------
    def forward(self, features: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Mean next-token cross-entropy over the real (``attention_mask == 1``) target tokens."""
        n, t = input_ids.shape
        if features.shape[0] != n:
            raise ValueError(f"{features.shape[0]} features for {n} sentences")
        mask = attention_mask.to(torch.long)
        full_mask = torch.cat([mask.new_ones(n, 1), mask], dim=1)  # the prefix is always visible
        positions = torch.arange(t, device=input_ids.device).expand(n, t)
        logits = self._step(input_ids, self.prefix_cache(features), positions, full_mask)
        labels = input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100)

    # -- inference ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, features: Tensor, max_new_tokens: int | None = None, num_beams: int = 1) -> Tensor:
        """Token ids after BOS, up to and including EOS, right-padded with PAD: ``[N, T']``.

        Greedy (``num_beams=1``) or beam search, batched over all N regions with a KV cache; stops as soon
        as every sequence has produced EOS."""
        steps = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        n = features.shape[0]
        if n == 0 or steps == 0:
            return torch.empty((n, 0), dtype=torch.long, device=features.device)
        if num_beams < 1:
            raise ValueError("num_beams must be >= 1")
        if num_beams == 1:
            return self._greedy(features, steps)
        return self._beam(features, steps, num_beams)

    def _greedy(self, features: Tensor, steps: int) -> Tensor:
        n, device = features.shape[0], features.device
        cache = self.prefix_cache(features)
        token = torch.full((n, 1), self.bos, dtype=torch.long, device=device)
        done = torch.zeros(n, dtype=torch.bool, device=device)
        mask = torch.ones((n, steps + 1), dtype=torch.long, device=device)  # prefix + words, all visible
        out: list[Tensor] = []
        for step in range(steps):
            logits = self._step(token, cache, torch.full((n, 1), step, device=device), mask[:, : step + 2])
            nxt = logits[:, -1].argmax(-1).masked_fill(done, self.pad)
            out.append(nxt)
            done |= nxt == self.eos
            if bool(done.all()):
                break
            token = nxt.unsqueeze(1)
        return torch.stack(out, dim=1)

    def _beam(self, features: Tensor, steps: int, k: int, length_penalty: float = 1.0) -> Tensor:
        """Fixed-width beam search: a finished beam keeps its slot and can only be extended by PAD at zero
        cost, so all bookkeeping is tensor ops on ``[N, K]``; the best beam by ``score / length**penalty``
        wins."""
        n, device = features.shape[0], features.device
        cache = self.prefix_cache(features.repeat_interleave(k, dim=0))
        scores = torch.full((n, k), float("-inf"), device=device)
        scores[:, 0] = 0.0  # all beams start identical: expand only the first
        token = torch.full((n * k, 1), self.bos, dtype=torch.long, device=device)
        done = torch.zeros(n * k, dtype=torch.bool, device=device)
        lengths = torch.zeros(n * k, device=device)
        seqs = torch.empty((n * k, 0), dtype=torch.long, device=device)
        rows = torch.arange(n, device=device).unsqueeze(1) * k
        mask = torch.ones((n * k, steps + 1), dtype=torch.long, device=device)
        vocab = self.gpt2_config.vocab_size
        frozen = torch.full((1, vocab), float("-inf"), device=device)  # a finished beam's only continuation
        frozen[0, self.pad] = 0.0
        for step in range(steps):
            logp = self._step(token, cache, torch.full((n * k, 1), step, device=device), mask[:, : step + 2])
            logp = torch.where(done.unsqueeze(1), frozen, logp[:, -1].float().log_softmax(-1))
            cand = (scores.view(-1, 1) + logp).view(n, k * vocab)
            scores, idx = cand.topk(k, dim=1)
            src = (rows + idx // vocab).view(-1)
            nxt = (idx % vocab).view(-1)
            seqs = torch.cat([seqs[src], nxt.unsqueeze(1)], dim=1)
            lengths = lengths[src] + (~done[src]).float()
            done = done[src] | (nxt == self.eos)
            cache.reorder_cache(src)
            if bool(done.all()):
                break
            token = nxt.unsqueeze(1)
        norm = scores / lengths.view(n, k).clamp(min=1.0) ** length_penalty
        best = rows.squeeze(1) + norm.argmax(dim=1)
        return seqs[best]
