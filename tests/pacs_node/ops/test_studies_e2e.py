"""Studies end to end with real peers: DCMTK storescu on separate associations -> ``pacs-node serve`` ->
DCMTK storescp. One report per study, the lateral set aside; a node killed with ``kill -9`` while a study
settles or while it is analysed analyses each set of instances once; a late instance makes exactly one new
version at the receiver; a chest-labelled non-chest image gets a "not interpreted" report."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from tests.pacs_node.helpers import Node, StoreSCP, make_cr, storescu

NARRATIVE, FINDINGS = "1.2.840.10008.5.1.4.1.1.88.22", "1.2.840.10008.5.1.4.1.1.88.34"
DEMO = Path(__file__).resolve().parents[3] / "pipelines" / "bundles" / "demo"


def radiograph(path: Path, study: str, view: str, seed: int) -> Path:
    ds = make_cr(path, study_uid=study, seed=seed, rows=96, cols=80)
    ds.ViewPosition = view
    ds.InstanceNumber = seed
    ds.save_as(path, enforce_file_format=True)
    return path


def send(node: Node, path: Path) -> None:
    result = storescu(node.port, [path], calling="RECEIVER")  # one association per call
    assert result.returncode == 0, result.stderr


def evidence(sr: pydicom.Dataset) -> set[str]:
    return {sop.ReferencedSOPInstanceUID for st in sr.CurrentRequestedProcedureEvidenceSequence
            for se in st.ReferencedSeriesSequence for sop in se.ReferencedSOPSequence}


def wait_received(receiver: StoreSCP, predicate: Callable[[list[pydicom.Dataset]], bool], node: Node,
                  timeout: float = 90) -> list[pydicom.Dataset]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = receiver.received()
        if predicate(got):
            return got
        time.sleep(0.3)
    raise AssertionError(f"receiver has {[(d.SOPClassUID.name, d.get('InstanceNumber')) for d in receiver.received()]}"
                         f"\n--- node log ---\n{node.log()[-4000:]}")


def of_class(objects: list[pydicom.Dataset], sop_class: str) -> list[pydicom.Dataset]:
    return sorted((o for o in objects if o.SOPClassUID == sop_class), key=lambda o: int(o.InstanceNumber))


def analyses(node: Node) -> list[dict]:
    return node.query("SELECT dedupe_key, state, attempts FROM jobs WHERE kind = 'analyse' ORDER BY id")


def test_pa_and_lateral_on_two_associations_then_a_crash_while_settling_then_a_late_instance(
        make_node: Callable[..., Node], receiver: StoreSCP, tmp_path: Path) -> None:
    node = make_node(settle_s=6.5)
    study = generate_uid()
    pa, lateral, late = (radiograph(tmp_path / f"{n}.dcm", study, v, i)
                         for i, (n, v) in enumerate((("pa", "PA"), ("lat", "LL"), ("ap", "AP")), start=1))
    send(node, pa)
    time.sleep(5)
    send(node, lateral)  # 5 s later, on another association: still the same study, not yet settled
    node.kill9()  # ... and the node dies while the study settles
    assert receiver.received() == []
    node.start()
    first = wait_received(receiver, lambda got: len(of_class(got, NARRATIVE)) == 1, node)
    (narrative,), (findings,) = of_class(first, NARRATIVE), of_class(first, FINDINGS)
    uids = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in (pa, lateral)}
    assert evidence(narrative) == evidence(findings) == uids
    report = node.cli_json("results", study)
    roles = {i["view"]: (i["role"], i["why"]) for i in report}
    assert roles["PA"][0] == "analysed" and roles["LATERAL"][0] == "set aside"
    assert roles["LATERAL"][1].startswith("lateral view")
    assert [a["state"] for a in analyses(node)] == ["cancelled", "done"]  # one analysis for the two images

    send(node, late)  # after the report: re-opens the study
    got = wait_received(receiver, lambda got: len(of_class(got, NARRATIVE)) == 2, node)
    time.sleep(1.0)  # anything else on its way would arrive now
    got = receiver.received()
    old, new = of_class(got, NARRATIVE)
    assert (int(old.InstanceNumber), int(new.InstanceNumber)) == (1, 2)
    assert new.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0] \
        .ReferencedSOPInstanceUID == old.SOPInstanceUID
    assert len(of_class(got, FINDINGS)) == 2 and len({o.SOPInstanceUID for o in got}) == len(got)  # nothing twice
    assert [a["state"] for a in analyses(node)] == ["cancelled", "done", "done"]


def _worker_pid(node: Node) -> int:
    assert node.proc is not None
    children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(node.proc.pid)], capture_output=True, text=True)
    (pid,) = [int(p) for p in children.stdout.split()]
    return pid


@pytest.mark.skipif(not (DEMO / "manifest.json").is_file(), reason="the demo bundle is not in this tree")
def test_the_demo_model_does_not_interpret_a_chest_labelled_hand_and_survives_a_kill_during_analysis(
        make_node: Callable[..., Node], receiver: StoreSCP, tmp_path: Path) -> None:
    from pipelines.phantoms.dicom import phantom_dataset
    from pipelines.phantoms.nonchest import hand, labelled_chest

    node = make_node(settle_s=0.3, env={"PACS_NODE__PIPELINE__BUNDLE": str(DEMO)})
    hand_ds = labelled_chest(hand(3), 778_001)
    hand_ds.save_as(tmp_path / "hand.dcm", enforce_file_format=True)
    chest = phantom_dataset(778_002, 320)
    chest.save_as(tmp_path / "chest.dcm", enforce_file_format=True)

    send(node, tmp_path / "chest.dcm")
    deadline = time.monotonic() + 120
    while not any(a["state"] == "running" for a in analyses(node)):  # the worker has the study ...
        assert time.monotonic() < deadline, node.log()[-3000:]
        time.sleep(0.02)
    os.kill(_worker_pid(node), signal.SIGKILL)  # ... and dies in the middle of analysing it
    node.wait_jobs(lambda jobs: [j["state"] for j in jobs if j["kind"] == "analyse"] == ["done"], timeout=180)
    got = wait_received(receiver, lambda got: len(of_class(got, NARRATIVE)) == 1, node, timeout=60)
    (job,) = analyses(node)
    assert job["attempts"] == 2  # the worker was killed during the first attempt; the next one finished it
    assert len(of_class(got, NARRATIVE)) == 1 and len(of_class(got, FINDINGS)) == 1

    send(node, tmp_path / "hand.dcm")
    got = wait_received(receiver, lambda got: any("NOT INTERPRETED" in o.SeriesDescription for o in got), node,
                        timeout=120)
    (not_read,) = [o for o in got if "NOT INTERPRETED" in o.SeriesDescription]
    assert not_read.SOPClassUID == NARRATIVE and not_read.StudyInstanceUID == hand_ds.StudyInstanceUID
    texts = [item.TextValue for section in not_read.ContentSequence if section.ValueType == "CONTAINER"
             for item in section.ContentSequence if item.ValueType == "TEXT"]
    assert any("outside what the model was trained on" in t for t in texts)
    assert [o for o in got if o.StudyInstanceUID == hand_ds.StudyInstanceUID] == [not_read]  # no findings SR, KOS
    report = node.cli_json("results", str(hand_ds.StudyInstanceUID))
    (item,) = report
    assert item["study"]["interpreted"] is False and item["study"]["gate_score"] > item["study"]["gate_threshold"]
