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
JSON object per logged step). Running again on the same directory resumes where it stopped. Each stage stops
at its step count or its time budget, whichever comes first; the learning-rate schedule (linear warm-up,
cosine decay) follows whichever is further along, so a time-limited stage still anneals.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
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
from pipelines.training.data import ModelInputSet, collate, parse_dataset

log = logging.getLogger(__name__)

STAGES: tuple[str, ...] = ("detector", "heads", "decoder", "clip", "labels")


@dataclass
class StagePlan:
    steps: int
    lr: float
    batch_size: int
    seconds: float | None = None  # time budget; None = steps only


#: Defaults sized for the ``demo`` preset on one GPU (about 10 minutes in all); override per stage.
DEFAULT_PLANS: dict[str, StagePlan] = {
    "detector": StagePlan(steps=4000, lr=1e-3, batch_size=16),
    "heads": StagePlan(steps=1500, lr=1e-3, batch_size=256),
    "decoder": StagePlan(steps=3000, lr=1e-3, batch_size=256),
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
    """Owns one run directory: data cache, tokenizer, model, optimiser state, logs."""

    def __init__(self, settings: TrainSettings) -> None:
        self.s = settings
        self.run_dir = Path(settings.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.device = _device(settings.device)
        self.amp = self.device.type == "cuda"
        _seed_everything(settings.seed)
        self.source = parse_dataset(settings.train_data, preset(settings.preset).image_size)
        self.checkpoint_path = self.run_dir / "checkpoint.pt"
        self.state: dict[str, Any] = {"done": [], "stage": None, "step": 0, "elapsed": 0.0}
        self.cache: _Cache | None = None
        self.log_file = open(self.run_dir / "log.jsonl", "a", buffering=1)

    # -- setup ------------------------------------------------------------------------------------------
    def prepare(self) -> None:
        base = preset(self.s.preset)
        if self.s.demo_overrides:
            base = base.replace(**DEMO_OVERRIDES)
        self.cache = _Cache.build(ModelInputSet(self.source, base.image_size, base.image_mean, base.image_std),
                                  self.s.workers, self.s.progress)
        tok_path = self.run_dir / "tokenizer.json"
        if tok_path.is_file():
            self.tokenizer = load_tokenizer(tok_path)
        else:
            sentences = [s for row in self.cache.sentences for s in row if s]
            self.tokenizer = train_bpe(sentences, vocab_size=self.s.vocab_size)
            save_tokenizer(self.tokenizer, self.run_dir)
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
            log.info("resuming %s: stages done %s, %s at step %d", self.run_dir, self.state["done"],
                     self.state["stage"], self.state["step"])
        else:
            self._optimizer_state = None
        (self.run_dir / "settings.json").write_text(json.dumps(self.s.to_json(), indent=2) + "\n")
        (self.run_dir / "model_config.json").write_text(self.config.to_json() + "\n")

    # -- the loop ---------------------------------------------------------------------------------------
    def run(self) -> dict[str, float]:
        """Every stage not yet done; returns the last logged loss of each stage trained now."""
        if self.cache is None:
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
        warmup = max(1, min(200, plan.steps // 20))
        t0 = time.monotonic() - elapsed0
        loss_value = math.nan
        bar = tqdm(total=plan.steps, initial=start, desc=stage, disable=not self.s.progress, dynamic_ncols=True)
        step = start
        for step in range(start, plan.steps):
            elapsed = time.monotonic() - t0
            if plan.seconds is not None and elapsed >= plan.seconds:
                log.info("stage %s: time budget %.0fs reached at step %d", stage, plan.seconds, step)
                break
            progress = max(step / plan.steps, elapsed / plan.seconds if plan.seconds else 0.0)
            lr = plan.lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
            for group in opt.param_groups:
                group["lr"] = lr
            gen = torch.Generator().manual_seed(self.s.seed * 1_000_003 + STAGES.index(stage) * 10_007 + step)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                losses = step_fn(plan.batch_size, gen)
            loss = sum(losses.values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(module.parameters(), 5.0)
            opt.step()
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"stage {stage}: loss is {loss_value} at step {step}")
            bar.update(1)
            if step % self.s.log_every == 0 or step == plan.steps - 1:
                bar.set_postfix(loss=f"{loss_value:.4f}")
                self._log(stage=stage, step=step, loss=loss_value, lr=lr, elapsed_s=round(time.monotonic() - t0, 2),
                          **{k: float(v.detach()) for k, v in losses.items()})
            if (step + 1) % self.s.checkpoint_every == 0:
                self.state.update(step=step + 1, elapsed=time.monotonic() - t0)
                self._checkpoint(opt)
        else:
            step = plan.steps
        bar.close()
        self._log(stage=stage, step=step, loss=loss_value, event="stage_end", elapsed_s=round(time.monotonic() - t0, 2))
        self.state.setdefault("trained_steps", {})[stage] = step
        return loss_value

    # -- stages -----------------------------------------------------------------------------------------
    def _stage_setup(self, stage: str) -> tuple[torch.nn.Module, Callable[[int, torch.Generator], dict]]:
        m, c = self.model, self.cache
        assert c is not None
        m.eval()
        for p in m.parameters():
            p.requires_grad_(False)
        if stage == "detector":
            m.detector.train()
            m.detector.requires_grad_(True)
            return m.detector, self._detector_step
        if stage in ("heads", "decoder"):
            c.ensure_features(m.detector, self.device, self.amp, self.s.progress)
            if stage == "heads":
                heads = torch.nn.ModuleList([m.selector, m.abnormality]).train().requires_grad_(True)
                return heads, self._heads_step
            m.decoder.train().requires_grad_(True)
            c.ensure_sentence_index()
            return m.decoder, self._decoder_step
        m.clip.train().requires_grad_(True)
        if stage == "clip":
            if m.clip.label_head is not None:
                m.clip.label_head.requires_grad_(False)
            return m.clip, self._clip_step
        m.clip.model.transformer.requires_grad_(False)  # the text tower plays no part in labelling
        m.clip.model.token_embedding.requires_grad_(False)
        return m.clip, self._labels_step

    def _batch_images(self, idx: torch.Tensor) -> torch.Tensor:
        return self.cache.images[idx].to(self.device, non_blocking=True).float()

    def _detector_step(self, batch: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
        c = self.cache
        idx = torch.randint(len(c), (batch,), generator=gen)
        images = self._batch_images(idx)
        targets = []
        size = self.config.image_size
        for i in idx.tolist():
            boxes = c.boxes[i].clamp(0, size)
            ok = ~torch.isnan(boxes).any(-1) & (boxes[:, 2] - boxes[:, 0] >= 1) & (boxes[:, 3] - boxes[:, 1] >= 1)
            labels = torch.arange(1, NUM_REGIONS + 1)[ok]
            targets.append({"boxes": boxes[ok].to(self.device), "labels": labels.to(self.device)})
        return self.model.detector(images, targets)

    def _heads_step(self, batch: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
        c = self.cache
        idx = torch.randint(len(c), (batch,), generator=gen)
        feats = c.features[idx.to(c.features.device)].to(self.device).float()
        sel_t = c.selected[idx].to(self.device).float()
        abn_t = c.abnormal[idx].to(self.device).float()
        return {
            "selector": F.binary_cross_entropy_with_logits(self.model.selector(feats).float(), sel_t),
            "abnormality": F.binary_cross_entropy_with_logits(self.model.abnormality(feats).float(), abn_t),
        }

    def _decoder_step(self, batch: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
        c = self.cache
        pick = torch.randint(len(c.pairs), (batch,), generator=gen)
        pairs = c.pairs[pick]
        feats = c.features[pairs[:, 0].to(c.features.device), pairs[:, 1].to(c.features.device)].to(self.device).float()
        sentences = [c.sentences[i][r] for i, r in pairs.tolist()]
        ids, mask = encode_sentences(self.tokenizer, sentences, self.config.max_sentence_tokens)
        return {"decoder": self.model.decoder(feats, ids.to(self.device), mask.to(self.device))}

    def _clip_step(self, batch: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
        c = self.cache
        idx = torch.randint(len(c), (batch,), generator=gen)
        tokens = self.model.clip.tokenize([c.reports[i] for i in idx.tolist()]).to(self.device)
        return {"contrastive": self.model.clip.contrastive_loss(self._batch_images(idx), tokens)}

    def _labels_step(self, batch: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
        c = self.cache
        idx = torch.randint(len(c), (batch,), generator=gen)
        target = c.labels[idx].to(self.device)
        known = ~torch.isnan(target)
        logits = self.model.clip.label_logits(self._batch_images(idx)).float()
        loss = F.binary_cross_entropy_with_logits(logits[known], target[known])
        return {"labels": loss}

    # -- bookkeeping ------------------------------------------------------------------------------------
    def _checkpoint(self, opt: torch.optim.Optimizer | None) -> None:
        tmp = self.checkpoint_path.with_suffix(".tmp")
        torch.save({"model": self.model.state_dict(), "optimizer": opt.state_dict() if opt else None,
                    "state": self.state, "config": self.config.to_dict()}, tmp)
        os.replace(tmp, self.checkpoint_path)

    def _log(self, **record: Any) -> None:
        record["time"] = round(time.time(), 3)
        self.log_file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self.log_file.close()

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


class _Cache:
    """The whole training set as model inputs in memory (fp16), plus, once the detector is trained, the
    frozen region features the heads and the decoder train on."""

    def __init__(self, images, boxes, selected, abnormal, labels, sentences, reports) -> None:
        self.images, self.boxes, self.selected, self.abnormal = images, boxes, selected, abnormal
        self.labels, self.sentences, self.reports = labels, sentences, reports
        self.features: torch.Tensor | None = None
        self.pairs: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.images.shape[0]

    @classmethod
    def build(cls, dataset: ModelInputSet, workers: int, progress: bool) -> _Cache:
        loader = torch.utils.data.DataLoader(dataset, batch_size=32, num_workers=workers, collate_fn=collate,
                                             shuffle=False, persistent_workers=False)
        parts = [b for b in tqdm(loader, desc="data", disable=not progress, dynamic_ncols=True)]
        return cls(
            images=torch.cat([b.images for b in parts]).half(),
            boxes=torch.cat([b.boxes for b in parts]).float(),
            selected=torch.cat([b.selected for b in parts]),
            abnormal=torch.cat([b.abnormal for b in parts]),
            labels=torch.cat([b.labels for b in parts]).float(),
            sentences=[s for b in parts for s in b.sentences],
            reports=[r for b in parts for r in b.reports],
        )

    @torch.no_grad()
    def ensure_features(self, detector, device: torch.device, amp: bool, progress: bool) -> None:
        if self.features is not None:
            return
        detector.eval()
        out = []
        for start in tqdm(range(0, len(self), 64), desc="features", disable=not progress, dynamic_ncols=True):
            images = self.images[start:start + 64].to(device).float()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                out.append(detector(images).features.float())
        self.features = torch.cat(out)

    def ensure_sentence_index(self) -> None:
        if self.pairs is None:
            pairs = [(i, r) for i, row in enumerate(self.sentences) for r, s in enumerate(row) if s]
            if not pairs:
                raise ValueError("the training data has no region sentences: nothing to train the decoder on")
            self.pairs = torch.tensor(pairs, dtype=torch.long)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    return dev


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
