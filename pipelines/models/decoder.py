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
        """RGRG's beam search: transformers 4.19's ``BeamSearchScorer`` with ``early_stopping=True``, tensor-batched
        over the ``N`` regions (what RGRG runs one ``BeamSearchScorer`` batch entry per region for).

        Per region and step, the ``2k`` best continuations of the ``k`` live beams are taken in order; one that
        ends in EOS goes, if it is among the first ``k``, to the region's pool of finished hypotheses, scored
        ``sum of log-probabilities / length ** length_penalty`` with length = BOS + the tokens before EOS; the
        first ``k`` that do not end become the next live beams, so ``k`` beams always continue. A pool holds
        ``k`` hypotheses (a better one replaces the worst); the region is done once it holds ``k``. At the
        token limit the live beams join the pool as they are. The best-scoring hypothesis wins."""
        n, device = features.shape[0], features.device
        vocab = self.gpt2_config.vocab_size
        cache = self.prefix_cache(features.repeat_interleave(k, dim=0))
        rows = torch.arange(n, device=device)
        beam_rows = (rows.unsqueeze(1) * k + torch.arange(k, device=device)).view(-1)  # [N*K]: itself
        scores = torch.full((n, k), -1e9, device=device)  # 4.19: every beam but the first starts at -1e9
        scores[:, 0] = 0.0
        seqs = torch.empty((n * k, 0), dtype=torch.long, device=device)  # tokens after BOS
        token = torch.full((n * k, 1), self.bos, dtype=torch.long, device=device)
        mask = torch.ones((n * k, steps + 1), dtype=torch.long, device=device)
        pool = _HypothesisPool(n, k, steps, self.pad, device)
        done = torch.zeros(n, dtype=torch.bool, device=device)
        rank = torch.arange(2 * k, device=device)
        for step in range(steps):
            logits = self._step(token, cache, torch.full((n * k, 1), step, device=device), mask[:, : step + 2])
            cand = (scores.view(-1, 1) + logits[:, -1].float().log_softmax(-1)).view(n, k * vocab)
            top, idx = cand.topk(2 * k, dim=1)  # [N, 2K], best first
            beam, tok = idx // vocab, idx % vocab
            ended = tok == self.eos
            for r in range(k):  # EOS among the first k candidates: a finished hypothesis, in rank order
                adds = ended[:, r] & ~done
                if bool(adds.any()):
                    src = rows * k + beam[:, r]
                    pool.add(adds, seqs[src], top[:, r] / float(step + 1) ** length_penalty, True)
            # the first k candidates that do not end continue, in rank order
            keep = torch.where(ended, rank + 2 * k, rank).argsort(dim=1)[:, :k]  # [N, K]
            src = (rows.unsqueeze(1) * k + beam.gather(1, keep)).view(-1)
            nxt = tok.gather(1, keep).view(-1)
            scores = top.gather(1, keep)
            # a finished region's rows only idle along (4.19 pads them), so they cannot change its result
            idle = done.repeat_interleave(k)
            src = torch.where(idle, beam_rows, src)
            nxt = nxt.masked_fill(idle, self.pad)
            seqs = torch.cat([seqs[src], nxt.unsqueeze(1)], dim=1)
            cache.reorder_cache(src)
            done |= pool.count >= k  # early_stopping=True: k finished hypotheses end the region
            if bool(done.all()):
                break
            token = nxt.unsqueeze(1)
        else:  # the token limit: the live beams of unfinished regions join the pool as they are
            length = float(steps + 1) ** length_penalty
            for b in range(k):
                pool.add(~done, seqs[rows * k + b], scores[:, b] / length, False)
        return pool.best(self.eos)


class _HypothesisPool:
    """Each region's finished hypotheses, as 4.19's ``BeamHypotheses`` keeps them: up to ``k``; when full, a
    hypothesis scoring above the worst replaces it (the earliest added of equal worst ones); the best is the
    highest score (the latest added of equal best ones, as 4.19's stable sort and ``pop()`` choose)."""

    def __init__(self, n: int, k: int, steps: int, pad: int, device: torch.device) -> None:
        self.k, self.pad = k, pad
        self.scores = torch.full((n, k), float("-inf"), device=device)
        self.stamp = torch.full((n, k), -1, dtype=torch.long, device=device)  # insertion order; -1 = empty
        self.tokens = torch.full((n, k, steps), pad, dtype=torch.long, device=device)
        self.length = torch.zeros((n, k), dtype=torch.long, device=device)  # tokens after BOS, EOS excluded
        self.ended = torch.zeros((n, k), dtype=torch.bool, device=device)  # finished by EOS (gets one appended)
        self.count = torch.zeros(n, dtype=torch.long, device=device)
        self._clock = 0

    def add(self, which: Tensor, seqs: Tensor, score: Tensor, ended: bool) -> None:
        """Offer ``seqs[N, t]`` (tokens after BOS) with ``score[N]`` for the regions in ``which[N]``."""
        filled = self.stamp >= 0
        worst = self.scores.masked_fill(~filled, float("inf")).amin(1)
        full = self.count >= self.k
        take = which & (~full | (score > worst))
        if not bool(take.any()):
            return
        # a free slot while not full, else the worst (earliest added among equal worst)
        big = torch.iinfo(torch.long).max
        order = torch.where(filled, self.stamp, big)
        worst_slot = torch.where(filled & (self.scores == worst.unsqueeze(1)), order, big).argmin(1)
        slot = torch.where(full, worst_slot, self.count.clamp(max=self.k - 1))
        r = take.nonzero().squeeze(1)
        s = slot[r]
        t = seqs.shape[1]
        self.tokens[r, s] = self.pad
        self.tokens[r, s, :t] = seqs[r]
        self.length[r, s] = t
        self.ended[r, s] = ended
        self.scores[r, s] = score[r]
        self.stamp[r, s] = self._clock
        self._clock += 1
        self.count[r] = (self.count[r] + 1).clamp(max=self.k)

    def best(self, eos: int) -> Tensor:
        """``[N, T]``: each region's best hypothesis, tokens after BOS, EOS appended to one that ended, padded."""
        best_score = self.scores.amax(1, keepdim=True)
        winner = torch.where(self.scores == best_score, self.stamp, -1).argmax(1)  # latest among equal best
        rows = torch.arange(self.scores.shape[0], device=self.scores.device)
        tokens, length, ended = self.tokens[rows, winner], self.length[rows, winner], self.ended[rows, winner]
        width = int((length + ended.long()).max()) if rows.numel() else 0
        out = torch.cat([tokens, tokens.new_full((rows.numel(), 1), self.pad)], dim=1)
        out[rows, length] = torch.where(ended, torch.full_like(length, eos), out[rows, length])
        return out[:, :width]
