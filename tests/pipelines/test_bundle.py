"""Model bundles: round trip, refusal of damaged bundles (naming the culprit), and the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from pacs_node.cli.models import app as models_app
from pipelines.bundle import MANIFEST, BundleError, load_bundle, save_bundle, sha256_file, verify_bundle
from pipelines.models import MODULES
from tests.pipelines.conftest import exercised_model, tiny_config


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))


def _rewrite_manifest(bundle: Path, **changes) -> None:
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest.update(changes)
    (bundle / MANIFEST).write_text(json.dumps(manifest))


def test_manifest_describes_the_bundle(tiny_bundle):
    manifest = json.loads((tiny_bundle / MANIFEST).read_text())
    assert manifest["name"] == "tiny-test" and manifest["version"] == "0.1"
    assert manifest["preset"] == "tiny" and manifest["clinical_use"] is False
    assert len(manifest["regions"]) == 29 and len(manifest["labels"]) == 14
    assert set(manifest["files"]) == {f"{m}.safetensors" for m in MODULES} | {"tokenizer.json"}
    for fname, digest in manifest["files"].items():
        assert sha256_file(tiny_bundle / fname) == digest
    assert manifest["decoding"]["num_beams"] == 1 and manifest["thresholds"]["selection_logit"] == -1.0


def test_round_trip_keeps_weights(tiny_bundle, tiny_tokenizer):
    original = exercised_model(tiny_config(tiny_tokenizer))
    loaded = load_bundle(tiny_bundle).model
    reference = original.state_dict()
    for key, value in loaded.state_dict().items():
        if value.is_floating_point():  # stored as float16
            assert torch.allclose(value, reference[key].half().float()), key
        else:
            assert torch.equal(value, reference[key]), key
    # GPT-2's output layer is tied to its input embedding, stored once and tied again on load
    assert loaded.decoder.lm.lm_head.weight.data_ptr() == loaded.decoder.lm.transformer.wte.weight.data_ptr()
    assert verify_bundle(tiny_bundle) == []


def test_save_refuses_to_overwrite_and_mismatched_tokenizer(tiny_bundle, tiny_tokenizer, tmp_path):
    cfg = tiny_config(tiny_tokenizer)
    model = exercised_model(cfg)
    kwargs = {"name": "x", "version": "1", "tokenizer": tiny_tokenizer, "intended_use": "t", "clinical_use": False}
    with pytest.raises(BundleError, match="already exists"):
        save_bundle(model, cfg, tiny_bundle, **kwargs)
    with pytest.raises(BundleError, match="vocab_size"):
        save_bundle(model, cfg.replace(vocab_size=cfg.vocab_size + 1), tmp_path / "b", **kwargs)


def test_checksum_mismatch_names_the_file(bundle_copy):
    target = bundle_copy / "decoder.safetensors"
    data = bytearray(target.read_bytes())
    data[-10] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"decoder\.safetensors: checksum mismatch"):
        load_bundle(bundle_copy)
    assert verify_bundle(bundle_copy) == ["decoder.safetensors: checksum mismatch (sha256 differs from the manifest)"]


def test_missing_file_is_named(bundle_copy):
    (bundle_copy / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match=r"tokenizer\.json: missing"):
        load_bundle(bundle_copy)


def test_shape_mismatch_names_the_tensor(bundle_copy):
    path = bundle_copy / "selector.safetensors"
    state = load_file(str(path))
    state["classifier.0.weight"] = torch.zeros(3, 3, dtype=torch.float16)
    save_file(state, str(path))
    manifest = json.loads((bundle_copy / MANIFEST).read_text())
    _rewrite_manifest(bundle_copy, files={**manifest["files"], "selector.safetensors": sha256_file(path)})
    with pytest.raises(BundleError, match=r"selector\.safetensors: tensor 'classifier\.0\.weight' has shape \[3, 3\]"):
        load_bundle(bundle_copy)


def test_missing_and_unexpected_tensors_are_named(bundle_copy):
    path = bundle_copy / "abnormality.safetensors"
    state = load_file(str(path))
    state["extra.weight"] = state.pop("classifier.4.bias")
    save_file(state, str(path))
    manifest = json.loads((bundle_copy / MANIFEST).read_text())
    _rewrite_manifest(bundle_copy, files={**manifest["files"], "abnormality.safetensors": sha256_file(path)})
    problems = verify_bundle(bundle_copy)
    assert "abnormality.safetensors: tensor 'classifier.4.bias' is missing" in problems
    assert "abnormality.safetensors: unexpected tensor 'extra.weight'" in problems


def test_unknown_format_version_and_bad_config_are_refused(bundle_copy):
    _rewrite_manifest(bundle_copy, format_version=99)
    with pytest.raises(BundleError, match="unknown manifest format_version 99"):
        load_bundle(bundle_copy)
    manifest = json.loads((bundle_copy / MANIFEST).read_text())
    _rewrite_manifest(bundle_copy, format_version=1, config={**manifest["config"], "decoder_heads": 7})
    with pytest.raises(BundleError, match="decoder_heads"):
        load_bundle(bundle_copy)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="missing"):
        load_bundle(tmp_path)
    assert verify_bundle(tmp_path / "nowhere")[0].startswith("bundle directory not found")


# -- CLI ----------------------------------------------------------------------------------------------------

def test_cli_verify_good_and_corrupted_bundle(bundle_copy):
    runner = CliRunner()
    good = runner.invoke(models_app, ["verify", str(bundle_copy)])
    assert good.exit_code == 0, good.output
    assert "OK" in good.output
    target = bundle_copy / "clip.safetensors"
    target.write_bytes(target.read_bytes()[:-1] + b"\x00")
    bad = runner.invoke(models_app, ["verify", "--json", str(bundle_copy)])
    assert bad.exit_code == 1
    report = json.loads(bad.stdout)
    assert report["ok"] is False and any("clip.safetensors" in p for p in report["problems"])


def test_cli_show(tiny_bundle):
    result = CliRunner().invoke(models_app, ["show", "--json", str(tiny_bundle)])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert shown["name"] == "tiny-test" and shown["clinical_use"] is False
    assert all(size for size in shown["files"].values())
