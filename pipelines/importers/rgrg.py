"""Turn an RGRG full-model checkpoint (Tanida et al., CVPR 2023; ttanida/rgrg) into a paper-preset bundle.

RGRG's ``ReportGenerationModel.state_dict()`` (saved under ``"model"`` in its training checkpoints) has four
parts; this is how each maps onto :class:`pipelines.models.CRRGModel`:

``object_detector.*`` -> ``detector.*``
    Same torchvision names for ``backbone.0..7`` (ResNet-50, 1-channel conv1), ``rpn.head.*`` (the pre-0.13
    ``rpn.head.conv.{weight,bias}`` become ``rpn.head.conv.0.0.*``) and ``roi_heads.box_head|box_predictor``;
    ``roi_heads.dim_reduction`` (2048 -> 1024) becomes ``region_proj``.
``binary_classifier_region_selection.classifier.*`` -> ``selector.classifier.*``
``binary_classifier_region_abnormal.classifier.*`` -> ``abnormality.classifier.*``
``language_model.*`` -> ``decoder.*``
    ``gpt_with_lm_head.transformer.*`` -> ``lm.transformer.*``; each layer's pseudo self-attention
    ``attn.uk`` / ``attn.uv`` become rows of ``prefix_kv``; ``feature_space_transformation_nn`` ->
    ``feature_proj``. RGRG adds ``wte(position_ids)`` (not ``wpe``) as position embedding, so the imported
    ``wpe`` is the first ``n_positions`` rows of ``wte``: the imported model computes what RGRG computed.
    The aliases RGRG's module also registers (``language_model.gpt.*``, ``.wte``, ``.gpt2_blocks.*``, ...)
    and the causal-mask buffers are ignored.

RGRG has no CLIP classifier: the bundle's CLIP is the given open_clip state dict, or random weights, and the
manifest says which (``training.clip``).

What RGRG computes besides the weights, and where the bundle says so:

* decoding (``generate_reports_for_images.py``): 4 beams, ``max_length`` 300 with BOS counted, i.e. up to 299
  tokens (``decoding``); the decoder's beam search has transformers 4.19's ``early_stopping=True`` semantics;
* GPT-2: ``gelu_new`` and layer-norm epsilon 1e-5 (``healx/gpt-2-pubmed-medium``); the importer checks that the
  decoder it builds uses them, and that a ``config.json`` of the GPT-2 the user gives agrees;
* precision: the checkpoint's own unless another is asked for (``weights_dtype``, ``training.precision``);
* report assembly: spaCy sentences and BERTScore de-duplication with the faithful models when their local
  directories are given, the stand-ins otherwise (``report``, :mod:`pipelines.report`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pipelines.bundle import save_bundle
from pipelines.report import component_files, report_section
from pipelines.models.config import ModelConfig, paper
from pipelines.models.crrg import CRRGModel
from pipelines.tokenizer import gpt2_tokenizer

log = logging.getLogger(__name__)

DET, SEL, ABN, LM = ("object_detector.", "binary_classifier_region_selection.",
                     "binary_classifier_region_abnormal.", "language_model.")
_GPT = LM + "gpt_with_lm_head."
_LAYER = re.compile(re.escape(_GPT) + r"transformer\.h\.(\d+)\.")

#: RGRG's report generation settings: ``NUM_BEAMS`` and ``MAX_NUM_TOKENS_GENERATE`` (a ``max_length``: BOS counts).
NUM_BEAMS, MAX_LENGTH = 4, 300
#: RGRG's image normalisation (``generate_reports_for_images.py``; computed over its training images).
IMAGE_MEAN, IMAGE_STD = 0.471, 0.302
#: What RGRG's GPT-2 (``healx/gpt-2-pubmed-medium``, GPT-2 medium) computes with; the importer's decoder must match.
GPT2_ASSUMED: dict[str, Any] = {"activation_function": "gelu_new", "layer_norm_epsilon": 1e-5}


class RGRGImportError(ValueError):
    """The checkpoint is not an RGRG full model as this importer knows it; the message names the key."""


def read_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """The model state dict of an RGRG checkpoint file (``{"model": state_dict, ...}`` or a bare one)."""
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    state = obj.get("model", obj) if isinstance(obj, Mapping) else None
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise RGRGImportError(f"{path}: not a state dict or a checkpoint with a 'model' state dict")
    return dict(state)


def _need(state: Mapping[str, Tensor], key: str) -> Tensor:
    if key not in state:
        raise RGRGImportError(f"RGRG checkpoint lacks {key!r}")
    return state[key]


def config_from_checkpoint(state: Mapping[str, Tensor], base: ModelConfig | None = None,
                           decoder_heads: int = 16) -> ModelConfig:
    """``base`` (default: the paper preset) with the sizes read off the checkpoint's tensor shapes and RGRG's
    token limit. GPT-2's head count is not visible in any shape; RGRG uses 16."""
    base = base or paper()
    wte = _need(state, _GPT + "transformer.wte.weight")
    layers = {int(m.group(1)) for k in state if (m := _LAYER.match(k))}
    if not layers or layers != set(range(max(layers) + 1)):
        raise RGRGImportError("RGRG checkpoint: language model layers are missing or not numbered 0..L-1")
    positions = _need(state, _GPT + "transformer.wpe.weight").shape[0]
    return base.replace(
        image_mean=IMAGE_MEAN,
        image_std=IMAGE_STD,
        image_resize="area-uint8",
        feature_dim=_need(state, DET + "roi_heads.dim_reduction.weight").shape[0],
        box_head_dim=_need(state, DET + "roi_heads.box_head.fc6.weight").shape[0],
        mlp_hidden=tuple(_need(state, f"{SEL}classifier.{i}.weight").shape[0] for i in (0, 2)),
        vocab_size=wte.shape[0],
        decoder_width=wte.shape[1],
        decoder_layers=max(layers) + 1,
        decoder_heads=decoder_heads,
        decoder_positions=positions,
        max_sentence_tokens=min(MAX_LENGTH - 1, positions - 1),
    )


def convert_state(state: Mapping[str, Tensor], cfg: ModelConfig) -> dict[str, dict[str, Tensor]]:
    """RGRG names -> ``{module: state_dict}`` for ``detector``, ``selector``, ``abnormality``, ``decoder``."""
    det: dict[str, Tensor] = {}
    for key, value in state.items():
        if not key.startswith(DET):
            continue
        name = key[len(DET):]
        if name.startswith("roi_heads.dim_reduction."):
            name = "region_proj." + name.rsplit(".", 1)[1]
        elif name in ("rpn.head.conv.weight", "rpn.head.conv.bias"):
            name = "rpn.head.conv.0.0." + name.rsplit(".", 1)[1]
        det[name] = value
    sel = {k[len(SEL):]: v for k, v in state.items() if k.startswith(SEL) and ".loss_fn." not in k}
    abn = {k[len(ABN):]: v for k, v in state.items() if k.startswith(ABN) and ".loss_fn." not in k}

    dec: dict[str, Tensor] = {}
    for key, value in state.items():
        if not key.startswith(_GPT + "transformer."):
            continue
        name = key[len(_GPT):]
        if re.search(r"\.attn\.(uk|uv|causal_mask|mask_out_value|bias|masked_bias)\b", name):
            continue  # prefix projections handled below; masks are buffers we do not need
        dec["lm." + name] = value
    wte = dec["lm.transformer.wte.weight"]
    if cfg.decoder_positions > wte.shape[0]:
        raise RGRGImportError("RGRG position embeddings are wte rows: decoder_positions exceeds vocab_size")
    dec["lm.transformer.wpe.weight"] = wte[: cfg.decoder_positions].clone()  # RGRG: wte(position_ids)
    lm_head = state.get(_GPT + "lm_head.weight")
    if lm_head is not None and not torch.equal(lm_head, wte):
        raise RGRGImportError(f"{_GPT}lm_head.weight is not tied to wte: unsupported")
    prefix = f"{_GPT}transformer.h.{{}}.attn.{{}}.{{}}"
    for part in ("weight", "bias"):
        rows = [_need(state, prefix.format(i, proj, part)) for proj in ("uk", "uv") for i in range(cfg.decoder_layers)]
        dec[f"prefix_kv.{part}"] = torch.cat(rows, dim=0)
    for idx in (0, 2):
        for part in ("weight", "bias"):
            dec[f"feature_proj.{idx}.{part}"] = _need(state, f"{LM}feature_space_transformation_nn.{idx}.{part}")
    return {"detector": det, "selector": sel, "abnormality": abn, "decoder": dec}


def build_model(state: Mapping[str, Tensor], cfg: ModelConfig,
                clip_state: Mapping[str, Tensor] | None = None) -> CRRGModel:
    """A :class:`CRRGModel` carrying the checkpoint's weights; every RGRG tensor must find its place."""
    converted = convert_state(state, cfg)  # fails fast on a missing key, before building a large model
    model = CRRGModel.from_config(cfg)
    for module, tensors in converted.items():
        target = getattr(model, module)
        expected = target.state_dict()
        for key, value in tensors.items():
            if key not in expected:
                raise RGRGImportError(f"RGRG tensor for {module}.{key} has no counterpart in the {cfg.preset} model")
            if tuple(value.shape) != tuple(expected[key].shape):
                raise RGRGImportError(f"RGRG tensor for {module}.{key} has shape {list(value.shape)}, "
                                   f"the model needs {list(expected[key].shape)}")
        result = target.load_state_dict({k: v.to(expected[k].dtype) for k, v in tensors.items()}, strict=False)
        missing = [k for k in result.missing_keys if not (module == "decoder" and k == "lm.lm_head.weight")]
        if missing:
            raise RGRGImportError(f"RGRG checkpoint has nothing for {module}.{missing[0]}"
                               + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if clip_state is not None:
        model.clip.model.load_state_dict(dict(clip_state))
    return model


def check_gpt2(model: CRRGModel, gpt2_config: Mapping[str, Any] | None = None) -> None:
    """Refuse (``RGRGImportError``) a decoder whose GPT-2 activation or layer-norm epsilon is not what RGRG's
    GPT-2 uses, or a user-given GPT-2 ``config.json`` that disagrees with it (activation, epsilon, heads)."""
    built = model.decoder.lm.config
    for key, want in GPT2_ASSUMED.items():
        if getattr(built, key) != want:
            raise RGRGImportError(f"the decoder's GPT-2 {key} is {getattr(built, key)!r}; RGRG's is {want!r}")
    if gpt2_config is None:
        return
    expected = {**GPT2_ASSUMED, "n_head": built.n_head, "n_embd": built.n_embd, "n_layer": built.n_layer}
    for key, want in expected.items():
        if key in gpt2_config and gpt2_config[key] != want:
            raise RGRGImportError(f"GPT-2 config.json says {key} = {gpt2_config[key]!r}, the imported decoder "
                                  f"computes with {want!r}")
    missing = sorted(set(GPT2_ASSUMED) - set(gpt2_config))
    if missing:  # transformers' defaults then apply: gelu_new and 1e-5, what RGRG ran with
        log.info("GPT-2 config.json has no %s: transformers' defaults (what RGRG ran with) apply", ", ".join(missing))


def checkpoint_dtype(state: Mapping[str, Tensor]) -> torch.dtype:
    """The precision of the checkpoint's floating-point tensors (the widest, if they are mixed)."""
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    if not dtypes:
        raise RGRGImportError("RGRG checkpoint has no floating-point tensors")
    return max(dtypes, key=lambda d: (torch.finfo(d).bits, torch.finfo(d).eps < 1e-3))


def import_rgrg(checkpoint: str | Path, out_dir: str | Path, *, vocab_json: str | Path, merges_txt: str | Path,
                name: str = "rgrg-import", version: str = "1", base: ModelConfig | None = None,
                clip_state: Mapping[str, Tensor] | None = None, dtype: torch.dtype | None = None,
                state: Mapping[str, Tensor] | None = None, gpt2_config: Mapping[str, Any] | None = None,
                spacy_dir: Path | None = None, bertscore_dir: Path | None = None) -> Path:
    """Checkpoint file (or an in-memory ``state``) -> bundle directory. Returns ``out_dir``.

    ``dtype`` None keeps the checkpoint's precision; ``gpt2_config`` is the GPT-2's ``config.json`` (checked);
    ``spacy_dir``/``bertscore_dir`` are local copies of ``en_core_web_trf`` and ``distilbert-base-uncased``
    for RGRG's report assembly, copied into the bundle."""
    state = dict(state) if state is not None else read_checkpoint(checkpoint)
    heads = int(gpt2_config.get("n_head", 16)) if gpt2_config else 16
    cfg = config_from_checkpoint(state, base, decoder_heads=heads)
    model = build_model(state, cfg, clip_state)
    check_gpt2(model, gpt2_config)
    tokenizer = gpt2_tokenizer(vocab_json, merges_txt)
    source_dtype = checkpoint_dtype(state)
    stored = source_dtype if dtype is None else dtype
    training: dict[str, Any] = {
        "source": f"RGRG full-model checkpoint {Path(str(checkpoint)).name}",
        "clip": "weights supplied at import" if clip_state is not None else "random initialisation (RGRG has no CLIP)",
        "precision": (f"{_name(stored)}, the checkpoint's own" if stored == source_dtype
                      else f"{_name(stored)} as asked; the checkpoint holds {_name(source_dtype)}"),
        "gpt2_config": "checked against the given config.json" if gpt2_config else "transformers' GPT-2 defaults",
    }
    return save_bundle(
        model, cfg, out_dir, name=name, version=version, tokenizer=tokenizer,
        intended_use="Research reproduction of RGRG region-guided report generation; not for clinical use.",
        clinical_use=False, training=training, dtype=stored, num_beams=NUM_BEAMS,
        report=report_section(spacy_dir, bertscore_dir), extra_files=component_files(spacy_dir, bertscore_dir),
    )


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
