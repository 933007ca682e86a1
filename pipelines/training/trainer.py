"""RGRG's training recipe for the CRRG-CLIP stack, stage by stage, resumable, exported as a bundle.

Stages, in order (each one's optimiser only sees the module it trains):

``detector``  Faster R-CNN on the 29 region boxes (torchvision's RPN + box losses).
``heads``     the region selector and the abnormality classifier, on features of the *detected* boxes
              of the frozen detector (what they will see at inference).
``decoder``   the sentence decoder, teacher-forced on each reported region's sentence, conditioned on that
              region's frozen feature.
``clip``      CLIP contrastive learning on (image, report) pairs.
``labels``    the 14-label linear head on the CLIP image embedding, fine-tuning the image tower with it
              (a frozen tower trained from scratch for a few minutes is too weak a linear probe).

A run directory holds ``settings.json``, ``tokenizer.json``, ``checkpoint.pt`` (model, optimiser, stage,
step: written atomically every ``checkpoint_every`` steps and at every stage end) and ``log.jsonl`` (one
JSON object per logged step). Running again on the same directory resumes where it stopped, at the same
place in the same data order. Each stage stops at its step count or its time budget, whichever comes first;
the learning-rate schedule (linear warm-up, cosine decay) follows whichever is further along, so a
time-limited stage still anneals.

Scale (MIMIC-CXR's 377,000 images): under ``torchrun`` the stage's module is wrapped in
DistributedDataParallel (:mod:`pipelines.training.distributed`: NCCL on GPUs, gloo on CPU). A step is one
*global* batch of ``batch_size`` images drawn, epoch by epoch, from a seeded permutation by a
``DistributedSampler``: each of the ``W`` processes gets ``batch_size / W`` of them, in ``accumulate``
micro-batches whose gradients add up before the (all-reduced) update, so the update is the one a single
process would make on the whole batch for losses that are means over images (the region heads, the label
head; the detector's sampled RPN/RoI losses and CLIP's in-batch negatives are per process). Images either
stream from the source through each process's own ``DataLoader`` workers (``stream``; the default for
MIMIC-CXR, which does not fit in memory) or come from an in-memory cache built once (phantoms). Rank 0 alone
writes the checkpoint, the log and the progress bar. Autocast is bf16 on GPUs (``precision``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import shlex
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from pipelines.bundle import save_bundle
from pipelines.constants import NUM_REGIONS
from pipelines.models import CRRGModel, preset
from pipelines.tokenizer import (
    encode_sentences,
    load_tokenizer,
    save_tokenizer,
    train_bpe,
)
from pipelines.training.data import Batch, ModelInputSet, Sample, collate, parse_dataset
from pipelines.training.distributed import DistContext, init_distributed

log = logging.getLogger(__name__)

STAGES: tuple[str, ...] = ("detector", "heads", "decoder", "clip", "labels")


@dataclass
class StagePlan:
    steps: int
    lr: float
    batch_size: int  # images per step, over all processes
    seconds: float | None = None  # time budget; None = steps only


#: Defaults sized for the ``demo`` preset on one GPU (about 10 minutes in all); override per stage.
DEFAULT_PLANS: dict[str, StagePlan] = {
    "detector": StagePlan(steps=4000, lr=1e-3, batch_size=16),
    "heads": StagePlan(steps=1500, lr=1e-3, batch_size=256),
    "decoder": StagePlan(steps=3000, lr=1e-3, batch_size=48),
    "clip": StagePlan(steps=1000, lr=5e-4, batch_size=64),
    "labels": StagePlan(steps=1500, lr=5e-4, batch_size=64),
}

#: Architecture changes applied on top of a preset for the demo bundle, which the bundle records in its
#: config: small enough to commit (<= 25 MB in fp16) - a 256-wide box head on 5x5 RoIs, a 2-layer decoder,
#: a small ResNet CLIP (trains from scratch far faster than a ViT) whose text tower, needed only for
#: contrastive training, is narrow - and anchor shapes down to the spine's and trachea's 1:10.
DEMO_OVERRIDES: dict[str, Any] = {
    "anchor_aspect_ratios": (0.2, 0.4, 1.0, 2.5, 5.0, 10.0),
    "box_head_dim": 256,
    "roi_output_size": 5,
    "decoder_layers": 2,
    "clip_label_head": True,
    "clip_model": {
        "embed_dim": 128,
        "vision_cfg": {"image_size": 224, "layers": [1, 1, 1, 1], "width": 16},
        "text_cfg": {"context_length": 48, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    },
}


@dataclass
class TrainSettings:
    run_dir: Path
    train_data: str = "phantoms:seed=0,count=4000"
    preset: str = "demo"
    demo_overrides: bool = True
    device: str = "auto"
    workers: int = 2
    seed: int = 0
    vocab_size: int = 512
    plans: dict[str, StagePlan] = field(default_factory=lambda: {k: dataclasses.replace(v)
                                                                  for k, v in DEFAULT_PLANS.items()})
    stages: tuple[str, ...] = STAGES
    checkpoint_every: int = 500
    log_every: int = 25
    progress: bool = True
    #: micro-batches per step on each process (their gradients add up before the update)
    accumulate: int = 1
    #: images stream from the source each step (True), or are cached in memory once (False); None: stream
    #: unless the data are phantoms
    stream: bool | None = None
    #: ``auto`` (bf16 autocast on GPU, fp32 on CPU), ``bf16`` or ``fp32``
    precision: str = "auto"

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["run_dir"] = str(self.run_dir)
        d["stages"] = list(self.stages)
        return d


def parse_stage_values(text: str, convert: Callable[[str], Any]) -> dict[str, Any]:
    """``"detector=3000,heads=500"`` -> ``{"detector": 3000, "heads": 500}``; unknown stages are named."""
    out: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, eq, value = part.partition("=")
        if not eq or name not in STAGES:
            raise ValueError(f"{part!r}: expected STAGE=VALUE with STAGE one of {', '.join(STAGES)}")
        try:
            out[name] = convert(value)
        except ValueError:
            raise ValueError(f"{part!r}: {value!r} is not a valid value") from None
    return out


class Trainer:
    """Owns one run directory: data, tokenizer, model, optimiser state, logs; one process of a run."""

    def __init__(self, settings: TrainSettings) -> None:
        if settings.accumulate < 1:
            raise ValueError("accumulate must be >= 1")
        if settings.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be auto, bf16 or fp32, not {settings.precision!r}")
        self.s = settings
        self.run_dir = Path(settings.run_dir)
        self.dist: DistContext = init_distributed(settings.device)
        self.device = self.dist.device
        self.main = self.dist.is_main
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.dist.barrier()
        self.amp = settings.precision == "bf16" or (settings.precision == "auto" and self.device.type == "cuda")
        _seed_everything(settings.seed)
        self.source = parse_dataset(settings.train_data, preset(settings.preset).image_size)
        self.stream = (not settings.train_data.startswith("phantoms")) if settings.stream is None else settings.stream
        self.checkpoint_path = self.run_dir / "checkpoint.pt"
        self.state: dict[str, Any] = {"done": [], "stage": None, "step": 0, "elapsed": 0.0}
        self.data: Dataset | None = None
        self.features: torch.Tensor | None = None  # cached region features of the frozen detector
        self.log_file = open(self.run_dir / "log.jsonl", "a", buffering=1) if self.main else None

    # -- setup ------------------------------------------------------------------------------------------
    def prepare(self) -> None:
        base = preset(self.s.preset)
        if self.s.demo_overrides:
            base = base.replace(**DEMO_OVERRIDES)
        inputs = ModelInputSet(self.source, base.image_size, base.image_mean, base.image_std)
        self.data = inputs if self.stream else _Cache.build(inputs, self.s.workers, self.s.progress and self.main)
        tok_path = self.run_dir / "tokenizer.json"
        if self.main and not tok_path.is_file():
            save_tokenizer(train_bpe(self._tokenizer_sentences(), vocab_size=self.s.vocab_size), self.run_dir)
        self.dist.barrier()  # every process uses the tokenizer rank 0 trained
        self.tokenizer = load_tokenizer(tok_path)
        special = self.tokenizer.eos_token_id
        self.config = base.replace(vocab_size=len(self.tokenizer), bos_token_id=special, eos_token_id=special,
                                   pad_token_id=special)
        self.model = CRRGModel(self.config).to(self.device)
        if self.checkpoint_path.is_file():
            ckpt = torch.load(self.checkpoint_path, map_location=self.device, weights_only=False)
            if ckpt["config"] != self.config.to_dict():
                raise RuntimeError(f"{self.checkpoint_path}: written for a different model config; use a new run dir")
            self.model.load_state_dict(ckpt["model"])
            self.state = ckpt["state"]
            self._optimizer_state = ckpt.get("optimizer")
            if self.main:
                log.info("resuming %s: stages done %s, %s at step %d", self.run_dir, self.state["done"],
                         self.state["stage"], self.state["step"])
        else:
            self._optimizer_state = None
        if self.main:
            (self.run_dir / "settings.json").write_text(json.dumps(self.s.to_json(), indent=2) + "\n")
            (self.run_dir / "model_config.json").write_text(self.config.to_json() + "\n")

    def _tokenizer_sentences(self) -> list[str]:
        """The region sentences the report BPE is trained on: all of them from a cache; from a streamed
        source, those of up to 20,000 images spread evenly over it (read by the data workers)."""
        if isinstance(self.data, _Cache):
            return [s for sample in self.data.samples for s in sample.sentences if s]
        pick = list(range(0, len(self.data), max(1, len(self.data) // 20_000)))
        loader = DataLoader(torch.utils.data.Subset(self.data, pick), batch_size=32, num_workers=self.s.workers,
                            collate_fn=collate)
        return [s for batch in loader for row in batch.sentences for s in row if s]

    # -- the loop ---------------------------------------------------------------------------------------
    def run(self) -> dict[str, float]:
        """Every stage not yet done; returns the last logged loss of each stage trained now."""
        if self.data is None:
            self.prepare()
        last: dict[str, float] = {}
        for stage in self.s.stages:
            if stage in self.state["done"]:
                continue
            last[stage] = self._run_stage(stage)
            self.state["done"].append(stage)
            self.state.update(stage=None, step=0, elapsed=0.0)
            self._checkpoint(None)
        return last

    def micro_batch(self, plan: StagePlan) -> int:
        """Images per micro-batch on one process: the step's batch over processes and accumulation."""
        parts = self.dist.world * self.s.accumulate
        if plan.batch_size % parts:
            raise ValueError(f"batch size {plan.batch_size} is not a multiple of processes x accumulate "
                             f"({self.dist.world} x {self.s.accumulate})")
        return plan.batch_size // parts

    def _run_stage(self, stage: str) -> float:
        plan = self.s.plans[stage]
        module, step_fn = self._stage_setup(stage)
        opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=plan.lr, weight_decay=1e-4)
        start, elapsed0 = 0, 0.0
        if self.state["stage"] == stage and self._optimizer_state is not None:
            opt.load_state_dict(self._optimizer_state)
            start, elapsed0 = int(self.state["step"]), float(self.state["elapsed"])
        self._optimizer_state = None
        self.state["stage"] = stage
        stepper: torch.nn.Module = _StageStep(module, step_fn)
        if self.dist.distributed:
            stepper = DistributedDataParallel(  # the detector's region projection has no training loss
                stepper, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=stage == "detector")
        batches = self._batches(stage, plan, start)
        warmup = max(1, min(200, plan.steps // 20))
        t0 = time.monotonic() - elapsed0
        loss_value = math.nan
        bar = tqdm(total=plan.steps, initial=start, desc=stage, disable=not (self.s.progress and self.main),
                   dynamic_ncols=True)
        step = start
        for step in range(start, plan.steps):
            elapsed = time.monotonic() - t0
            if plan.seconds is not None and self.dist.any(elapsed >= plan.seconds):
                if self.main:
                    log.info("stage %s: time budget %.0fs reached at step %d", stage, plan.seconds, step)
                break
            progress = max(step / plan.steps, elapsed / plan.seconds if plan.seconds else 0.0)
            lr = plan.lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
            for group in opt.param_groups:
                group["lr"] = lr
            opt.zero_grad(set_to_none=True)
            totals: dict[str, torch.Tensor] = {}
            for k in range(self.s.accumulate):
                indices, batch = next(batches)
                last_micro = k == self.s.accumulate - 1
                sync = nullcontext() if last_micro or not self.dist.distributed else stepper.no_sync()
                with sync:
                    with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                        losses = stepper(indices, batch.to(self.device))
                    (sum(losses.values()) / self.s.accumulate).backward()
                for name, value in losses.items():
                    totals[name] = totals.get(name, 0.0) + value.detach().float() / self.s.accumulate
            torch.nn.utils.clip_grad_norm_(module.parameters(), 5.0)
            opt.step()
            means = {name: float(self.dist.mean(value)) for name, value in totals.items()}
            loss_value = sum(means.values())
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"stage {stage}: loss is {loss_value} at step {step}")
            bar.update(1)
            if step % self.s.log_every == 0 or step == plan.steps - 1:
                bar.set_postfix(loss=f"{loss_value:.4f}")
                self._log(stage=stage, step=step, loss=loss_value, lr=lr, elapsed_s=round(time.monotonic() - t0, 4),
                          **means)
            if (step + 1) % self.s.checkpoint_every == 0:
                self.state.update(step=step + 1, elapsed=time.monotonic() - t0)
                self._checkpoint(opt)
        else:
            step = plan.steps
        bar.close()
        self._log(stage=stage, step=step, loss=loss_value, event="stage_end", elapsed_s=round(time.monotonic() - t0, 4))
        self.state.setdefault("trained_steps", {})[stage] = step
        return loss_value

    def _batches(self, stage: str, plan: StagePlan, start_step: int) -> Iterator[tuple[torch.Tensor, Batch]]:
        """This process's micro-batches from step ``start_step`` on, epoch after epoch: a seeded
        DistributedSampler over the data, so that the data order (and a resumed run's) is the same whatever
        the number of processes."""
        micro = self.micro_batch(plan)
        sampler = _ResumableSampler(self.data, num_replicas=self.dist.world, rank=self.dist.rank, shuffle=True,
                                    seed=self.s.seed * 1_000_003 + STAGES.index(stage), drop_last=True)
        per_epoch = len(sampler) // micro
        if per_epoch == 0:
            raise ValueError(f"stage {stage}: {len(self.data)} images cannot fill a batch of {plan.batch_size}")
        workers = self.s.workers if self.stream else 0
        loader = DataLoader(_Indexed(self.data), batch_size=micro, sampler=sampler, num_workers=workers,
                            collate_fn=_collate_indexed, drop_last=True, pin_memory=self.device.type == "cuda",
                            persistent_workers=workers > 0)
        consumed = start_step * self.s.accumulate
        epoch, skip = divmod(consumed, per_epoch)
        while True:
            sampler.set_epoch(epoch)
            sampler.skip = skip * micro
            yield from loader
            epoch, skip = epoch + 1, 0

    # -- stages -----------------------------------------------------------------------------------------
    def _stage_setup(self, stage: str) -> tuple[torch.nn.Module, Callable[[torch.Tensor, Batch], dict]]:
        m = self.model
        m.eval()
        for p in m.parameters():
            p.requires_grad_(False)
        if stage == "detector":
            self.features = None  # the detector changes: features cached from it are stale
            m.detector.train()
            m.detector.requires_grad_(True)
            return m.detector, self._detector_step
        if stage in ("heads", "decoder"):
            if self.features is None and isinstance(self.data, _Cache):
                self.features = self.data.region_features(m.detector, self.device, self.amp,
                                                          self.s.progress and self.main)
            if stage == "heads":
                heads = torch.nn.ModuleList([m.selector, m.abnormality]).train().requires_grad_(True)
                return heads, self._heads_step
            m.decoder.train().requires_grad_(True)
            return m.decoder, self._decoder_step
        m.clip.train().requires_grad_(True)
        if stage == "clip":
            if m.clip.label_head is not None:
                m.clip.label_head.requires_grad_(False)
            return m.clip, self._clip_step
        m.clip.model.transformer.requires_grad_(False)  # the text tower plays no part in labelling
        m.clip.model.token_embedding.requires_grad_(False)
        return m.clip, self._labels_step

    def _region_features(self, indices: torch.Tensor, batch: Batch) -> torch.Tensor:
        """``[B, 29, D]`` features of the frozen detector: cached, or computed on the streamed images."""
        if self.features is not None:
            return self.features[indices.to(self.features.device)].to(self.device).float()
        with torch.no_grad():
            return self.model.detector(batch.images).features.float()

    def _detector_step(self, indices: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        targets = []
        size = self.config.image_size
        for boxes in batch.boxes.clamp(0, size):
            ok = ~torch.isnan(boxes).any(-1) & (boxes[:, 2] - boxes[:, 0] >= 1) & (boxes[:, 3] - boxes[:, 1] >= 1)
            labels = torch.arange(1, NUM_REGIONS + 1, device=boxes.device)[ok]
            targets.append({"boxes": boxes[ok], "labels": labels})
        return self.model.detector(batch.images, targets)

    def _heads_step(self, indices: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        feats = self._region_features(indices, batch)
        return {
            "selector": F.binary_cross_entropy_with_logits(self.model.selector(feats).float(), batch.selected.float()),
            "abnormality": F.binary_cross_entropy_with_logits(self.model.abnormality(feats).float(),
                                                              batch.abnormal.float()),
        }

    def _decoder_step(self, indices: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        """Teacher forcing on every reported region of the batch's images."""
        pairs = [(b, r) for b, row in enumerate(batch.sentences) for r, s in enumerate(row) if s]
        if not pairs:
            raise ValueError("a decoder batch has no region sentences: the training data report no regions")
        feats = self._region_features(indices, batch)
        rows, regions = (torch.tensor(c, device=feats.device) for c in zip(*pairs))
        ids, mask = encode_sentences(self.tokenizer, [batch.sentences[b][r] for b, r in pairs],
                                     self.config.max_sentence_tokens)
        return {"decoder": self.model.decoder(feats[rows, regions], ids.to(self.device), mask.to(self.device))}

    def _clip_step(self, indices: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        tokens = self.model.clip.tokenize(batch.reports).to(self.device)
        return {"contrastive": self.model.clip.contrastive_loss(batch.images, tokens)}

    def _labels_step(self, indices: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        target = batch.labels.float()
        known = ~torch.isnan(target)
        logits = self.model.clip.label_logits(batch.images).float()
        return {"labels": F.binary_cross_entropy_with_logits(logits[known], target[known])}

    # -- bookkeeping ------------------------------------------------------------------------------------
    def _checkpoint(self, opt: torch.optim.Optimizer | None) -> None:
        """Rank 0 writes (atomically); every process holds the same weights, so one copy is the run's."""
        if self.main:
            tmp = self.checkpoint_path.with_suffix(".tmp")
            torch.save({"model": self.model.state_dict(), "optimizer": opt.state_dict() if opt else None,
                        "state": self.state, "config": self.config.to_dict()}, tmp)
            os.replace(tmp, self.checkpoint_path)
        self.dist.barrier()

    def _log(self, **record: Any) -> None:
        if self.log_file is not None:
            record["time"] = round(time.time(), 3)
            self.log_file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self.log_file is not None:
            self.log_file.close()
        self.dist.close()

    # -- export -----------------------------------------------------------------------------------------
    def reproduce_command(self, name: str, version: str) -> str:
        """The command that retrains this bundle step for step: the steps each stage actually ran (a
        time budget, if one stopped it, is replaced by that count so the command is hardware-independent)."""
        done = self.state.get("trained_steps", {})
        s = self.s
        return shlex.join([
            "pacs-node", "train", "--out", "runs/demo", "--data", s.train_data, "--preset", s.preset,
            *([] if s.demo_overrides else ["--no-demo-overrides"]), "--seed", str(s.seed), "--vocab-size", str(s.vocab_size),
            "--stages", ",".join(s.stages),
            "--steps", ",".join(f"{k}={done.get(k, s.plans[k].steps)}" for k in s.stages),
            "--batch", ",".join(f"{k}={s.plans[k].batch_size}" for k in s.stages),
            "--lr", ",".join(f"{k}={s.plans[k].lr:g}" for k in s.stages),
            "--export", "pipelines/bundles/demo", "--name", name, "--version", version,
        ])

    def export(self, out_dir: str | Path, *, name: str, version: str, intended_use: str | None = None) -> Path:
        """Write the trained model as a bundle (fp16 weights); refuses while stages are unfinished."""
        missing = [s for s in self.s.stages if s not in self.state["done"]]
        if missing:
            raise RuntimeError(f"cannot export {self.run_dir}: stages not finished: {', '.join(missing)}")
        reproduce = self.reproduce_command(name, version)
        training = {
            "data": self.source.describe(),
            "synthetic": self.s.train_data.startswith("phantoms"),
            "trained_on": ("synthetic chest radiograph phantoms (pipelines.phantoms); no patient data"
                           if self.s.train_data.startswith("phantoms") else self.s.train_data),
            "stages": {k: dataclasses.asdict(v) for k, v in self.s.plans.items() if k in self.s.stages},
            "trained_steps": dict(self.state.get("trained_steps", {})),
            "demo_overrides": self.s.demo_overrides,
            "seed": self.s.seed,
            "reproduce": reproduce,
        }
        return save_bundle(
            self.model.cpu(), self.config, out_dir, name=name, version=version, tokenizer=self.tokenizer,
            intended_use=intended_use or (
                "Demonstration and integration testing of the PACS node. Trained only on synthetic phantoms: "
                "its findings say nothing about real patients. Not a medical device; never for diagnosis."),
            clinical_use=False, training=training,
        )


class _StageStep(torch.nn.Module):
    """The trained module and its stage's loss as one module, so that DistributedDataParallel sees the
    forward pass it synchronises gradients for."""

    def __init__(self, trained: torch.nn.Module, step_fn: Callable[[torch.Tensor, Batch], dict]) -> None:
        super().__init__()
        self.trained = trained
        self.step_fn = step_fn

    def forward(self, indices: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        return self.step_fn(indices, batch)


class _ResumableSampler(DistributedSampler):
    """A DistributedSampler that can start an epoch ``skip`` samples in (a resumed step)."""

    skip = 0

    def __iter__(self):
        indices = list(super().__iter__())
        return iter(indices[self.skip:])


class _Indexed(Dataset):
    """Items with their data-set index (cached region features are looked up by it)."""

    def __init__(self, data: Dataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        return i, self.data[i]


def _as_list(items: list) -> list:
    return items


def _collate_indexed(items) -> tuple[torch.Tensor, Batch]:
    return torch.tensor([i for i, _ in items], dtype=torch.long), collate([item for _, item in items])


class _Cache(Dataset):
    """The whole training set as model inputs in memory (fp16) - for data that fit (phantoms) - and, once
    the detector is trained, the frozen region features the heads and the decoder train on."""

    def __init__(self, images: torch.Tensor, boxes: torch.Tensor, samples: list[Sample]) -> None:
        self.images, self.boxes, self.samples = images, boxes, samples

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, Sample]:
        return self.images[i].float(), self.boxes[i], self.samples[i]

    @classmethod
    def build(cls, dataset: ModelInputSet, workers: int, progress: bool) -> _Cache:
        loader = DataLoader(dataset, batch_size=32, num_workers=workers, collate_fn=_as_list, shuffle=False)
        images, boxes, samples = [], [], []
        for part in tqdm(loader, desc="data", disable=not progress, dynamic_ncols=True):
            for image, box, sample in part:
                images.append(image.half())
                boxes.append(box.float())
                samples.append(sample)
        return cls(torch.stack(images), torch.stack(boxes), samples)

    @torch.no_grad()
    def region_features(self, detector, device: torch.device, amp: bool, progress: bool) -> torch.Tensor:
        detector.eval()
        out = []
        for start in tqdm(range(0, len(self), 64), desc="features", disable=not progress, dynamic_ncols=True):
            images = self.images[start:start + 64].to(device).float()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                out.append(detector(images).features.float())
        return torch.cat(out)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def iter_log(run_dir: str | Path) -> Iterator[dict[str, Any]]:
    """The run's JSON-lines log as dicts (for tests and plots)."""
    with open(Path(run_dir) / "log.jsonl") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)
