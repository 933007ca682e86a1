"""The report tokenizer: byte-level BPE from local files only, never fetched.

A bundle stores one ``tokenizer.json`` (the `tokenizers` serialisation), whatever its origin: the GPT-2 BPE
(``vocab.json`` + ``merges.txt``, as RGRG uses) or a small BPE trained on report text with :func:`train_bpe`.
The single special token ``<|endoftext|>`` serves as BOS, EOS and padding, as in GPT-2.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2TokenizerFast, PreTrainedTokenizerFast

SPECIAL_TOKEN = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"


def _wrap(backend: Tokenizer, special: str = SPECIAL_TOKEN) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=special, eos_token=special,
                                   pad_token=special)


def gpt2_tokenizer(vocab_json: str | Path, merges_txt: str | Path) -> PreTrainedTokenizerFast:
    """The GPT-2 BPE from its two files (transformers 5 needs ``vocab=``/``merges=``; the old
    ``vocab_file=`` keywords are silently ignored and would yield an empty vocabulary)."""
    for path in (vocab_json, merges_txt):
        if not Path(path).is_file():
            raise FileNotFoundError(f"GPT-2 BPE file not found: {path}")
    tok = GPT2TokenizerFast(vocab=str(vocab_json), merges=str(merges_txt))
    if len(tok) < 1000:
        raise ValueError(f"GPT-2 BPE from {vocab_json} has only {len(tok)} tokens: wrong files?")
    return _wrap(tok.backend_tokenizer)


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """A small byte-level BPE for demo vocabularies; ``<|endoftext|>`` gets id 0."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=[SPECIAL_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer=trainer)
    return _wrap(backend)


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out_dir: str | Path) -> str:
    """Write ``tokenizer.json`` into ``out_dir``; returns the file name."""
    tokenizer.backend_tokenizer.save(str(Path(out_dir) / TOKENIZER_FILE))
    return TOKENIZER_FILE


def load_tokenizer(path: str | Path, special: str = SPECIAL_TOKEN) -> PreTrainedTokenizerFast:
    """Load a ``tokenizer.json`` written by :func:`save_tokenizer`."""
    tok = _wrap(Tokenizer.from_file(str(path)), special)
    if tok.convert_tokens_to_ids(special) is None:
        raise ValueError(f"{path}: special token {special!r} is not in the vocabulary")
    return tok


def encode_sentences(tokenizer: PreTrainedTokenizerFast, sentences: list[str], max_tokens: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Training inputs for :meth:`ReportDecoder.forward`: ``[BOS] tokens [EOS]`` right-padded to the
    longest, at most ``max_tokens + 1`` long (the EOS of a truncated sentence is kept)."""
    special = tokenizer.eos_token_id
    bodies = [ids[:max_tokens - 1] for ids in tokenizer(sentences, add_special_tokens=False)["input_ids"]]
    width = max((len(b) for b in bodies), default=0) + 2
    input_ids = torch.full((len(bodies), width), special, dtype=torch.long)
    mask = torch.zeros((len(bodies), width), dtype=torch.long)
    for row, body in enumerate(bodies):  # per sentence on the host: building a training batch, not a hot path
        input_ids[row, 1:len(body) + 1] = torch.tensor(body, dtype=torch.long)
        mask[row, : len(body) + 2] = 1
    return input_ids, mask


#: transformers 4.19's ``clean_up_tokenization`` (RGRG decodes with ``clean_up_tokenization_spaces=True``), in
#: its order. transformers 5 no longer applies it to BPE tokenizers, so the node does it itself.
_CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
             (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def clean_up_tokenization(text: str) -> str:
    """``"normal ."`` -> ``"normal."``: the spaces before punctuation and English contractions removed."""
    for old, new in _CLEAN_UP:
        text = text.replace(old, new)
    return text


def decode_sentences(tokenizer: PreTrainedTokenizerFast, ids: torch.Tensor, eos_token_id: int) -> list[str]:
    """Generated ids ``[N, T]`` -> text, each cut at its first EOS, special tokens skipped and tokenization
    spaces cleaned up (RGRG's ``batch_decode(skip_special_tokens=True, clean_up_tokenization_spaces=True)``);
    not stripped, so that the report is assembled from the text RGRG would assemble it from."""
    if ids.numel() == 0:
        return [""] * ids.shape[0]
    after_eos = (ids == eos_token_id).cumsum(dim=1) > 0
    ids = ids.masked_fill(after_eos, eos_token_id).cpu().tolist()
    texts = tokenizer.batch_decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return [clean_up_tokenization(t) for t in texts]
