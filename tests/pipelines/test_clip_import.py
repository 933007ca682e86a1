"""``import-clip`` and ``compose``: a published CLIP checkpoint inside a bundle computes what open_clip's own
loading of the same weights computes (image and text embeddings, zero-shot label probabilities), with the
model's own preprocessing, tokenizer and prompt scheme; composing bundles keeps every file's checksum."""

from __future__ import annotations

import json

import numpy as np
import open_clip
import pydicom
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import CenterCrop, InterpolationMode, Normalize, Resize

from pipelines.bundle import BundleError, load_bundle, save_bundle, verify_bundle
from pipelines.compose import compose_bundle
from pipelines.constants import CHEXPERT_LABELS
from pipelines.engine import CRRGPipeline, Engine
from pipelines.importers.clip import CHEXZERO_MEAN, CHEXZERO_STD, ClipImportError, import_clip
from pipelines.preprocess import dicom_to_unit, preprocess
from tests.pipelines.conftest import exercised_model, tiny_config

#: a small open_clip architecture with open_clip's custom text tower (``CustomTextCLIP``)
SMALL_OPEN_CLIP = {
    "embed_dim": 32,
    "custom_text": True,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def _canvas(size: int, seed: int = 0) -> np.ndarray:
    """A smooth 8-bit grey image as [0, 1] floats (what a letterboxed radiograph looks like to CLIP)."""
    gen = np.random.default_rng(seed)
    coarse = torch.from_numpy(gen.random((1, 1, 8, 8), dtype=np.float32))
    smooth = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)[0, 0]
    return np.round(smooth.numpy() * 255.0) / 255.0


def _detector_input(unit: np.ndarray, cfg) -> torch.Tensor:
    return ((torch.from_numpy(unit).float() - cfg.image_mean) / cfg.image_std)[None, None]


def _pair_probs(img: torch.Tensor, txt: torch.Tensor, scale: float) -> torch.Tensor:
    """The positive-vs-negative softmax, written as the original evaluations write it (numpy exp)."""
    img = img / img.norm(dim=-1, keepdim=True)
    txt = txt / txt.norm(dim=-1, keepdim=True)
    pos, neg = (scale * img @ txt[:14].T).numpy(), (scale * img @ txt[14:].T).numpy()
    return torch.from_numpy(np.exp(pos) / (np.exp(pos) + np.exp(neg)))


@pytest.fixture(scope="module")
def openai_vit_b32(tmp_path_factory):
    """A random-init ViT-B/32 saved as an OpenAI-format state dict in fp16, as OpenAI and CheXzero publish."""
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32")
    path = tmp_path_factory.mktemp("ckpt") / "vit-b32-openai.pt"
    torch.save({k: v.half() for k, v in model.state_dict().items()}, path)
    return path


def test_openai_vit_b32_equals_open_clips_own_loading(openai_vit_b32, tiny_bundle, tmp_path):
    half = import_clip(openai_vit_b32, "openai")
    out = compose_bundle(tiny_bundle, half, tmp_path / "chexzero-like")
    assert verify_bundle(out) == []
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["clip"]["zero_shot"] == {"positive": "{}", "negative": "no {}",
                                             "softmax_over": "positive, negative", "logit_scale": False}
    assert manifest["clip"]["checkpoint_dtypes"] == ["float16"]
    assert manifest["config"]["clip_preprocess"]["mean"] == [CHEXZERO_MEAN] * 3
    assert manifest["sources"]["regions"]["bundle"] == "tiny-test" and manifest["clinical_use"] is False
    bundle = load_bundle(out)
    node = bundle.model.clip

    state = torch.load(openai_vit_b32, weights_only=True)
    reference = open_clip.model.build_model_from_openai_state_dict(state, cast_dtype=None).float().eval()

    # CheXzero's input: the 320-px letterbox on the 0-255 scale, Normalize, then a tensor Resize (bicubic)
    unit = _canvas(320)
    ref_input = torch.from_numpy(unit * 255.0).float()[None].repeat(3, 1, 1)
    ref_input = Resize(224, interpolation=InterpolationMode.BICUBIC, antialias=False)(
        Normalize((CHEXZERO_MEAN,) * 3, (CHEXZERO_STD,) * 3)(ref_input))[None]
    prompts = [p for p, _ in node.prompts] + [n for _, n in node.prompts]
    assert prompts[0] == "Atelectasis" and prompts[14] == "no Atelectasis"
    detector_input = _detector_input(unit, bundle.config)
    with torch.no_grad():
        assert (node.clip_input(detector_input) - ref_input).abs().max() < 1e-4
        ref_img = reference.encode_image(ref_input)
        ref_txt = reference.encode_text(open_clip.tokenize(prompts))
        img = node.encode_image(detector_input, normalize=False)
        txt = node.encode_text(node.tokenize(prompts), normalize=False)
        probs = node.label_probs(detector_input)
    assert torch.equal(node.tokenize(prompts), open_clip.tokenize(prompts))
    assert (img - ref_img).abs().max() < 1e-5
    assert (txt - ref_txt).abs().max() < 1e-5
    ref_probs = _pair_probs(ref_img, ref_txt, 1.0)  # CheXzero: raw cosine similarities
    assert (probs - ref_probs).abs().max() < 1e-5
    assert torch.equal(probs[0].argsort(), ref_probs[0].argsort())


def test_open_clip_checkpoint_equals_open_clips_own_loading(tiny_bundle, tmp_path):
    config_file = tmp_path / "small-clip.json"
    config_file.write_text(json.dumps(SMALL_OPEN_CLIP))
    open_clip.add_model_config(config_file)  # open_clip's registry learns the name "small-clip"
    torch.manual_seed(1)
    trained = open_clip.create_model("small-clip")
    ckpt = tmp_path / "epoch_1.pt"  # as open_clip's trainer writes it: DDP names under "state_dict"
    torch.save({"epoch": 1, "name": "small", "state_dict": {f"module.{k}": v for k, v in trained.state_dict().items()}},
               ckpt)
    out = compose_bundle(tiny_bundle, import_clip(ckpt, "open_clip", model=str(config_file)), tmp_path / "b")
    bundle = load_bundle(out)
    node = bundle.model.clip
    assert type(node.model).__name__ == "CustomTextCLIP"

    reference, _, transform = open_clip.create_model_and_transforms("small-clip", pretrained=str(ckpt))
    reference.eval()
    unit = _canvas(64, seed=2)
    pil = Image.fromarray(np.round(unit * 255).astype(np.uint8), mode="L").convert("RGB")
    ref_input = transform(pil)[None]
    prompts = [p for p, _ in node.prompts] + [n for _, n in node.prompts]
    detector_input = _detector_input(unit, bundle.config)
    with torch.no_grad():
        assert (node.clip_input(detector_input) - ref_input).abs().max() < 1e-5
        ref_img, ref_txt = reference.encode_image(ref_input), reference.encode_text(open_clip.tokenize(prompts, 24))
        img = node.encode_image(detector_input, normalize=False)
        txt = node.encode_text(node.tokenize(prompts), normalize=False)
        probs = node.label_probs(detector_input)
    assert (img - ref_img).abs().max() < 1e-5 and (txt - ref_txt).abs().max() < 1e-5
    ref_probs = _pair_probs(ref_img, ref_txt, float(reference.logit_scale.detach().exp()))
    assert (probs - ref_probs).abs().max() < 1e-5
    assert torch.equal(probs[0].argsort(), ref_probs[0].argsort())

    # compose: the regions of one bundle with this bundle's CLIP; every file checked, sources named
    again = compose_bundle(tiny_bundle, out, tmp_path / "again", name="again")
    manifest = json.loads((again / "manifest.json").read_text())
    assert verify_bundle(again) == [] and manifest["name"] == "again"
    assert manifest["sources"]["clip"]["bundle"] == bundle.name
    assert manifest["clip"]["format"] == "open_clip"
    with pytest.raises(BundleError, match="already exists"):
        compose_bundle(tiny_bundle, out, again)


def test_bad_checkpoints_are_named(tmp_path):
    bogus = tmp_path / "bogus.pt"
    torch.save({"visual.conv1.weight": torch.zeros(1)}, bogus)
    with pytest.raises(ClipImportError, match="ln_final.weight"):
        import_clip(bogus, "openai")
    with pytest.raises(ClipImportError, match="needs --model"):
        import_clip(bogus, "open_clip")
    with pytest.raises(ClipImportError, match="not an open_clip model name"):
        import_clip(bogus, "open_clip", model="no-such-model")
    assert len(CHEXPERT_LABELS) == 14


def test_cli_imports_and_composes(tiny_bundle, tmp_path):
    from typer.testing import CliRunner

    from pacs_node.cli.models import app

    config_file = tmp_path / "small.json"
    config_file.write_text(json.dumps({**SMALL_OPEN_CLIP, "embed_dim": 16}))
    ckpt = tmp_path / "small.pt"
    torch.save(open_clip.CLIP(**{k: v for k, v in SMALL_OPEN_CLIP.items() if k != "custom_text"}).state_dict(), ckpt)
    runner = CliRunner()
    wrong = runner.invoke(app, ["import-clip", str(ckpt), "--format", "open_clip", "--model", str(config_file),
                                "--into", str(tiny_bundle), "--out", str(tmp_path / "x")])
    assert wrong.exit_code == 1 and "the architecture needs [64, 16]" in " ".join(wrong.output.split())
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({k: v for k, v in SMALL_OPEN_CLIP.items() if k != "custom_text"}))
    done = runner.invoke(app, ["import-clip", str(ckpt), "--format", "open_clip", "--model", str(plain),
                               "--into", str(tiny_bundle), "--out", str(tmp_path / "b"), "--positive",
                               "chest x-ray showing {}", "--negative", "chest x-ray without {}", "--no-logit-scale"])
    assert done.exit_code == 0, done.output
    config = json.loads((tmp_path / "b" / "manifest.json").read_text())["config"]
    assert config["label_prompts"][1] == ["chest x-ray showing Cardiomegaly", "chest x-ray without Cardiomegaly"]
    assert config["clip_logit_scale"] is False
    composed = runner.invoke(app, ["compose", "--regions", str(tiny_bundle), "--clip", str(tmp_path / "b"),
                                   "--out", str(tmp_path / "c")])
    assert composed.exit_code == 0 and verify_bundle(tmp_path / "c") == [], composed.output


def _chexzero_input(unit: np.ndarray) -> torch.Tensor:
    """CheXzero's preprocessing of the original unit image, written out here: the longest side to 320 px
    (antialiased bilinear on the float image, the node's letterbox resize), centred on a black square, the
    0-255 scale, Normalize with CheXzero's statistics, then torchvision's bicubic tensor Resize to 224."""
    rows, cols = unit.shape
    new_rows, new_cols = round(rows * 320 / max(rows, cols)), round(cols * 320 / max(rows, cols))
    small = F.interpolate(torch.from_numpy(unit)[None, None], size=(new_rows, new_cols), mode="bilinear",
                          align_corners=False, antialias=True)[0, 0].clamp(0.0, 1.0)
    square = torch.zeros((320, 320))
    top, left = (320 - new_rows) // 2, (320 - new_cols) // 2
    square[top:top + new_rows, left:left + new_cols] = small
    normalised = Normalize((CHEXZERO_MEAN,) * 3, (CHEXZERO_STD,) * 3)((square * 255.0)[None].repeat(3, 1, 1))
    return Resize(224, interpolation=InterpolationMode.BICUBIC, antialias=False)(normalised)[None]


def _open_clip_input(unit: np.ndarray) -> torch.Tensor:
    """open_clip's ``Resize(224, bicubic)`` + ``CenterCrop(224)`` + ``Normalize`` written with torchvision's
    tensor transforms on the float image (antialiased, saturating as PIL does)."""
    grey = torch.from_numpy(unit)[None]
    resized = Resize(224, interpolation=InterpolationMode.BICUBIC, antialias=True)(grey).clamp(0.0, 1.0)
    cropped = CenterCrop(224)(resized).repeat(3, 1, 1)
    return Normalize(open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)(cropped)[None]


@pytest.mark.parametrize("scheme", ["chexzero", "open_clip"])
def test_engine_gives_an_imported_clip_its_input_from_the_original_image(scheme, openai_vit_b32, tiny_tokenizer,
                                                                         shared_dir, tmp_path):
    """The engine's CLIP probabilities and embedding of a real CR, with a 512-px detector input (the paper's),
    equal open_clip's own model on the scheme's preprocessing of the original image; the detector's letterbox
    does not (so the old path would fail), on the host and with device preprocessing alike."""
    cfg = tiny_config(tiny_tokenizer).replace(image_size=512)
    regions = tmp_path / "regions-512"
    save_bundle(exercised_model(cfg), cfg, regions, name="tiny-512", version="0.1", tokenizer=tiny_tokenizer,
                intended_use="unit tests", clinical_use=False)
    bundle = load_bundle(compose_bundle(regions, import_clip(openai_vit_b32, "openai", scheme=scheme),
                                        tmp_path / "b"))
    engine = Engine(bundle, "cpu")
    ds = pydicom.dcmread(shared_dir / "data" / "real-dicom" / "RG1_UNCR.dcm")
    unit = dicom_to_unit(ds)

    state = torch.load(openai_vit_b32, weights_only=True)
    reference = open_clip.model.build_model_from_openai_state_dict(state, cast_dtype=None).float().eval()
    node = bundle.model.clip
    prompts = [p for p, _ in node.prompts] + [n for _, n in node.prompts]
    ref_input = (_chexzero_input if scheme == "chexzero" else _open_clip_input)(unit)
    with torch.no_grad():
        ref_img = reference.encode_image(ref_input)
        ref_probs = _pair_probs(ref_img, reference.encode_text(open_clip.tokenize(prompts)),
                                1.0 if scheme == "chexzero" else float(reference.logit_scale.exp()))[0]
        config = bundle.config
        prepared = preprocess(ds, config.image_size, config.image_mean, config.image_std,
                              clip=config.clip_preprocess)
        assert prepared.clip is not None and prepared.clip.shape == (3, 224, 224)
        img = node.encode_image(prepared.clip[None], normalize=False, prepared=True)
        old = node.encode_image(prepared.tensor[None], normalize=False)  # from the detector's 512-px letterbox
    assert (img - ref_img).abs().max() < 1e-5
    assert (old - ref_img).abs().max() > 1e-3
    for on_device in (False, True):
        result = CRRGPipeline(engine, preprocess_workers=1, preprocess_on_device=on_device).analyse([ds])[0]
        probs = torch.tensor([result.label_probs[label] for label in CHEXPERT_LABELS], dtype=torch.float64)
        assert (probs - ref_probs.double()).abs().max() < 1e-5
