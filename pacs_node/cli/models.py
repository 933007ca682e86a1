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
    from pipelines.bundle import BundleError, read_manifest

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
        "training": manifest.get("training", {}),
        "files": {f: (path / f).stat().st_size if (path / f).is_file() else None for f in manifest["files"]},
    }
    if as_json:
        out.print_json(json.dumps(summary))
        return
    table = Table(title=f"model bundle {path}", show_header=False)
    for key in ("name", "version", "preset", "clinical_use", "intended_use", "image_size", "decoding",
                "thresholds", "training"):
        table.add_row(key, str(summary[key]))
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
    dtype: Annotated[str, typer.Option(
        help="Stored precision: keep (the checkpoint's own), float32, float16 or bfloat16.")] = "keep",
    gpt2_config: Annotated[Optional[Path], typer.Option(
        help="config.json of RGRG's GPT-2 (healx/gpt-2-pubmed-medium): checked against what the decoder computes.",
        exists=True, dir_okay=False)] = None,
    spacy_model: Annotated[Optional[Path], typer.Option(
        help="Local en_core_web_trf directory: RGRG's sentence splitter, copied into the bundle.",
        exists=True, file_okay=False)] = None,
    bertscore_model: Annotated[Optional[Path], typer.Option(
        help="Local distilbert-base-uncased directory: RGRG's BERTScore de-duplication, copied into the bundle.",
        exists=True, file_okay=False)] = None,
) -> None:
    """Convert an RGRG checkpoint into a paper-preset bundle."""
    import json

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
    dtypes = {"keep": None, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in dtypes:
        _fail(f"--dtype must be one of {', '.join(dtypes)}, not {dtype!r}")
    try:
        gpt2 = json.loads(gpt2_config.read_text()) if gpt2_config is not None else None
        bundle = run_import(checkpoint, out_dir, vocab_json=vocab, merges_txt=merges, name=name, version=version,
                            clip_state=clip_state, dtype=dtypes[dtype], gpt2_config=gpt2, spacy_dir=spacy_model,
                            bertscore_dir=bertscore_model)
    except (RGRGImportError, BundleError, RuntimeError, OSError, ValueError) as exc:
        _fail(str(exc))
    manifest = json.loads((bundle / "manifest.json").read_text())
    report = manifest["report"]
    out.print(f"wrote bundle {bundle}: weights {manifest['training']['precision']}; sentences split by "
              f"{report['sentence_splitter']['kind']}, near-duplicates by {report['similarity']['kind']}",
              highlight=False)
