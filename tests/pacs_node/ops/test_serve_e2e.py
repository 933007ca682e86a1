"""End to end with real peers: DCMTK storescu -> ``pacs-node serve`` -> worker -> DCMTK storescp."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset

from tests.pacs_node.helpers import Node, StoreSCP, make_cr, storescu
from tests.support import SHARED

pytest.importorskip("pacs_node.results", reason="the result builders (pacs_node.results) are not installed")


def referenced_uids(ds: Dataset) -> set[str]:
    found: set[str] = set()

    def visit(d: Dataset) -> None:
        for elem in d:
            if elem.keyword == "ReferencedSOPInstanceUID":
                found.add(str(elem.value))
            elif elem.VR == "SQ":
                for item in elem.value:
                    visit(item)

    visit(ds)
    return found


def _analysed_and_exported(jobs: list[dict]) -> bool:
    analyse = [j for j in jobs if j["kind"] == "analyse"]
    exports = [j for j in jobs if j["kind"] == "export"]
    return bool(analyse) and all(j["state"] == "done" for j in analyse) and bool(exports) \
        and all(j["state"] == "done" for j in exports)


def _run_e2e(node: Node, receiver: StoreSCP, source: Path, *storescu_options: str) -> Dataset:
    sent = pydicom.dcmread(source, stop_before_pixels=True)
    # The sender's AE title is the configured peer "receiver": results go back to the sender by default.
    result = storescu(node.port, [source], *storescu_options, calling="RECEIVER")
    assert result.returncode == 0, result.stderr

    node.wait_jobs(_analysed_and_exported, timeout=240)
    jobs = node.cli_json("queue", "ls")
    assert [j["state"] for j in jobs if j["kind"] == "analyse"] == ["done"]
    assert all(j["state"] == "done" for j in jobs)

    received = receiver.received()
    assert received, "nothing arrived at the receiver"
    for obj in received:
        assert obj.StudyInstanceUID == sent.StudyInstanceUID
        assert sent.SOPInstanceUID in referenced_uids(obj), f"{obj.SOPClassUID.name} does not reference the image"
    classes = {obj.SOPClassUID.name for obj in received}
    assert any("SR" in name for name in classes), classes

    stored = node.query("SELECT sop_instance_uid FROM instances WHERE source_sop_instance_uid = ?",
                        str(sent.SOPInstanceUID))
    assert {r["sop_instance_uid"] for r in stored} == {o.SOPInstanceUID for o in received}
    return sent


def test_radiograph_reported_back_to_sender(make_node: Callable[..., Node], receiver: StoreSCP,
                                            tmp_path: Path) -> None:
    """The real JPEG 2000 chest CR from ../shared when present, else a generated CR."""
    real = SHARED / "data" / "real-dicom" / "RG1_J2KR.dcm"
    if real.is_file():
        source, options = real, ("-xv",)  # storescu proposes JPEG 2000 lossless: stored as received
    else:
        source, options = tmp_path / "cr.dcm", ()
        make_cr(source, rows=256, cols=256)
    node = make_node()
    sent = _run_e2e(node, receiver, source, *options)

    health = json.load(urllib.request.urlopen(f"http://127.0.0.1:{node.http_port}/healthz", timeout=10))
    assert health["ok"] is True
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{node.http_port}/metrics", timeout=10).read().decode()
    assert 'pacs_node_instances_received_total{outcome="stored"} 1.0' in metrics
    assert 'pacs_node_queue_jobs{kind="analyse",state="done"} 1.0' in metrics
    assert 'pacs_node_job_seconds_count{kind="analyse"} 1.0' in metrics
    # no patient name or ID in the node's log
    log = node.log()
    assert str(sent.PatientName) not in log and str(sent.PatientID) not in log


def _tiny_random_bundle(out: Path) -> Path:
    """A ``tiny``-preset bundle with random weights: the real engine end to end, in seconds on a CPU."""
    torch = pytest.importorskip("torch")
    from pipelines.bundle import save_bundle
    from pipelines.models import CRRGModel, preset
    from pipelines.tokenizer import train_bpe

    tokenizer = train_bpe(["The heart size is normal.", "There is no pleural effusion.",
                           "The lungs are clear.", "No pneumothorax is seen."] * 4, vocab_size=300, min_frequency=1)
    special = tokenizer.eos_token_id
    cfg = preset("tiny").replace(vocab_size=len(tokenizer), bos_token_id=special, eos_token_id=special,
                                 pad_token_id=special)
    torch.manual_seed(0)
    save_bundle(CRRGModel.from_config(cfg).eval(), cfg, out, name="node-test-tiny", version="0",
                tokenizer=tokenizer, intended_use="node tests only: random weights", clinical_use=False,
                training={"data": "none (random weights)"})
    return out


def test_real_engine_end_to_end(make_node: Callable[..., Node], receiver: StoreSCP, tmp_path: Path) -> None:
    """The real inference engine in the worker: the demo bundle (the default ``pipeline.bundle``) on the
    real CR when both exist, else a tiny random-weights bundle on a generated CR."""
    pytest.importorskip("pipelines.engine", reason="the inference engine is not installed yet")
    from pacs_node.config import demo_bundle_path

    real = SHARED / "data" / "real-dicom" / "RG1_UNCR.dcm"
    if (demo_bundle_path() / "manifest.json").is_file() and real.is_file():
        bundle, image = "", real  # empty: the default, i.e. the demo bundle
    else:
        bundle, image = str(_tiny_random_bundle(tmp_path / "bundle")), tmp_path / "cr.dcm"
        make_cr(image, rows=512, cols=512)
    node = make_node(env={"PACS_NODE__PIPELINE__BUNDLE": bundle, "PACS_NODE__PIPELINE__DEVICE": "cpu"})
    _run_e2e(node, receiver, image)


def test_new_work_starts_when_it_is_committed_not_at_the_next_poll(make_node: Callable[..., Node],
                                                                    receiver: StoreSCP, tmp_path: Path) -> None:
    """Idle workers and export threads look for work once a minute here, yet each image comes back in
    seconds: the listener's commit rings the ``analyse`` doorbell, the worker's the ``export`` one."""
    node = make_node(poll_interval_s=60)
    for i in range(2):  # the second arrives when the worker is surely idle on its bell
        source = tmp_path / f"cr{i}.dcm"
        make_cr(source, rows=128, cols=128, seed=i)
        sent = storescu(node.port, [source], calling="RECEIVER")
        assert sent.returncode == 0, sent.stderr
        node.wait_jobs(lambda jobs, n=i + 1: _analysed_and_exported(jobs)
                       and sum(j["kind"] == "analyse" for j in jobs) == n, timeout=30)
    assert len(receiver.received()) >= 2
