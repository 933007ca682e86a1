"""One bundle from two halves: the regions half (detector, region classifiers, decoder, tokenizer) of one
bundle and the CLIP half of another bundle or of an imported checkpoint
(:class:`pipelines.importers.clip.ClipHalf`).

The new bundle's config is the regions bundle's with the CLIP fields (``CLIP_FIELDS``) replaced; its files
are copied (or, for an imported CLIP, written) and their checksums recomputed; its manifest says where each
half came from (``sources``) and is only written once the result verifies. ``clinical_use`` holds only if
both halves are cleared for it; an imported checkpoint never is.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from pipelines.bundle import MANIFEST, BundleError, read_manifest, sha256_file, verify_bundle, write_manifest
from pipelines.importers.clip import ClipHalf
from pipelines.models.config import CLIP_FIELDS, ConfigError, ModelConfig


def _sound(bundle_dir: Path) -> dict[str, Any]:
    problems = verify_bundle(bundle_dir)
    if problems:
        raise BundleError(f"{bundle_dir}: {problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    return read_manifest(bundle_dir)


def _origin(bundle_dir: Path, manifest: dict[str, Any], files: list[str]) -> dict[str, Any]:
    return {"bundle": manifest["name"], "version": manifest["version"], "path": str(bundle_dir),
            "files": {f: manifest["files"][f] for f in files}, "training": manifest.get("training", {})}


def compose_bundle(regions_dir: str | Path, clip: str | Path | ClipHalf, out_dir: str | Path, *,
                   name: str | None = None, version: str | None = None) -> Path:
    """Write the combined bundle into ``out_dir`` (must not hold a manifest); returns its path."""
    regions_dir, out = Path(regions_dir), Path(out_dir)
    if (out / MANIFEST).exists():
        raise BundleError(f"{out / MANIFEST} already exists: refusing to overwrite a bundle")
    regions = _sound(regions_dir)
    clip_file = regions["weights"]["clip"]
    if isinstance(clip, ClipHalf):
        clip_config, clip_source, clip_clinical = clip.config, {"import": clip.source}, False
        clip_label = Path(clip.source["checkpoint"]).stem
    else:
        clip_dir = Path(clip)
        other = _sound(clip_dir)
        clip_config = {k: other["config"][k] for k in CLIP_FIELDS if k in other["config"]}
        clip_source = _origin(clip_dir, other, [other["weights"]["clip"]])
        clip_source.update({k: other[k] for k in ("clip",) if k in other})
        clip_clinical = bool(other["clinical_use"])
        clip_label = other["name"]
    try:
        config = ModelConfig.from_dict({**regions["config"], **clip_config})
    except ConfigError as exc:
        raise BundleError(f"the combined config is invalid: {exc}") from None
    out.mkdir(parents=True, exist_ok=True)
    region_files = [f for m, f in regions["weights"].items() if m != "clip"] + [regions["tokenizer"]["file"]]
    for fname in region_files:
        shutil.copyfile(regions_dir / fname, out / fname)
    if isinstance(clip, ClipHalf):
        save_file(clip.state, str(out / clip_file), metadata={"module": "clip", "source": clip.source["checkpoint"]})
    else:
        shutil.copyfile(Path(clip) / other["weights"]["clip"], out / clip_file)
    manifest = dict(regions)
    manifest.update(
        name=name or f"{regions['name']}+{clip_label}",
        version=version or regions["version"],
        config=config.to_dict(),
        clinical_use=bool(regions["clinical_use"]) and clip_clinical,
        files={f: sha256_file(out / f) for f in [*region_files, clip_file]},
        sources={"regions": _origin(regions_dir, regions, region_files), "clip": clip_source},
    )
    if isinstance(clip, ClipHalf):
        manifest["clip"] = clip.source
    elif "clip" in other:
        manifest["clip"] = other["clip"]
    else:
        manifest.pop("clip", None)
    manifest.pop("weights_dtype", None)
    write_manifest(out, manifest)
    problems = verify_bundle(out)
    if problems:
        (out / MANIFEST).unlink()
        raise BundleError(f"{out}: the combined bundle does not verify: {problems[0]}")
    return out
