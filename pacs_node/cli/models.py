"""``pacs-node models``: inspect, verify and import model bundles.

Exit codes as the rest of the CLI: 0 success, 1 the bundle is bad or the import failed, 2 usage.
The model stack (torch) is imported inside the commands so that the rest of the CLI starts fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, NoReturn, Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="Inspect, verify and import model bundles.", no_args_is_help=True)

out = Console()
err = Console(stderr=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
BundleArg = Annotated[Path, typer.Argument(help="Model bundle directory (holds manifest.json).")]


def _fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[red]error:[/red] {message}", highlight=False, markup=True)
    raise typer.Exit(code)


@app.command()
def show(path: BundleArg, as_json: JsonOpt = False) -> None:
    """What a bundle is: name, version, preset, intended use, clinical use, files."""
    from pipelines.bundle import BundleError, bundle_views, read_manifest

    try:
        manifest = read_manifest(path)
    except BundleError as exc:
        _fail(str(exc))
    summary = {
        "name": manifest["name"],
        "version": manifest["version"],
        "preset": manifest["preset"],
        "clinical_use": manifest["clinical_use"],
        "intended_use": manifest["intended_use"],
        "image_size": manifest["config"].get("image_size"),
        "decoding": manifest["decoding"],
        "thresholds": manifest["thresholds"],
        "views": list(bundle_views(manifest)),
        "gate": manifest.get("gate"),
        "training": manifest.get("training", {}),
        "files": {f: (path / f).stat().st_size if (path / f).is_file() else None for f in manifest["files"]},
    }
    if as_json:
        out.print_json(json.dumps(summary))
        return
    table = Table(title=f"model bundle {path}", show_header=False)
    for key in ("name", "version", "preset", "clinical_use", "intended_use", "image_size", "decoding",
                "thresholds", "views", "training"):
        table.add_row(key, str(summary[key]))
    gate = summary["gate"]
    if gate is None:
        table.add_row("content gate", "none (pacs-node models calibrate BUNDLE DATASET fits one)")
    else:
        ev = gate.get("evaluation", {})
        table.add_row("content gate", f"{gate['score']}; threshold {gate['threshold']} "
                                      f"({gate.get('margin', 1.0)} x the {gate['percentile']}th percentile of "
                                      f"{gate['fitted_on']['calibration']} calibration images)")
        table.add_row("gate: held-out in-distribution accepted",
                      f"{ev.get('held_out_accepted', 0):.1%} of {gate['fitted_on']['held_out']}")
        table.add_row("gate: non-chest rejected", f"{ev.get('non_chest_rejected', 0):.1%} of "
                                                  f"{ev.get('non_chest_count')} ({ev.get('non_chest_rejected_by_kind')})")
    for fname, size in summary["files"].items():
        table.add_row(fname, "MISSING" if size is None else f"{size:,} bytes")
    out.print(table)


@app.command()
def verify(path: BundleArg, as_json: JsonOpt = False) -> None:
    """Check manifest, checksums, tensor names and shapes; exit 1 listing every problem."""
    from pipelines.bundle import verify_bundle

    problems = verify_bundle(path)
    if as_json:
        out.print_json(json.dumps({"bundle": str(path), "ok": not problems, "problems": problems}))
    elif problems:
        for problem in problems:
            err.print(f"[red]problem:[/red] {problem}", highlight=False, markup=True)
    else:
        out.print(f"{path}: OK", highlight=False)
    if problems:
        raise typer.Exit(1)


@app.command()
def calibrate(
    path: BundleArg,
    dataset: Annotated[Path, typer.Argument(help="Directory of in-distribution images (.dcm or grayscale .png).",
                                            exists=True, file_okay=False)],
    percentile: Annotated[float, typer.Option(help="Threshold: this percentile of the calibration images' "
                                                   "scores.")] = 99.9,
    shrinkage: Annotated[float, typer.Option(help="Covariance shrinkage towards its mean variance (0..1].")] = 0.5,
    margin: Annotated[float, typer.Option(help="Threshold = margin x the percentile (>= 1).")] = 1.25,
    as_json: JsonOpt = False,
) -> None:
    """Fit the bundle's content gate on DATASET (60% fit, 20% calibrate the threshold, 20% held out) and
    measure it on held-out images and a generated non-chest set; the manifest records both rates."""
    from pipelines.bundle import BundleError
    from pipelines.calibrate import calibrate_bundle

    try:
        section = calibrate_bundle(path, dataset, percentile=percentile, shrinkage=shrinkage, margin=margin)
    except (BundleError, ValueError, OSError) as exc:
        _fail(str(exc))
    if as_json:
        out.print_json(json.dumps(section))
        return
    ev = section["evaluation"]
    out.print(f"{path}: gate threshold {section['threshold']}; held-out in-distribution accepted "
              f"{ev['held_out_accepted']:.1%}, non-chest rejected {ev['non_chest_rejected']:.1%} "
              f"of {ev['non_chest_count']}", highlight=False)


@app.command("import-rgrg")
def import_rgrg(
    checkpoint: Annotated[Path, typer.Argument(help="RGRG full-model checkpoint (.pt).", exists=True,
                                               dir_okay=False)],
    out_dir: Annotated[Path, typer.Argument(help="New bundle directory.")],
    vocab: Annotated[Path, typer.Option(help="GPT-2 BPE vocab.json.", exists=True, dir_okay=False)],
    merges: Annotated[Path, typer.Option(help="GPT-2 BPE merges.txt.", exists=True, dir_okay=False)],
    name: Annotated[str, typer.Option(help="Bundle name.")] = "rgrg-import",
    version: Annotated[str, typer.Option(help="Bundle version.")] = "1",
    clip_weights: Annotated[Optional[Path], typer.Option(
        help="Optional open_clip ViT-B-16 state dict (.safetensors or .pt); random CLIP weights otherwise.",
        exists=True, dir_okay=False)] = None,
    fp32: Annotated[bool, typer.Option("--fp32", help="Store float32 weights (default float16).")] = False,
) -> None:
    """Convert an RGRG checkpoint into a paper-preset bundle."""
    import torch

    from pipelines.bundle import BundleError
    from pipelines.importers.rgrg import RGRGImportError
    from pipelines.importers.rgrg import import_rgrg as run_import

    clip_state = None
    if clip_weights is not None:
        if clip_weights.suffix == ".safetensors":
            from safetensors.torch import load_file

            clip_state = load_file(str(clip_weights))
        else:
            clip_state = torch.load(str(clip_weights), map_location="cpu", weights_only=True)
    try:
        bundle = run_import(checkpoint, out_dir, vocab_json=vocab, merges_txt=merges, name=name, version=version,
                            clip_state=clip_state, dtype=torch.float32 if fp32 else torch.float16)
    except (RGRGImportError, BundleError, RuntimeError, OSError) as exc:
        _fail(str(exc))
    out.print(f"wrote bundle {bundle}", highlight=False)
