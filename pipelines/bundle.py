"""Model bundles: a directory that is everything needed to run one trained model, and nothing else.

::

    manifest.json          name, version, preset, full ModelConfig, regions, labels, tokenizer, decoding
                           settings, thresholds, report assembly components, intended use, clinical_use,
                           training notes, and the sha256 of every other file
    detector.safetensors   one file per CRRGModel module (see ``pipelines.models.crrg.MODULES``)
    selector.safetensors
    abnormality.safetensors
    decoder.safetensors
    clip.safetensors
    tokenizer.json
    report/...             optional: the faithful report-assembly models (``pipelines.report``)

Loading is from a local path only and refuses, with a :class:`BundleError` that names the culprit: an unknown
manifest format version, a missing file, a checksum mismatch, a missing/unexpected tensor, or a tensor whose
shape does not fit the architecture the manifest describes. Weights may be stored as float16 (half the size);
they are loaded into float32 modules.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedTokenizerFast

from pipelines.constants import CHEXPERT_LABELS, REGIONS
from pipelines.models.config import ConfigError, ModelConfig
from pipelines.models.crrg import MODULES, CRRGModel
from pipelines.report import STAND_INS
from pipelines.tokenizer import SPECIAL_TOKEN, load_tokenizer, save_tokenizer

MANIFEST = "manifest.json"
FORMAT = "crrg-clip-bundle"
FORMAT_VERSION = 1
_CHUNK = 1 << 20

#: RGRG's decision rules, on the logits as RGRG compares them (no sigmoid, no rounded probability): a detected
#: region gets a sentence when its selector logit is ``> selection_logit``, and is called abnormal when its
#: abnormality logit is ``> abnormal_logit``.
DEFAULT_THRESHOLDS = {"selection_logit": -1.0, "abnormal_logit": -1.0}
#: Manifests written before the logit rules held probabilities under these names.
_PROBABILITY_THRESHOLDS = {"selection": "selection_logit", "abnormal": "abnormal_logit"}


class BundleError(Exception):
    """The bundle cannot be used; the message names the file or tensor at fault."""


@dataclass
class Bundle:
    """A loaded bundle: the model (eval mode, on its device) and everything the manifest says about it."""

    path: Path
    manifest: dict[str, Any]
    config: ModelConfig
    model: CRRGModel
    tokenizer: PreTrainedTokenizerFast
    thresholds: dict[str, float] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.manifest["name"])

    @property
    def version(self) -> str:
        return str(self.manifest["version"])

    @property
    def clinical_use(self) -> bool:
        return bool(self.manifest["clinical_use"])

    @property
    def decoding(self) -> dict[str, Any]:
        return dict(self.manifest["decoding"])


# -- saving -------------------------------------------------------------------------------------------------

def save_bundle(
    model: CRRGModel,
    cfg: ModelConfig,
    out_dir: str | Path,
    *,
    name: str,
    version: str,
    tokenizer: PreTrainedTokenizerFast,
    intended_use: str,
    clinical_use: bool,
    training: Mapping[str, Any] | None = None,
    thresholds: Mapping[str, float] | None = None,
    num_beams: int = 1,
    dtype: torch.dtype = torch.float16,
    report: Mapping[str, Any] | None = None,
    extra_files: Mapping[str, Path] | None = None,
) -> Path:
    """Write ``model`` as a bundle into ``out_dir`` (created; must not already hold a manifest).

    ``report`` is the manifest's report-assembly section (:mod:`pipelines.report`; default: the stand-ins);
    ``extra_files`` (name inside the bundle -> source file) are copied in and checksummed like the weights:
    the faithful report components a ``report`` section names."""
    out = Path(out_dir)
    if (out / MANIFEST).exists():
        raise BundleError(f"{out / MANIFEST} already exists: refusing to overwrite a bundle")
    if len(tokenizer) != cfg.vocab_size:
        raise BundleError(f"tokenizer has {len(tokenizer)} tokens but the config's vocab_size is {cfg.vocab_size}")
    if tokenizer.eos_token_id != cfg.eos_token_id:
        raise BundleError(f"tokenizer EOS id {tokenizer.eos_token_id} != config eos_token_id {cfg.eos_token_id}")
    th = {**DEFAULT_THRESHOLDS, **(thresholds or {})}
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    for module in MODULES:
        fname = f"{module}.safetensors"
        state = storable_state(getattr(model, module), dtype)
        save_file(state, str(out / fname), metadata={"module": module, "bundle": name, "version": version})
        files[fname] = sha256_file(out / fname)
    tok_file = save_tokenizer(tokenizer, out)
    files[tok_file] = sha256_file(out / tok_file)
    for fname, source in (extra_files or {}).items():
        target = out / fname
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        files[fname] = sha256_file(target)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": name,
        "version": version,
        "preset": cfg.preset,
        "config": cfg.to_dict(),
        "regions": list(REGIONS),
        "labels": list(CHEXPERT_LABELS),
        "tokenizer": {"file": tok_file, "special_token": SPECIAL_TOKEN, "vocab_size": len(tokenizer)},
        "decoding": {"num_beams": num_beams, "max_new_tokens": cfg.max_sentence_tokens},
        "thresholds": th,
        "report": dict(report or STAND_INS),
        "intended_use": intended_use,
        "clinical_use": bool(clinical_use),
        "training": dict(training or {}),
        "weights": {m: f"{m}.safetensors" for m in MODULES},
        "weights_dtype": str(dtype).removeprefix("torch."),
        "files": files,
    }
    return write_manifest(out, manifest)


def write_manifest(out: Path, manifest: Mapping[str, Any]) -> Path:
    """Write ``manifest.json`` last and whole (temporary file, then rename): a half-written bundle has none."""
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    tmp.replace(out / MANIFEST)
    return out


def storable_state(module: nn.Module, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """The state dict without tied aliases (safetensors refuses shared storage), floats cast to ``dtype``
    (None: each tensor keeps its own precision)."""
    out: dict[str, torch.Tensor] = {}
    tied = _tied_keys(module)
    for key, tensor in module.state_dict().items():
        if key in tied:
            continue
        t = tensor.detach().to("cpu")
        out[key] = (t.to(dtype) if dtype is not None and t.is_floating_point() else t).contiguous()
    return out


def _tied_keys(module: nn.Module) -> set[str]:
    """Keys naming the same parameter object as an earlier key (e.g. GPT-2's ``lm_head`` = ``wte``)."""
    seen: set[int] = set()
    tied = set()
    for key, tensor in module.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            tied.add(key)
        seen.add(id(tensor))
    return tied


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# -- checking -----------------------------------------------------------------------------------------------

def read_manifest(bundle_dir: str | Path) -> dict[str, Any]:
    """Parse and structurally check ``manifest.json``; :class:`BundleError` otherwise."""
    path = Path(bundle_dir) / MANIFEST
    if not Path(bundle_dir).is_dir():
        raise BundleError(f"bundle directory not found: {bundle_dir}")
    if not path.is_file():
        raise BundleError(f"{path}: missing (not a model bundle)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{path}: not a {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{path}: unknown manifest format_version {manifest.get('format_version')!r} "
                          f"(this release reads version {FORMAT_VERSION})")
    for key in ("name", "version", "preset", "config", "regions", "labels", "tokenizer", "decoding",
                "thresholds", "intended_use", "clinical_use", "weights", "files"):
        if key not in manifest:
            raise BundleError(f"{path}: manifest key {key!r} is missing")
    if list(manifest["regions"]) != list(REGIONS):
        raise BundleError(f"{path}: manifest 'regions' differ from the 29 Chest ImaGenome regions this node uses")
    if list(manifest["labels"]) != list(CHEXPERT_LABELS):
        raise BundleError(f"{path}: manifest 'labels' differ from the 14 CheXpert labels this node uses")
    if not isinstance(manifest["clinical_use"], bool):
        raise BundleError(f"{path}: manifest 'clinical_use' must be true or false")
    if set(manifest["weights"]) != set(MODULES):
        raise BundleError(f"{path}: manifest 'weights' must name exactly the modules {list(MODULES)}")
    return manifest


def _config(manifest: dict[str, Any], where: Path) -> ModelConfig:
    try:
        return ModelConfig.from_dict(manifest["config"])
    except ConfigError as exc:
        raise BundleError(f"{where / MANIFEST}: {exc}") from None


def _file_problems(bundle_dir: Path, manifest: dict[str, Any]) -> list[str]:
    problems = []
    files: dict[str, str] = manifest["files"]
    needed = set(manifest["weights"].values()) | {manifest["tokenizer"]["file"]}
    for fname in sorted(needed - set(files)):
        problems.append(f"{fname}: used by the manifest but has no checksum in 'files'")
    for part, spec in sorted((manifest.get("report") or {}).items()):
        folder = spec.get("path") if isinstance(spec, Mapping) else None
        if folder is not None and not any(f.startswith(f"{folder}/") for f in files):
            problems.append(f"{folder}: report.{part} is there but has no checksummed file in 'files'")
    for fname, expected in sorted(files.items()):
        path = bundle_dir / fname
        if Path(fname).is_absolute() or ".." in Path(fname).parts:
            problems.append(f"{fname}: file names must be relative to the bundle")
        elif not path.is_file():
            problems.append(f"{fname}: missing")
        elif sha256_file(path) != expected:
            problems.append(f"{fname}: checksum mismatch (sha256 differs from the manifest)")
    return problems


def _weight_problems(bundle_dir: Path, manifest: dict[str, Any], model: CRRGModel) -> list[str]:
    """Compare every stored tensor's name and shape with the model the config builds (headers only)."""
    problems = []
    for module, fname in sorted(manifest["weights"].items()):
        expected = getattr(model, module).state_dict()
        tied = _tied_keys(getattr(model, module))
        try:
            with safe_open(str(bundle_dir / fname), framework="pt") as fh:
                shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            problems.append(f"{fname}: unreadable safetensors file ({exc})")
            continue
        for key in sorted(set(expected) - set(shapes) - tied):
            problems.append(f"{fname}: tensor {key!r} is missing")
        for key in sorted(set(shapes) - set(expected)):
            problems.append(f"{fname}: unexpected tensor {key!r}")
        for key in sorted(set(shapes) & set(expected)):
            want = tuple(expected[key].shape)
            if shapes[key] != want:
                problems.append(f"{fname}: tensor {key!r} has shape {list(shapes[key])}, "
                                f"the architecture needs {list(want)}")
    return problems


def verify_bundle(bundle_dir: str | Path) -> list[str]:
    """Every problem found, as readable lines; empty when the bundle is sound. Reads tensor headers only:
    the architecture is built on the ``meta`` device, so verifying a large bundle costs no memory."""
    root = Path(bundle_dir)
    try:
        manifest = read_manifest(root)
        cfg = _config(manifest, root)
    except BundleError as exc:
        return [str(exc)]
    problems = _file_problems(root, manifest)
    present = {f for f in manifest["weights"].values() if (root / f).is_file()}
    with torch.device("meta"):
        skeleton = CRRGModel.from_config(cfg)
    checkable = {**manifest, "weights": {m: f for m, f in manifest["weights"].items() if f in present}}
    problems += _weight_problems(root, checkable, skeleton)
    tok_file = root / manifest["tokenizer"]["file"]
    if tok_file.is_file():
        try:
            tok = load_tokenizer(tok_file, manifest["tokenizer"].get("special_token", SPECIAL_TOKEN))
            if len(tok) != cfg.vocab_size:
                problems.append(f"{tok_file.name}: {len(tok)} tokens, config vocab_size is {cfg.vocab_size}")
        except Exception as exc:  # tokenizers raises plain Exception subclasses for malformed JSON
            problems.append(f"{tok_file.name}: unreadable tokenizer ({exc})")
    return problems


# -- loading ------------------------------------------------------------------------------------------------

def _refuse(root: Path, problems: list[str]) -> None:
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise BundleError(f"{root}: {problems[0]}{more}")


def load_bundle(bundle_dir: str | Path, device: str | torch.device = "cpu") -> Bundle:
    """Check and load a bundle; the model is returned in eval mode on ``device``."""
    root = Path(bundle_dir)
    manifest = read_manifest(root)
    cfg = _config(manifest, root)
    _refuse(root, _file_problems(root, manifest))
    model = CRRGModel.from_config(cfg)
    _refuse(root, _weight_problems(root, manifest, model))
    for module, fname in manifest["weights"].items():
        target = getattr(model, module)
        state = load_file(str(root / fname))
        reference = target.state_dict()
        state = {k: v.to(reference[k].dtype) for k, v in state.items()}
        target.load_state_dict(state, strict=False)  # names and shapes were checked above; tied keys absent
    tok_spec = manifest["tokenizer"]
    try:
        tokenizer = load_tokenizer(root / tok_spec["file"], tok_spec.get("special_token", SPECIAL_TOKEN))
    except Exception as exc:  # tokenizers raises plain Exception subclasses for malformed JSON
        raise BundleError(f"{root / tok_spec['file']}: unreadable tokenizer ({exc})") from None
    if len(tokenizer) != cfg.vocab_size:
        raise BundleError(f"{root / tok_spec['file']}: {len(tokenizer)} tokens, config vocab_size is {cfg.vocab_size}")
    model.to(device).eval()
    return Bundle(root, manifest, cfg, model, tokenizer, logit_thresholds(manifest["thresholds"]))


def logit_thresholds(thresholds: Mapping[str, float]) -> dict[str, float]:
    """The manifest's thresholds as logit thresholds; an older manifest's probability ``p`` becomes
    ``log(p / (1 - p))``, the same rule up to rounding at the boundary."""
    out = dict(DEFAULT_THRESHOLDS)
    for key, value in thresholds.items():
        if key in _PROBABILITY_THRESHOLDS and _PROBABILITY_THRESHOLDS[key] not in thresholds:
            p = float(value)
            if not 0.0 < p < 1.0:
                raise BundleError(f"manifest threshold {key!r} = {p} is not a probability in (0, 1)")
            out[_PROBABILITY_THRESHOLDS[key]] = math.log(p / (1.0 - p))
        elif key in DEFAULT_THRESHOLDS:
            out[key] = float(value)
    return out
