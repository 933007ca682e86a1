"""RGRG's pieces one by one, without a checkpoint: beam-search semantics, text clean-up, report assembly, the
8-bit area resize, the importer's GPT-2 and precision checks."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from pipelines.importers.rgrg import RGRGImportError, check_gpt2, checkpoint_dtype
from pipelines.models import CRRGModel, preset
from pipelines.preprocess import resize_area_uint8
from pipelines.report import ReportAssembler, report_section, split_sentences, token_overlap_f1
from pipelines.tokenizer import clean_up_tokenization
from tests.pipelines import rgrg_reference as rgrg

SPECIAL = 299


@pytest.fixture(scope="module")
def decoder():
    """A tiny random decoder whose EOS grows likelier with position and differs by region feature."""
    torch.manual_seed(0)
    cfg = preset("tiny").replace(vocab_size=300, bos_token_id=SPECIAL, eos_token_id=SPECIAL, pad_token_id=SPECIAL,
                                 decoder_positions=40, max_sentence_tokens=30)
    dec = CRRGModel.from_config(cfg).eval().decoder
    with torch.no_grad():
        w = dec.lm.transformer.wte.weight
        w.mul_(6.0)
        direction = w[SPECIAL] / w[SPECIAL].norm()
        dec.lm.transformer.wpe.weight.add_(0.1 * torch.arange(40.0)[:, None] * direction)
    return dec


def _next_logprobs(decoder, feature):
    """The decoder's own next-token log-probabilities, the whole sequence recomputed (no cache reordering)."""
    def next_logprobs(beams):
        ids = torch.tensor(beams)
        n, t = ids.shape
        with torch.no_grad():
            logits = decoder._step(ids, decoder.prefix_cache(feature.expand(n, -1)), torch.arange(t).expand(n, t),
                                   torch.ones(n, t + 1, dtype=torch.long))
        return logits[:, -1].float().log_softmax(-1)
    return next_logprobs


def _strip(ids):
    return ids[: ids.index(SPECIAL) + 1] if SPECIAL in ids else ids


@pytest.mark.parametrize("steps", [5, 14])
def test_batched_beam_search_is_4_19s_per_region_semantics(decoder, steps):
    features = torch.randn(10, decoder.feature_proj[0].in_features, generator=torch.Generator().manual_seed(steps)) * 3
    with torch.no_grad():
        got = [_strip(row) for row in decoder.generate(features, steps, 4).tolist()]
    want = [rgrg.beam(_next_logprobs(decoder, f), 4, steps + 1, SPECIAL, SPECIAL) for f in features]
    assert got == want
    ends = {len(t) for t in want if t[-1] == SPECIAL}
    if steps == 5:  # the token limit: some regions' best hypothesis is an unfinished live beam
        assert any(t[-1] != SPECIAL for t in want)
    else:  # EOS at varied steps
        assert len(ends) >= 3


def test_greedy_is_rgrgs_greedy_search(decoder):
    features = torch.randn(8, decoder.feature_proj[0].in_features, generator=torch.Generator().manual_seed(5)) * 3
    with torch.no_grad():
        got = [_strip(row) for row in decoder.generate(features, 14, 1).tolist()]
    assert got == [rgrg.greedy(_next_logprobs(decoder, f), 15, SPECIAL, SPECIAL) for f in features]


def test_clean_up_is_transformers_4_19s():
    assert clean_up_tokenization(" The heart is normal . No effusion , no edema ?") == (
        " The heart is normal. No effusion, no edema?")
    assert clean_up_tokenization("there is n't any . it 's fine ! we 're ok , they 've gone ' ") == (
        "there isn't any. it's fine! we're ok, they've gone'")


def test_rule_splitter_and_token_overlap():
    assert split_sentences(" The heart is normal.  A 1.5 cm nodule! Is it? ") == [
        "The heart is normal.", "A 1.5 cm nodule!", "Is it?"]
    assert token_overlap_f1("No pleural effusion.", "no pleural effusion.") == 1.0
    assert token_overlap_f1("Heart normal.", "Lungs clear") == 0.0
    assert token_overlap_f1("The heart is normal.", "The heart is enlarged.") == pytest.approx(0.8)


def test_assembly_is_rgrgs_remove_duplicate_generated_sentences():
    # exact duplicates (first kept), then near duplicates: the longer stays; a removed sentence removes nothing
    sentences = [" The lungs are clear.", " No effusion.", " The lungs are clear.", " No pleural effusion.",
                 "No pleural effusion is seen.", " Heart size normal."]
    stub = {frozenset({"No effusion.", "No pleural effusion."}): 0.95,
            frozenset({"No pleural effusion.", "No pleural effusion is seen."}): 0.92}

    def similarity(a, b):
        return stub.get(frozenset({a, b}), 0.1)

    assembler = ReportAssembler(split_sentences, similarity)
    report = assembler(sentences)
    assert report == rgrg.assemble(sentences, split_sentences, similarity)
    assert report == "The lungs are clear. No pleural effusion is seen. Heart size normal."


def test_assembly_equals_rgrgs_on_real_report_sentences(shared_dir):
    """Every IU X-ray report's sentences, shuffled and repeated as region sentences would be, assembled by the
    node and by RGRG's loop with the same stand-in components."""
    lines = (shared_dir / "data" / "iu-xray-reports" / "reports.jsonl").read_text().splitlines()[:400]
    texts = [" ".join(filter(None, (r.get("findings"), r.get("impression")))) for r in map(json.loads, lines)]
    rng = np.random.default_rng(0)
    assembler = ReportAssembler()
    checked = 0
    for text in texts:
        parts = split_sentences(" ".join(text.split()))
        if len(parts) < 2:
            continue
        picked = [parts[i] for i in rng.integers(0, len(parts), size=min(8, 2 * len(parts)))]
        assert assembler(picked) == rgrg.assemble(picked, split_sentences, token_overlap_f1)
        checked += 1
    assert checked > 50


def test_manifest_report_section_names_the_components(tmp_path):
    assert report_section() == {"sentence_splitter": {"kind": "rules"},
                                "similarity": {"kind": "token-overlap-f1", "threshold": 0.9}}
    faithful = report_section(tmp_path, tmp_path)
    assert faithful["sentence_splitter"]["kind"] == "spacy"
    assert faithful["similarity"] == {"kind": "bertscore", "path": "report/bertscore", "layer": 5, "threshold": 0.9}


@pytest.mark.parametrize("shape", [(3056, 2544, 512, 426), (1024, 1024, 512, 512), (300, 200, 512, 341)])
def test_area_resize_is_opencvs(shape):
    cv2 = pytest.importorskip("cv2", reason="opencv-python is the reference for INTER_AREA")
    h, w, rows, cols = shape
    rng = np.random.default_rng(h)
    image = cv2.GaussianBlur(rng.integers(0, 256, (h, w)).astype(np.uint8), (0, 0), 3)
    want = cv2.resize(image, (cols, rows), interpolation=cv2.INTER_AREA)
    got = resize_area_uint8(torch.from_numpy(image).float(), rows, cols).numpy().astype(np.uint8)
    assert np.array_equal(got, want)


def test_gpt2_activation_and_epsilon_are_checked():
    model = CRRGModel.from_config(preset("tiny"))
    check_gpt2(model)  # the decoder computes with gelu_new and 1e-5, as RGRG's GPT-2
    check_gpt2(model, {"activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "n_head": 2})
    with pytest.raises(RGRGImportError, match="activation_function"):
        check_gpt2(model, {"activation_function": "gelu"})
    with pytest.raises(RGRGImportError, match="layer_norm_epsilon"):
        check_gpt2(model, {"layer_norm_epsilon": 1e-6})
    with pytest.raises(RGRGImportError, match="n_head"):
        check_gpt2(model, {"n_head": 16})
    model.decoder.lm.config.activation_function = "relu"
    with pytest.raises(RGRGImportError, match="RGRG's is 'gelu_new'"):
        check_gpt2(model)


def test_checkpoint_precision_is_read_off_its_tensors():
    assert checkpoint_dtype({"a": torch.zeros(2), "n": torch.zeros(2, dtype=torch.long)}) == torch.float32
    assert checkpoint_dtype({"a": torch.zeros(2, dtype=torch.float16)}) == torch.float16
    assert checkpoint_dtype({"a": torch.zeros(2, dtype=torch.float16), "b": torch.zeros(1)}) == torch.float32


def _tiny_distilbert(folder):
    """A random DistilBERT with a WordPiece vocabulary, saved as ``distilbert-base-uncased`` is laid out."""
    from transformers import DistilBertConfig, DistilBertModel, DistilBertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "the", "heart", "is", "normal", "no", "pleural",
             "effusion", "lungs", "are", "clear", "size", "enlarged"]
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    DistilBertTokenizerFast(vocab_file=str(folder / "vocab.txt"), model_max_length=64).save_pretrained(str(folder))
    torch.manual_seed(0)
    config = DistilBertConfig(vocab_size=len(words), dim=32, hidden_dim=64, n_layers=6, n_heads=2,
                              max_position_embeddings=64)
    DistilBertModel(config).save_pretrained(str(folder))


def test_bertscore_component_is_bundled_checksummed_and_used(tmp_path, tiny_tokenizer):
    """The faithful similarity, given as a local directory: copied into the bundle, named in the manifest,
    checked by verify_bundle, loaded by the engine's report assembler."""
    from pipelines.bundle import load_bundle, save_bundle, verify_bundle
    from pipelines.engine import Engine
    from pipelines.report import BertScore, component_files
    from tests.pipelines.conftest import exercised_model, tiny_config

    model_dir = tmp_path / "distilbert-base-uncased"
    _tiny_distilbert(model_dir)
    cfg = tiny_config(tiny_tokenizer)
    out = tmp_path / "bundle"
    save_bundle(exercised_model(cfg), cfg, out, name="t", version="1", tokenizer=tiny_tokenizer,
                intended_use="tests", clinical_use=False, report=report_section(bertscore_dir=model_dir),
                extra_files=component_files(bertscore_dir=model_dir))
    assert verify_bundle(out) == []
    engine = Engine(load_bundle(out), "cpu")
    similarity = engine.assembler.similarity
    assert isinstance(similarity, BertScore) and similarity.layer == 5
    assert engine.assembler.split is split_sentences  # no spaCy pipeline given: the stand-in, and it says so
    assert similarity("The heart is normal.", "The heart is normal.") == pytest.approx(1.0, abs=1e-6)
    assert 0.0 < similarity("The heart is normal.", "No pleural effusion.") < 1.0
    weights = next((out / "report" / "bertscore").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    assert any("checksum mismatch" in p and "report/bertscore" in p for p in verify_bundle(out))


def test_spacy_component_needs_spacy(tmp_path):
    from pipelines.report import SpacySentenceSplitter

    if importlib.util.find_spec("spacy") is not None:
        pytest.skip("spacy is installed: nothing to refuse")
    with pytest.raises(RuntimeError, match="spacy is not installed"):
        SpacySentenceSplitter(tmp_path)
