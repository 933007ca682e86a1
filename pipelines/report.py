"""The selected regions' sentences -> one report, assembled as RGRG assembles it.

RGRG (``generate_reports_for_images.py``) joins the generated sentences of the selected regions with spaces,
splits the text into sentences again (spaCy's ``en_core_web_trf``), drops exact duplicates (first kept) and
then near-duplicates: for each pair, in order, whose BERTScore F1 (``distilbert-base-uncased``, layer 5, no
idf, no baseline rescaling) exceeds 0.9, the shorter sentence goes. Neither model can be downloaded here, so a
bundle names the two components it uses in its manifest (``report``), each either

* a stand-in that runs anywhere with the same interface: :func:`split_sentences` (sentence ends at ``.``,
  ``!`` or ``?`` followed by white space) and :func:`token_overlap_f1` (F1 of the shared lower-cased words), or
* the faithful model, copied into the bundle from a local directory the user provides (checksummed like
  every bundle file): :class:`SpacySentenceSplitter` (needs ``spacy`` installed) and :class:`BertScore`.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

#: RGRG's ``BERTSCORE_SIMILARITY_THRESHOLD``.
SIMILARITY_THRESHOLD = 0.9
#: bert_score's layer for ``distilbert-base-uncased`` (its ``model2layers``).
DISTILBERT_LAYER = 5

#: ``text -> sentences``
SentenceSplitter = Callable[[str], list[str]]
#: ``(candidate, reference) -> F1`` in [0, 1]
SentenceSimilarity = Callable[[str, str], float]

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"\w+|[^\w\s]")


def split_sentences(text: str) -> list[str]:
    """Rule-based stand-in for spaCy's sentence splitter: a sentence ends at ``.``, ``!`` or ``?`` followed by
    white space (so ``1.5 cm`` stays whole); pieces are stripped, empty ones dropped."""
    return [piece.strip() for piece in _SENTENCE_END.split(text) if piece.strip()]


def token_overlap_f1(candidate: str, reference: str) -> float:
    """Stand-in for BERTScore F1: precision and recall of the words (and punctuation marks) the two sentences
    share, lower-cased, counted with multiplicity. Identical sentences score 1, disjoint ones 0."""
    a, b = Counter(_WORD.findall(candidate.lower())), Counter(_WORD.findall(reference.lower()))
    shared = sum((a & b).values())
    if not shared:
        return 0.0
    precision, recall = shared / sum(a.values()), shared / sum(b.values())
    return 2 * precision * recall / (precision + recall)


class SpacySentenceSplitter:
    """spaCy's sentence splitter from a local pipeline directory (RGRG: ``en_core_web_trf``)."""

    def __init__(self, path: Path) -> None:
        try:
            import spacy
        except ImportError as exc:
            raise RuntimeError(f"the bundle's sentence splitter {path} is a spaCy pipeline, and spacy is not "
                               "installed (pip install spacy, plus spacy-transformers for en_core_web_trf)") from exc
        self.nlp = spacy.load(path)

    def __call__(self, text: str) -> list[str]:
        return [sentence.text for sentence in self.nlp(text).sents]


class BertScore:
    """BERTScore F1 as ``bert_score`` computes it for one pair (``evaluate``'s ``bertscore`` with
    ``model_type=distilbert-base-uncased``): the contextual embeddings of ``layer``, each token of one sentence
    matched to its most similar token of the other (``[CLS]``/``[SEP]`` included as matches, excluded from the
    averages), precision and recall averaged, F1."""

    def __init__(self, path: Path, layer: int = DISTILBERT_LAYER) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(path), local_files_only=True).eval()
        self.layer = layer

    @torch.no_grad()
    def _embed(self, sentence: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit-length embeddings ``[T, H]`` and averaging weights ``[T]`` (0 for the special tokens)."""
        ids = self.tokenizer.encode(sentence.strip(), add_special_tokens=True, truncation=True,
                                    max_length=self.tokenizer.model_max_length)
        out = self.model(torch.tensor([ids]), output_hidden_states=True)
        emb = out.hidden_states[self.layer][0].float()
        special = {self.tokenizer.cls_token_id, self.tokenizer.sep_token_id}
        weights = torch.tensor([0.0 if i in special else 1.0 for i in ids])
        return emb / emb.norm(dim=-1, keepdim=True), weights / weights.sum()

    def __call__(self, candidate: str, reference: str) -> float:
        (hyp, hyp_w), (ref, ref_w) = self._embed(candidate), self._embed(reference)
        sim = hyp @ ref.T  # [T_hyp, T_ref]
        precision = float((sim.max(dim=1).values * hyp_w).sum())
        recall = float((sim.max(dim=0).values * ref_w).sum())
        return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


@dataclass(frozen=True)
class ReportAssembler:
    """``assembler(sentences)`` -> report text, RGRG's way (module docstring)."""

    split: SentenceSplitter = split_sentences
    similarity: SentenceSimilarity = token_overlap_f1
    threshold: float = SIMILARITY_THRESHOLD

    def __call__(self, sentences: Iterable[str | None]) -> str:
        text = " ".join(s for s in sentences if s)
        found = list(dict.fromkeys(self.split(text)))  # exact duplicates: the first stays
        removed: set[str] = set()
        for i, first in enumerate(found):
            for second in found[i + 1:]:
                if first in removed:
                    break
                if second in removed:
                    continue
                if self.similarity(first, second) > self.threshold:
                    removed.add(second if len(first) > len(second) else first)  # the longer stays
        return " ".join(s for s in found if s not in removed)


#: Manifest ``report`` section of a bundle that names no component: the stand-ins.
STAND_INS: dict[str, Any] = {"sentence_splitter": {"kind": "rules"},
                             "similarity": {"kind": "token-overlap-f1", "threshold": SIMILARITY_THRESHOLD}}
SPACY_DIR = "report/sentence_splitter"
BERTSCORE_DIR = "report/bertscore"


def report_section(spacy_dir: Path | None = None, bertscore_dir: Path | None = None) -> dict[str, Any]:
    """The manifest ``report`` section for a bundle holding the given faithful components (else stand-ins)."""
    return {
        "sentence_splitter": ({"kind": "spacy", "path": SPACY_DIR} if spacy_dir is not None
                              else dict(STAND_INS["sentence_splitter"])),
        "similarity": ({"kind": "bertscore", "path": BERTSCORE_DIR, "layer": DISTILBERT_LAYER,
                        "threshold": SIMILARITY_THRESHOLD} if bertscore_dir is not None
                       else dict(STAND_INS["similarity"])),
    }


def component_files(spacy_dir: Path | None = None, bertscore_dir: Path | None = None) -> dict[str, Path]:
    """``{name inside the bundle: source file}`` for the faithful components' directories."""
    files: dict[str, Path] = {}
    for target, source in ((SPACY_DIR, spacy_dir), (BERTSCORE_DIR, bertscore_dir)):
        if source is None:
            continue
        if not Path(source).is_dir():
            raise FileNotFoundError(f"{source}: not a directory")
        for path in sorted(p for p in Path(source).rglob("*") if p.is_file()):
            files[f"{target}/{path.relative_to(source).as_posix()}"] = path
    return files


def assembler_from_manifest(section: Mapping[str, Any] | None, root: Path) -> ReportAssembler:
    """The assembler a bundle's manifest describes (no section: the stand-ins); ``ValueError`` names an
    unknown kind."""
    section = section or STAND_INS
    splitter_spec, similarity_spec = section["sentence_splitter"], section["similarity"]
    kind = splitter_spec["kind"]
    if kind == "rules":
        split: SentenceSplitter = split_sentences
    elif kind == "spacy":
        split = SpacySentenceSplitter(root / splitter_spec["path"])
    else:
        raise ValueError(f"manifest report.sentence_splitter.kind {kind!r} is not 'rules' or 'spacy'")
    kind = similarity_spec["kind"]
    if kind == "token-overlap-f1":
        similarity: SentenceSimilarity = token_overlap_f1
    elif kind == "bertscore":
        similarity = BertScore(root / similarity_spec["path"], int(similarity_spec.get("layer", DISTILBERT_LAYER)))
    else:
        raise ValueError(f"manifest report.similarity.kind {kind!r} is not 'token-overlap-f1' or 'bertscore'")
    return ReportAssembler(split, similarity, float(similarity_spec.get("threshold", SIMILARITY_THRESHOLD)))
