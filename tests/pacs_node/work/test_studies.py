"""Studies, in process, on SQLite and PostgreSQL: instances are collected until the study settles, one
analysis per set of instances reads the best frontal image and sets the others aside with reasons, a late
instance makes new versions that name the ones they replace, and a study without a frontal view gets a
"not interpreted" report."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

from pacs_node.config import Settings
from pacs_node.ops.context import ServerContext
from pacs_node.work.ingest import Caller, Ingestor
from pacs_node.work.worker import Worker
from pipelines.interface import FakePipeline
from storage.schema import Instance, Job, JobKind, JobState
from storage.studies import get_study
from tests.pacs_node.helpers import make_cr
from tests.storage.conftest import db_url, pg_server, pg_url, sqlite_db  # noqa: F401 (fixtures)

SETTLE_S = 0.6


@pytest.fixture
def runtime(tmp_path: Path, db_url: str) -> Iterator[tuple[Settings, ServerContext]]:  # noqa: F811
    settings = Settings(
        node={"data_dir": tmp_path / "var"}, database={"url": db_url}, store={"min_free_bytes": 0},
        pipeline={"bundle": "fake"}, worker={"lease_seconds": 5}, studies={"settle_s": SETTLE_S},
        peers={"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 104}}, routing={"always": ["pacs"]},
    )
    rt = ServerContext.open(settings)
    yield settings, rt
    rt.close()


def radiograph(path: Path, study: str, view: str | None, seed: int, acquired: str = "120000") -> pydicom.Dataset:
    ds = make_cr(path, study_uid=study, seed=seed)
    if view is not None:
        ds.ViewPosition = view
    ds.AcquisitionDate, ds.AcquisitionTime = "20260101", acquired
    ds.InstanceNumber = seed + 1
    ds.save_as(path, enforce_file_format=True)
    return ds


def ingest(settings: Settings, rt: ServerContext, path: Path) -> str:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    incoming = rt.incoming_dir / f"tmp-{ds.SOPInstanceUID}.dcm"
    incoming.write_bytes(path.read_bytes())
    assert Ingestor(settings, rt).ingest(incoming, str(ds.SOPInstanceUID), Caller("MODALITY", "127.0.0.1")) == 0
    return str(ds.SOPInstanceUID)


def analyse_when_settled(rt: ServerContext, timeout: float = 60.0) -> int:
    """Run the worker until no analyse job is waiting; returns how many jobs it processed."""
    worker = Worker(rt.settings, rt, FakePipeline(), worker_id="w")
    done = 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = worker.claim_batch(threading.Event())
        if jobs:
            worker.process(jobs)
            done += len(jobs)
        elif not _waiting(rt):
            return done
        time.sleep(0.05)
    raise AssertionError("analyse jobs still waiting")


def _waiting(rt: ServerContext) -> list[Job]:
    with rt.read_session() as session:
        return list(session.scalars(select(Job).where(Job.kind == JobKind.ANALYSE.value,
                                                      Job.state.in_([JobState.QUEUED.value, JobState.RUNNING.value]))))


def results(rt: ServerContext, study: str) -> list[pydicom.Dataset]:
    with rt.read_session() as session:
        rows = session.scalars(select(Instance).where(Instance.study_instance_uid == study,
                                                      Instance.origin == "result").order_by(Instance.id)).all()
        return [pydicom.dcmread(rt.store.path(r.path)) for r in rows]


def evidence_uids(sr: pydicom.Dataset) -> set[str]:
    return {sop.ReferencedSOPInstanceUID for study in sr.CurrentRequestedProcedureEvidenceSequence
            for series in study.ReferencedSeriesSequence for sop in series.ReferencedSOPSequence}


def texts(sr: pydicom.Dataset) -> list[str]:
    found = []

    def walk(items) -> None:  # noqa: ANN001
        for item in items:
            if item.ValueType == "TEXT":
                found.append(item.TextValue)
            walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    return found


def finding_items(sr: pydicom.Dataset) -> list[pydicom.Dataset]:
    """Items that state a finding: coded evaluations, probabilities, boxes (context codes excluded)."""
    context = {"121049", "121058", "121005"}  # language, procedure reported, observer type
    found = []

    def walk(items) -> None:  # noqa: ANN001
        for item in items:
            if item.ValueType in ("NUM", "SCOORD") or (
                    item.ValueType == "CODE" and item.ConceptNameCodeSequence[0].CodeValue not in context):
                found.append(item)
            walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    return found


def by_class(objects: list[pydicom.Dataset], sop_class: str) -> list[pydicom.Dataset]:
    return [o for o in objects if o.SOPClassUID == sop_class]


NARRATIVE, FINDINGS, KOS = "1.2.840.10008.5.1.4.1.1.88.22", "1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.88.59"


def test_a_pa_and_a_lateral_make_one_report_that_sets_the_lateral_aside(runtime, tmp_path: Path) -> None:
    settings, rt = runtime
    study = generate_uid()
    radiograph(tmp_path / "pa.dcm", study, "PA", 1)
    radiograph(tmp_path / "lat.dcm", study, "LL", 2)
    pa = ingest(settings, rt, tmp_path / "pa.dcm")
    assert rt.queue.claim("w", [JobKind.ANALYSE]) == []  # the study has not settled yet
    lateral = ingest(settings, rt, tmp_path / "lat.dcm")
    with rt.read_session() as session:
        jobs = session.scalars(select(Job).where(Job.kind == "analyse").order_by(Job.id)).all()
    assert [j.state for j in jobs] == ["cancelled", "queued"]  # the first set's job made moot by the second
    assert jobs[1].not_before > jobs[1].created_at  # due once the study has settled
    assert analyse_when_settled(rt) == 1

    objects = results(rt, study)
    (narrative,), (findings,) = by_class(objects, NARRATIVE), by_class(objects, FINDINGS)
    assert evidence_uids(narrative) == evidence_uids(findings) == {pa, lateral}
    comments = texts(narrative)
    assert any(t.startswith("Image analysed: postero-anterior view (View Position PA)") for t in comments)
    assert any(t.startswith("Image set aside: lateral view (View Position LL)") for t in comments)
    for kos in by_class(objects, KOS):  # the KOS flags the image read, never the lateral
        refs = {s.ReferencedSOPInstanceUID for s in kos.ContentSequence if "ReferencedSOPSequence" in s
                for s in s.ReferencedSOPSequence}
        assert refs <= {pa}
    with rt.read_session() as session:
        record = get_study(session, study)
        assert record is not None and record.version == 1 and record.state == "analysed"
        roles = {i["sop_instance_uid"]: (i["role"], i["view"]) for i in record.analysis["images"]}
    assert roles == {pa: ("analysed", "PA"), lateral: ("set aside", "LATERAL")}


def test_a_late_instance_supersedes_the_report_and_only_the_new_version_is_sent(runtime, tmp_path: Path) -> None:
    settings, rt = runtime
    study = generate_uid()
    radiograph(tmp_path / "ap.dcm", study, "AP", 1)
    ap = ingest(settings, rt, tmp_path / "ap.dcm")
    analyse_when_settled(rt)
    first = {o.SOPClassUID: o for o in results(rt, study)}
    with rt.read_session() as session:
        exports_before = {j.sop_instance_uid for j in session.scalars(select(Job).where(Job.kind == "export"))}

    radiograph(tmp_path / "pa.dcm", study, "PA", 2)
    pa = ingest(settings, rt, tmp_path / "pa.dcm")
    assert analyse_when_settled(rt) == 1
    second = [o for o in results(rt, study) if o.SOPInstanceUID not in {f.SOPInstanceUID for f in first.values()}]
    (narrative,) = by_class(second, NARRATIVE)
    (findings,) = by_class(second, FINDINGS)
    for new in (narrative, findings):
        assert new.InstanceNumber == 2
        (predecessor,) = new.PredecessorDocumentsSequence
        (series,) = predecessor.ReferencedSeriesSequence
        assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == first[new.SOPClassUID].SOPInstanceUID
        assert new.SeriesInstanceUID == first[new.SOPClassUID].SeriesInstanceUID
    comments = texts(narrative)
    assert any(t.startswith("Image analysed: postero-anterior view") for t in comments)  # PA over AP
    assert any(t.startswith("Image set aside: antero-posterior view") for t in comments)
    assert evidence_uids(narrative) == {ap, pa}
    with rt.read_session() as session:
        exports = list(session.scalars(select(Job).where(Job.kind == "export")))
    # the first version's exports are not queued again: only the new objects are sent, and the first
    # version's sends that had not happened yet (no exporter runs here) are cancelled
    assert {j.sop_instance_uid for j in exports} - exports_before == {o.SOPInstanceUID for o in second}
    assert len(exports) == len(exports_before) + len(second)
    assert {j.state for j in exports if j.sop_instance_uid in exports_before} == {JobState.CANCELLED.value}
    assert {j.state for j in exports if j.sop_instance_uid not in exports_before} == {JobState.QUEUED.value}


def test_a_job_whose_set_changed_is_left_to_the_newer_one(runtime, tmp_path: Path) -> None:
    settings, rt = runtime
    settings.studies.settle_s = 0
    study = generate_uid()
    radiograph(tmp_path / "a.dcm", study, "PA", 1)
    ingest(settings, rt, tmp_path / "a.dcm")
    worker = Worker(settings, rt, FakePipeline(), worker_id="w")
    (stale,) = rt.queue.claim("w", [JobKind.ANALYSE])  # claimed, then a second image arrives
    radiograph(tmp_path / "b.dcm", study, "PA", 2, acquired="120500")
    b = ingest(settings, rt, tmp_path / "b.dcm")
    worker.process([stale])
    assert rt.queue.get(stale.id).payload.get("superseded") is True
    assert results(rt, study) == []
    analyse_when_settled(rt)
    (narrative,) = by_class(results(rt, study), NARRATIVE)
    assert any(t.startswith("Image analysed: postero-anterior view") and "chosen over 1" in t for t in texts(narrative))
    with rt.read_session() as session:
        record = get_study(session, study)
        assert record.analysis["analysed"] == b  # the later acquisition of the same view
        assert record.version == 1


def test_a_study_with_no_frontal_view_is_not_interpreted(runtime, tmp_path: Path) -> None:
    settings, rt = runtime
    study = generate_uid()
    radiograph(tmp_path / "lat.dcm", study, "LATERAL", 1)
    lateral = ingest(settings, rt, tmp_path / "lat.dcm")
    analyse_when_settled(rt)
    objects = results(rt, study)
    assert [o.SOPClassUID for o in objects] == [NARRATIVE]  # no findings SR, no KOS, no GSPS
    (sr,) = objects
    assert "NOT INTERPRETED" in sr.SeriesDescription
    assert any(t.startswith("Not interpreted: no image of the study is a view the model reads") for t in texts(sr))
    assert evidence_uids(sr) == {lateral}
    assert not finding_items(sr)
    with rt.read_session() as session:
        job = session.scalars(select(Job).where(Job.kind == "analyse")).one()
    assert job.state == JobState.DONE.value


def test_the_settle_timer_survives_a_restart(runtime, tmp_path: Path) -> None:
    settings, rt = runtime
    settings.studies.settle_s = 2.0
    study = generate_uid()
    radiograph(tmp_path / "pa.dcm", study, "PA", 1)
    ingest(settings, rt, tmp_path / "pa.dcm")
    assert rt.queue.claim("w", [JobKind.ANALYSE]) == []  # not yet settled
    rt.close()
    again = ServerContext.open(settings)  # a new process after a crash: the due time is in the database
    try:
        with again.read_session() as session:
            record = get_study(session, study)
            (job,) = session.scalars(select(Job).where(Job.kind == "analyse")).all()
        assert record is not None and job.not_before == record.settle_due
        time.sleep(max(0.0, (job.not_before - job.created_at).total_seconds() - 1.0) + 1.2)
        assert len(again.queue.claim("w", [JobKind.ANALYSE])) == 1
    finally:
        again.close()
