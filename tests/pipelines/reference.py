"""The test oracle of :meth:`pipelines.engine.Engine.infer`: the same arithmetic done naively, one image and one
region at a time with the stock modules, so that the batched composition is checked against something that
cannot share its batching mistakes."""

from __future__ import annotations

import torch
from torch.nn.utils.rnn import pad_sequence

from pipelines.constants import NUM_REGIONS
from pipelines.engine import Engine
from pipelines.outputs import RawOutput


@torch.inference_mode()
def infer_reference(engine: Engine, images: torch.Tensor) -> RawOutput:
    """:class:`RawOutput` for ``images[B,1,S,S]``, image by image and selected region by selected region."""
    parts = [_one_image(engine, images[i:i + 1]) for i in range(images.shape[0])]
    sentences = [s for *_, image_sentences in parts for s in image_sentences]
    token_ids = (pad_sequence(sentences, batch_first=True, padding_value=engine.cfg.pad_token_id) if sentences
                 else torch.empty((0, 0), dtype=torch.long, device=images.device))
    boxes, detected, selected, abnormal_probs, label_probs, abnormal = (
        torch.cat(column) for column in zip(*(p[:6] for p in parts)))
    return RawOutput(boxes, detected, selected, abnormal_probs, token_ids, label_probs, abnormal)


def _one_image(engine: Engine, image: torch.Tensor):
    m = engine.model
    with torch.autocast(engine.device.type, dtype=torch.bfloat16, enabled=engine.autocast):
        det = m.detector(image)
        selected = torch.zeros((1, NUM_REGIONS), dtype=torch.bool, device=image.device)
        abnormal_probs = torch.zeros((1, NUM_REGIONS), device=image.device)
        abnormal = torch.zeros((1, NUM_REGIONS), dtype=torch.bool, device=image.device)
        sentences = []
        for r in range(NUM_REGIONS):
            feat = det.features[0, r:r + 1]
            abnormal_logit = float(m.abnormality(feat).float()[0])
            abnormal_probs[0, r] = torch.sigmoid(torch.tensor(abnormal_logit))
            abnormal[0, r] = abnormal_logit > engine.abnormal_threshold
            if det.detected[0, r] and float(m.selector(feat).float()[0]) > engine.selection_threshold:
                selected[0, r] = True
                sentences.append(m.decoder.generate(feat, engine.max_new_tokens, engine.num_beams)[0])
        label_probs = m.clip.label_probs(image).float()
    return det.boxes.float(), det.detected, selected, abnormal_probs, label_probs, abnormal, sentences
