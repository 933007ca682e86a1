"""``pacs-node models``: inspect, verify, import, compose and run model bundles.

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

app = typer.Typer(help="Inspect, verify, import, compose and run model bundles.", no_args_is_help=True)

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


def _floats(text: Optional[str], option: str) -> Optional[tuple[float, ...]]:
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        _fail(f"{option} {text!r}: expected three comma-separated numbers", 2)
    if len(values) != 3:
        _fail(f"{option} {text!r}: expected three comma-separated numbers (R,G,B)", 2)
    return values


@app.command("import-clip")
def import_clip(
    checkpoint: Annotated[Path, typer.Argument(help="CLIP checkpoint (.pt/.bin/.pth/.safetensors).", exists=True,
                                               dir_okay=False)],
    fmt: Annotated[str, typer.Option("--format", help="openai (OpenAI-CLIP state dict, e.g. CheXzero) or "
                                                      "open_clip.")],
    into: Annotated[Path, typer.Option("--into", help="Bundle whose regions half (detector, classifiers, "
                                                      "decoder) the new bundle keeps.")],
    out_dir: Annotated[Path, typer.Option("--out", help="New bundle directory.")],
    model: Annotated[Optional[str], typer.Option(help="open_clip model name or .json model config "
                                                      "(needed for --format open_clip).")] = None,
    scheme: Annotated[Optional[str], typer.Option(help="Preprocessing and prompts: chexzero (default for openai) "
                                                       "or open_clip (default for open_clip).")] = None,
    positive: Annotated[Optional[str], typer.Option(help="Positive prompt template, e.g. '{}'.")] = None,
    negative: Annotated[Optional[str], typer.Option(help="Negative prompt template, e.g. 'no {}'.")] = None,
    logit_scale: Annotated[Optional[bool], typer.Option("--logit-scale/--no-logit-scale",
                                                        help="Scale cosines by the learned logit scale "
                                                             "(default: open_clip yes, chexzero no).")] = None,
    mean: Annotated[Optional[str], typer.Option(help="Image mean R,G,B on the scheme's scale.")] = None,
    std: Annotated[Optional[str], typer.Option(help="Image std R,G,B on the scheme's scale.")] = None,
    fp16: Annotated[bool, typer.Option("--fp16", help="Store float16 (default: the checkpoint's precision).")] = False,
    name: Annotated[Optional[str], typer.Option(help="Bundle name (default BUNDLE+CHECKPOINT).")] = None,
    version: Annotated[Optional[str], typer.Option(help="Bundle version (default the regions bundle's).")] = None,
) -> None:
    """Put a published CLIP checkpoint into a bundle as its CLIP half, with its own preprocessing, tokenizer
    and zero-shot prompt scheme."""
    import torch

    from pipelines.bundle import BundleError
    from pipelines.compose import compose_bundle
    from pipelines.importers.clip import ClipImportError
    from pipelines.importers.clip import import_clip as read_clip

    if (positive is None) != (negative is None):
        _fail("--positive and --negative go together", 2)
    templates = (positive, negative) if positive is not None and negative is not None else None
    try:
        half = read_clip(checkpoint, fmt, model=model, scheme=scheme, templates=templates, logit_scale=logit_scale,
                         mean=_floats(mean, "--mean"), std=_floats(std, "--std"),
                         dtype=torch.float16 if fp16 else None)
        bundle = compose_bundle(into, half, out_dir, name=name, version=version)
    except (ClipImportError, BundleError, OSError) as exc:
        _fail(str(exc))
    out.print(f"wrote bundle {bundle}", highlight=False)


@app.command()
def compose(
    regions: Annotated[Path, typer.Option("--regions", help="Bundle giving detector, classifiers, decoder.")],
    clip: Annotated[Path, typer.Option("--clip", help="Bundle giving the CLIP classifier.")],
    out_dir: Annotated[Path, typer.Option("--out", help="New bundle directory.")],
    name: Annotated[Optional[str], typer.Option(help="Bundle name (default REGIONS+CLIP).")] = None,
    version: Annotated[Optional[str], typer.Option(help="Bundle version (default the regions bundle's).")] = None,
) -> None:
    """Combine the regions half of one bundle with the CLIP half of another (checksums recomputed)."""
    from pipelines.bundle import BundleError
    from pipelines.compose import compose_bundle

    try:
        bundle = compose_bundle(regions, clip, out_dir, name=name, version=version)
    except (BundleError, OSError) as exc:
        _fail(str(exc))
    out.print(f"wrote bundle {bundle}", highlight=False)


@app.command()
def run(
    path: BundleArg,
    dicom_file: Annotated[Path, typer.Argument(help="A chest radiograph (.dcm).", exists=True, dir_okay=False)],
    as_json: JsonOpt = False,
    png: Annotated[Optional[Path], typer.Option("--png", help="Also draw boxes and sentences into this PNG.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
) -> None:
    """One image through a bundle, without a node: regions, selections, sentences, report, probabilities."""
    from pipelines.bundle import BundleError
    from pipelines.inspection import InspectionError, analyse_file, draw_result, result_json

    try:
        result, unit = analyse_file(path, dicom_file, device)
        if png is not None:
            draw_result(result, unit, png)
    except (BundleError, InspectionError, ValueError, OSError) as exc:
        _fail(str(exc))
    if as_json:
        out.print_json(json.dumps(result_json(result)))
    else:
        _print_result(result)
    if png is not None:
        err.print(f"wrote {png}", highlight=False)


def _print_result(result) -> None:
    head = f"{result.model_name} {result.model_version}"
    if not result.clinical_use:
        head += "  [red](not for clinical use)[/red]"
    out.print(head)
    table = Table(title="regions", title_justify="left")
    for column in ("#", "region", "detected", "p abnormal", "box x1, y1, x2, y2"):
        table.add_column(column)
    numbered = 0
    for r in result.regions:
        numbered += r.selected
        table.add_row(str(numbered) if r.selected else "", r.name, "yes" if r.detected else "no",
                      f"{r.abnormal_prob:.2f}", ", ".join(f"{v:.0f}" for v in r.box))
    out.print(table)
    out.print("[bold]sentences[/bold] (the regions numbered above were selected)")
    for n, r in enumerate(result.selected_regions, start=1):
        out.print(f"  {n}. {r.name}: {r.sentence or '(empty)'}", highlight=False)
    out.print(f"[bold]report:[/bold] {result.report or '(empty)'}", highlight=False)
    labels = Table(title="CheXpert label probabilities", title_justify="left")
    labels.add_column("label")
    labels.add_column("probability", justify="right")
    for label, prob in sorted(result.label_probs.items(), key=lambda kv: -kv[1]):
        labels.add_row(label, f"{prob:.3f}")
    out.print(labels)
