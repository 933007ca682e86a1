"""Greedy report decoding with a static KV cache, replayed as CUDA graphs.

:meth:`pipelines.models.decoder.ReportDecoder.generate` runs the stock transformers ``GPT2LMHeadModel`` on a
``DynamicCache``: every token of every layer goes through Python, concatenates the cache, re-derives masks and
re-casts every weight under autocast. For GPT-2 medium that is ~24 x 15 kernel launches per token whose host
cost exceeds their GPU time at any batch a hospital sees. This module computes the *same* function:

* the same modules (``ln_1``, ``c_attn``, ``c_proj``, ``ln_2``, ``mlp``, ``ln_f``) and the same arithmetic as
  autocast would do (matrix products in the compute dtype, layer norms and the residual stream in float32),
  with the weights cast once instead of once per call;
* GPT-2's tanh-approximated GELU applied in the ``c_fc`` product's epilogue (``torch._addmm_activation``,
  cuBLASLt's GELU-bias epilogue on CUDA) instead of transformers' ``NewGELUActivation``, which is seven
  element-wise kernels over the ``[rows, 4 * width]`` activations, each a full read and write of them; the
  epilogue computes the same function in float32 and rounds once;
* a cache preallocated for ``steps + 1`` positions (slot 0 is the region's pseudo-self-attention prefix, slot
  ``s + 1`` the word at position ``s``), written in place, so every step's tensors have fixed addresses;
* on CUDA each step is captured once as a CUDA graph (one per step index, sharing one memory pool) and then
  replayed: a token costs one launch instead of hundreds.

Batches are padded to a power of two (at least :data:`ROW_BUCKET`) regions so that a handful of captured graph
sets serve every batch size; padded rows compute on zero features and are dropped.
"""

from __future__ import annotations

import typing
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from pipelines.models.decoder import ReportDecoder

#: Region rows are padded up to a power of two, at least this, so that a few graph sets serve every batch.
ROW_BUCKET = 64
#: How many captured graph sets (one per padded row count and step count) are kept.
MAX_GRAPH_SETS = 6
#: With early stopping on, the host checks "all sequences ended" once per this many steps (a sync each).
EOS_CHECK_EVERY = 8


#: ``activation_function`` values that are GELU with the tanh approximation, the epilogue's function.
TANH_GELU = frozenset({"gelu_new", "gelu_pytorch_tanh"})


@dataclass
class _Layer:
    ln_1: torch.nn.Module
    ln_2: torch.nn.Module
    act: torch.nn.Module | None  # None: tanh GELU, fused into the c_fc product
    attn_w: Tensor
    attn_b: Tensor
    proj_w: Tensor
    proj_b: Tensor
    fc_w: Tensor
    fc_b: Tensor
    out_w: Tensor
    out_b: Tensor


class _State:
    """Fixed-address buffers of one (rows, steps) problem, and the step graphs captured on them."""

    def __init__(self, fast: StaticGreedyDecoder, rows: int, steps: int, kv_dtype: torch.dtype) -> None:
        d = fast.decoder
        dev = fast.device
        shape = (d.layers, rows, d.heads, steps + 1, d.width // d.heads)
        self.keys = torch.zeros(shape, dtype=kv_dtype, device=dev)
        self.values = torch.zeros(shape, dtype=kv_dtype, device=dev)
        self.token = torch.zeros(rows, dtype=torch.long, device=dev)
        self.done = torch.zeros(rows, dtype=torch.bool, device=dev)
        self.out = torch.zeros((rows, steps), dtype=torch.long, device=dev)
        self.graphs: list[torch.cuda.CUDAGraph] = []


class StaticGreedyDecoder:
    """Fast greedy decoding for a :class:`ReportDecoder` in eval mode.

    ``generate(features[N,D], steps, stop_at_eos=True) -> LongTensor[N,T']`` has the contract of
    ``ReportDecoder.generate(features, steps, num_beams=1)``: tokens after BOS, through EOS, PAD after it;
    with ``stop_at_eos`` the result ends at the first checked step where every sequence has ended (the reference
    stops at the exact step: trailing all-PAD columns are trimmed so shapes agree). ``stop_at_eos=False`` always
    runs ``steps`` steps (fixed-work benchmarking).

    The weights are snapshotted (cast) at construction: build a new instance after changing them.
    """

    def __init__(self, decoder: ReportDecoder, compute_dtype: torch.dtype | None = None,
                 cuda_graphs: bool = True) -> None:
        if decoder.training:
            raise ValueError("StaticGreedyDecoder needs the decoder in eval mode")
        self.decoder = decoder
        lm = decoder.lm
        self.device = lm.lm_head.weight.device
        on_cuda = self.device.type == "cuda"
        #: Matrix-product dtype: what the engine's autocast uses on CUDA, the weights' own dtype elsewhere.
        self.dtype = compute_dtype or (torch.bfloat16 if on_cuda else lm.lm_head.weight.dtype)
        self.cuda_graphs = cuda_graphs and on_cuda
        tr = lm.transformer
        cast = self._cast
        self.wte, self.wpe, self.ln_f = tr.wte.weight, tr.wpe.weight, tr.ln_f
        head = cast(lm.lm_head.weight)
        self.vocab = head.shape[0]
        #: lm_head rows padded with zeros to a multiple of 64: GPT-2's 50,257 makes every logits row
        #: misaligned for the tensor-core GEMMs (padded columns are sliced off before the arg-max).
        self.head_w = F.pad(head, (0, 0, 0, -self.vocab % 64))
        fused_gelu = lm.config.activation_function in TANH_GELU
        self.layers = [
            _Layer(b.ln_1, b.ln_2, None if fused_gelu else b.mlp.act, cast(b.attn.c_attn.weight), cast(b.attn.c_attn.bias),
                   cast(b.attn.c_proj.weight), cast(b.attn.c_proj.bias), cast(b.mlp.c_fc.weight),
                   cast(b.mlp.c_fc.bias), cast(b.mlp.c_proj.weight), cast(b.mlp.c_proj.bias))
            for b in typing.cast(list[Any], list(tr.h))  # transformers' blocks: attributes typed loosely
        ]
        self._states: OrderedDict[tuple[int, int], _State] = OrderedDict()
        self._pool: Any = None  # CUDA graph memory pool shared by every captured step

    def _cast(self, t: Tensor) -> Tensor:
        return t.detach().to(self.dtype)

    # -- one step, written against fixed buffers -------------------------------------------------------------
    def _step(self, st: _State, step: int) -> None:
        """Feed ``st.token`` at position ``step``; write the next token into ``st.out[:, step]``."""
        d = self.decoder
        rows, heads = st.token.shape[0], d.heads
        x = F.embedding(st.token, self.wte) + self.wpe[step]  # float32 residual stream, as in GPT2Model
        for i, layer in enumerate(self.layers):
            a = layer.ln_1(x).to(self.dtype)
            qkv = torch.addmm(layer.attn_b, a, layer.attn_w)  # transformers' Conv1D is exactly this addmm
            q, k, v = (t.view(rows, heads, 1, -1) for t in qkv.split(d.width, dim=-1))
            st.keys[i, :, :, step + 1].copy_(k.squeeze(2))
            st.values[i, :, :, step + 1].copy_(v.squeeze(2))
            o = _attend(q, st.keys[i, :, :, : step + 2], st.values[i, :, :, : step + 2])
            x = x + torch.addmm(layer.proj_b, o.reshape(rows, d.width), layer.proj_w)
            a = layer.ln_2(x).to(self.dtype)
            if layer.act is None:
                h = torch._addmm_activation(layer.fc_b, a, layer.fc_w, use_gelu=True)  # GELU (tanh) epilogue
            else:
                h = layer.act(torch.addmm(layer.fc_b, a, layer.fc_w))
            x = x + torch.addmm(layer.out_b, h, layer.out_w)
        logits = F.linear(self.ln_f(x).to(self.dtype), self.head_w)[:, : self.vocab]
        nxt = logits.argmax(-1).masked_fill(st.done, d.pad)
        st.out[:, step] = nxt
        st.done |= nxt == d.eos
        st.token.copy_(nxt)

    def _state(self, rows: int, steps: int, kv_dtype: torch.dtype) -> _State:
        key = (rows, steps)
        st = self._states.get(key)
        if st is None or st.keys.dtype != kv_dtype:
            st = _State(self, rows, steps, kv_dtype)
            self._states[key] = st
            while len(self._states) > MAX_GRAPH_SETS:
                self._states.popitem(last=False)
        self._states.move_to_end(key)
        return st

    def _capture(self, st: _State, steps: int) -> None:
        """Capture one graph per step index. Capturing runs nothing: buffers are reset before each replay."""
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up (kernel selection, workspaces) outside the capture
            for step in range(steps):
                self._step(st, step)
        torch.cuda.current_stream(self.device).wait_stream(side)
        for step in range(steps):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                self._step(st, step)
            st.graphs.append(graph)

    # -- public -----------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, features: Tensor, steps: int | None = None, stop_at_eos: bool = True) -> Tensor:
        d = self.decoder
        steps = d.max_new_tokens if steps is None else steps
        n = features.shape[0]
        if n == 0 or steps == 0:
            return torch.empty((n, 0), dtype=torch.long, device=features.device)
        rows = max(ROW_BUCKET, 1 << (n - 1).bit_length()) if self.cuda_graphs else n
        if rows != n:
            features = torch.cat([features, features.new_zeros(rows - n, features.shape[1])])
        # the prefix runs under the caller's autocast, exactly as ReportDecoder.prefix_cache does
        kv = d.prefix_kv(d.feature_proj(features)).view(rows, 2, d.layers, d.heads, d.width // d.heads)
        with torch.autocast(self.device.type, enabled=False):
            st = self._state(rows, steps, kv.dtype)
            if self.cuda_graphs and not st.graphs:
                self._capture(st, steps)
            st.keys[:, :, :, 0].copy_(kv[:, 0].transpose(0, 1))
            st.values[:, :, :, 0].copy_(kv[:, 1].transpose(0, 1))
            st.token.fill_(d.bos)
            st.done.zero_()
            if rows != n:
                st.done[n:] = True  # padding rows emit PAD and never hold up early stopping
            st.out.fill_(d.pad)
            last = steps
            for step in range(steps):
                if self.cuda_graphs:
                    st.graphs[step].replay()
                else:
                    self._step(st, step)
                if stop_at_eos and (step + 1) % EOS_CHECK_EVERY == 0 and step + 1 < steps and bool(st.done.all()):
                    last = step + 1
                    break
            out = st.out[:n, :last].clone()
        if stop_at_eos:
            out = _trim_after_all_ended(out, d.eos, d.pad)
        return out


def _attend(q: Tensor, keys: Tensor, values: Tensor) -> Tensor:
    """One query per sequence against its cache: two batched products that read the cache once.

    Written instead of ``scaled_dot_product_attention``, whose fused kernels tile many query rows, on the
    guess that one row per (sequence, head) wastes their tiles; on the paper preset the decoder went from
    1.09 to 1.06 ms per image with it (docs/performance.md, run 4): no real gain, kept because it is the
    measured version. Softmax in float32, probabilities rounded to the value dtype as the fused kernels do."""
    scores = torch.matmul(q, keys.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
    return torch.matmul(scores.softmax(-1).to(values.dtype), values)


def _trim_after_all_ended(ids: Tensor, eos: int, pad: int) -> Tensor:
    """Cut the columns after the step at which every row had produced EOS (what the reference returns)."""
    ended = (ids == eos).cumsum(1) > 0  # [N, T]: row has produced EOS at or before this column
    all_ended = ended.all(0)
    if not bool(all_ended.any()):
        return ids
    first = int(all_ended.nonzero()[0, 0])
    return ids[:, : first + 1]
