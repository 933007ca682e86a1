"""Command line for training, evaluation and phantoms: ``python -m pipelines.training ...``, and the same
commands under ``pacs-node`` (``pacs_node/cli/training.py`` registers these functions). Only typer is
imported at module level: the model stack loads when a command runs, so the node's CLI stays fast."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import typer

#: stage names, spelled out here so that building the CLI does not import torch (see trainer.STAGES)
STAGES = ("detector", "heads", "decoder", "clip", "labels")

app = typer.Typer(help="Train and evaluate CRRG-CLIP bundles; write synthetic phantoms.", no_args_is_help=True)
phantoms_app = typer.Typer(help="Synthetic chest radiograph phantoms (marked synthetic).", no_args_is_help=True)
app.add_typer(phantoms_app, name="phantoms")


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


@app.command()
def train(
    out: Path = typer.Option(..., "--out", help="Run directory: checkpoints, log.jsonl; resumes if it exists."),
    data: str = typer.Option("phantoms:seed=0,count=4000", "--data",
                             help="Training data: phantoms:seed=S,count=N or mimic:ROOT[,split=train]."),
    preset: str = typer.Option("demo", help="Model preset: paper, demo or tiny."),
    demo_overrides: bool = typer.Option(True, help="Apply DEMO_OVERRIDES (compact, phantom-fit architecture)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    workers: int = typer.Option(2, help="Processes preparing the data."),
    seed: int = typer.Option(0, help="Random seed of the run."),
    steps: str = typer.Option("", help="Per-stage steps, e.g. detector=3000,heads=1000."),
    seconds: str = typer.Option("", help="Per-stage time budgets in seconds, e.g. detector=240."),
    batch: str = typer.Option("", help="Per-stage batch sizes, e.g. detector=16,clip=64."),
    lr: str = typer.Option("", help="Per-stage learning rates, e.g. detector=1e-3."),
    stages: str = typer.Option(",".join(STAGES), help="Stages to run, in order."),
    vocab_size: int = typer.Option(512, help="Size of the report BPE trained on the training sentences."),
    export: Path | None = typer.Option(None, help="Write the bundle here when all stages are done."),
    name: str = typer.Option("crrg-clip-demo", help="Bundle name."),
    version: str = typer.Option("1.0.0", help="Bundle version."),
    quiet: bool = typer.Option(False, help="No progress bars."),
    accumulate: int = typer.Option(1, min=1, help="Micro-batches per step on each process (gradient accumulation)."),
    stream: bool | None = typer.Option(None, "--stream/--cache",
                                       help="Stream images through the data workers each step, or cache them in "
                                            "memory once (default: stream unless the data are phantoms)."),
    precision: str = typer.Option("auto", help="auto (bf16 autocast on GPU), bf16 or fp32."),
    log_every: int = typer.Option(25, min=1, help="Log (and show) the loss every N steps."),
    checkpoint_every: int = typer.Option(500, min=1, help="Write the checkpoint every N steps."),
) -> None:
    """Train (or resume) every stage, optionally export the bundle.

    On N GPUs (or N CPU processes): ``torchrun --nproc_per_node=N -m pacs_node train ...``; the batch sizes
    are global (split over the processes and ``--accumulate``), rank 0 writes checkpoints, log and bundle."""
    from pipelines.training.trainer import Trainer, TrainSettings, parse_stage_values

    rank = int(os.environ.get("RANK", "0"))  # under torchrun only rank 0 talks
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = TrainSettings(run_dir=out, train_data=data, preset=preset, demo_overrides=demo_overrides, device=device,
                                 workers=workers, seed=seed, vocab_size=vocab_size, progress=not quiet,
                                 accumulate=accumulate, stream=stream, precision=precision, log_every=log_every,
                                 checkpoint_every=checkpoint_every)
        chosen = tuple(s.strip() for s in stages.split(",") if s.strip())
        unknown = [s for s in chosen if s not in STAGES]
        if unknown:
            _fail(f"--stages: unknown stage(s) {', '.join(unknown)}; choose from {', '.join(STAGES)}")
        settings.stages = chosen
        for option, text, convert, attr in (("--steps", steps, int, "steps"), ("--seconds", seconds, float, "seconds"),
                                            ("--batch", batch, int, "batch_size"), ("--lr", lr, float, "lr")):
            for stage, value in parse_stage_values(text, convert).items():
                setattr(settings.plans[stage], attr, value)
    except (ValueError, KeyError) as exc:
        _fail(str(exc))
    try:
        trainer = Trainer(settings)
    except ValueError as exc:
        _fail(str(exc))
    try:
        trainer.prepare()
        losses = trainer.run()
        if trainer.main:
            typer.echo(json.dumps({"final_loss": losses}))
            if export is not None:
                path = trainer.export(export, name=name, version=version)
                typer.echo(f"bundle written: {path}")
    except ValueError as exc:
        _fail(str(exc))
    finally:
        trainer.close()


@app.command()
def evaluate(
    bundle: Path = typer.Argument(..., help="Bundle directory."),
    dataset: str = typer.Argument(..., help="phantoms:seed=S,count=N[,size=P] or a MIMIC-layout directory."),
    out: Path = typer.Option(Path("evaluation"), "--out", help="Where metrics.json and the plots go."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    batch_size: int = typer.Option(8, help="Images per inference batch."),
    examples: int = typer.Option(4, help="Images drawn with boxes and sentences."),
    meteor: bool = typer.Option(True, help="Compute METEOR (needs Java)."),
) -> None:
    """Run a bundle over a data set through the node's own inference path and score it."""
    from pipelines.bundle import BundleError
    from pipelines.evaluation.evaluate import evaluate_bundle

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        metrics = evaluate_bundle(bundle, dataset, out, device=device, batch_size=batch_size, examples=examples,
                                  meteor=meteor)
    except (ValueError, BundleError) as exc:
        _fail(str(exc))
    typer.echo(json.dumps(metrics["summary"], indent=2))


@phantoms_app.command("write")
def phantoms_write(
    count: int = typer.Option(..., "--count", min=1, help="How many phantoms."),
    out: Path = typer.Option(..., "--out", help="Directory for the .dcm files."),
    size: int = typer.Option(2500, help="Rows of each image (columns are 85-100% of that)."),
    seed: int = typer.Option(0, help="First seed; phantom i uses seed + i."),
    modality: str = typer.Option("CR", help="CR or DX."),
    photometric: str = typer.Option("MONOCHROME1", help="MONOCHROME1 or MONOCHROME2."),
    bits: int = typer.Option(12, help="Bits stored, 12..16."),
    encoding: str = typer.Option("explicit", help="explicit, j2k-lossless or j2k-lossy."),
) -> None:
    """Write synthetic chest radiographs as DICOM files (PatientName PHANTOM^<seed>)."""
    from pipelines.phantoms.dicom import write_phantom_dicom

    out.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        try:
            ds = write_phantom_dicom(out / f"phantom-{seed + i:06d}.dcm", seed + i, size, modality=modality,
                                     photometric=photometric, bits_stored=bits, encoding=encoding)
        except ValueError as exc:
            _fail(str(exc))
        typer.echo(f"{out / f'phantom-{seed + i:06d}.dcm'}  {ds.Rows}x{ds.Columns}  {ds.SOPInstanceUID}")
