"""C-FIND over received images and produced results, checked with pynetdicom and DCMTK findscu."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)

from tests.pacs_node.dicom.qr.conftest import QR_AET, Archive, Scp
from tests.pacs_node.helpers import requestor
from tests.support import dcmtk


def find(scp: Scp, query: Dataset, model=StudyRootQueryRetrieveInformationModelFind) -> tuple[list[Dataset], int]:
    """(pending identifiers, final status)."""
    ae = requestor("TESTSCU")
    ae.add_requested_context(model)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title=QR_AET)
    assert assoc.is_established
    try:
        answers, final = [], None
        for status, identifier in assoc.send_c_find(query, model):
            if status.Status == 0xFF00:
                answers.append(identifier)
            else:
                final = status.Status
        return answers, final
    finally:
        assoc.release()


def q(level: str, **keys: object) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def first_study(archive: Archive) -> tuple[str, list[Dataset]]:
    uid = sorted(archive.studies, key=lambda u: archive.studies[u][0].PatientID)[0]
    return uid, archive.studies[uid]


def test_study_level_counts_and_modalities(archive: Archive, qr_scp: Scp) -> None:
    uid, objects = first_study(archive)
    answers, status = find(qr_scp, q("STUDY", StudyInstanceUID=uid, PatientName="", ModalitiesInStudy="",
                                     NumberOfStudyRelatedInstances="", NumberOfStudyRelatedSeries="",
                                     StudyDate=""))
    assert status == 0x0000
    assert len(answers) == 1
    answer = answers[0]
    assert answer.StudyInstanceUID == uid
    assert str(answer.PatientName) == "Doe^Jane"
    assert set(answer.ModalitiesInStudy) == {"CR", "SR", "KO", "PR"}
    assert int(answer.NumberOfStudyRelatedInstances) == len(objects)
    assert int(answer.NumberOfStudyRelatedSeries) == len({o.SeriesInstanceUID for o in objects})


def test_modalities_in_study_matches_without_narrowing_counts(archive: Archive, qr_scp: Scp) -> None:
    answers, _ = find(qr_scp, q("STUDY", StudyInstanceUID="", ModalitiesInStudy="SR",
                                NumberOfStudyRelatedInstances=""))
    assert len(answers) == 2
    for answer in answers:
        assert int(answer.NumberOfStudyRelatedInstances) == len(archive.studies[answer.StudyInstanceUID])
    answers, _ = find(qr_scp, q("STUDY", StudyInstanceUID="", ModalitiesInStudy="MR"))
    assert answers == []


@pytest.mark.parametrize(
    ("keys", "expected_ids"),
    [
        ({"PatientName": "doe*"}, {"P-001"}),  # PN wildcard is case-insensitive
        ({"PatientName": "*R?E*"}, {"P-002"}),
        ({"PatientID": "p-001"}, set()),  # LO is case-sensitive
        ({"PatientID": "P-00?"}, {"P-001", "P-002"}),
        ({"StudyDate": "20240101-20240131"}, {"P-001"}),
        ({"StudyDate": "20240201-"}, {"P-002"}),
        ({"StudyDate": "-20240320"}, {"P-001", "P-002"}),
        ({"StudyDate": "20240320"}, {"P-002"}),
        ({"StudyTime": "1000-1030"}, {"P-001", "P-002"}),
        ({"StudyTime": "1100-"}, set()),
        ({"AccessionNumber": "ACC2"}, {"P-002"}),
        ({"PatientID": ""}, {"P-001", "P-002"}),  # universal matching
    ],
)
def test_study_matching(qr_scp: Scp, keys: dict[str, str], expected_ids: set[str]) -> None:
    answers, status = find(qr_scp, q("STUDY", **{"StudyInstanceUID": "", "PatientID": "", **keys}))
    assert status == 0x0000
    assert {a.PatientID for a in answers} == expected_ids


def test_uid_list_matching(archive: Archive, qr_scp: Scp) -> None:
    uids = list(archive.studies)
    answers, _ = find(qr_scp, q("STUDY", StudyInstanceUID="\\".join(uids)))
    assert {a.StudyInstanceUID for a in answers} == set(uids)


def test_series_level_results_by_study_and_modality(archive: Archive, qr_scp: Scp) -> None:
    uid, objects = first_study(archive)
    answers, _ = find(qr_scp, q("SERIES", StudyInstanceUID=uid, Modality="SR", SeriesInstanceUID="",
                                SeriesDescription="", NumberOfSeriesRelatedInstances=""))
    expected = {o.SeriesInstanceUID for o in objects if o.Modality == "SR"}
    assert {a.SeriesInstanceUID for a in answers} == expected
    assert all(a.Modality == "SR" and int(a.NumberOfSeriesRelatedInstances) == 1 for a in answers)
    assert any("AI findings" in a.SeriesDescription for a in answers)


def test_image_level(archive: Archive, qr_scp: Scp) -> None:
    uid, objects = first_study(archive)
    image = objects[0]
    answers, _ = find(qr_scp, q("IMAGE", StudyInstanceUID=uid, SeriesInstanceUID=image.SeriesInstanceUID,
                                SOPInstanceUID="", SOPClassUID="", InstanceNumber=None, Rows=None, Columns=None))
    assert len(answers) == 1
    assert answers[0].SOPInstanceUID == image.SOPInstanceUID
    assert (answers[0].Rows, answers[0].Columns) == (image.Rows, image.Columns)


def test_patient_root_patient_level(archive: Archive, qr_scp: Scp) -> None:
    answers, status = find(qr_scp, q("PATIENT", PatientID="P-001", PatientName="",
                                     NumberOfPatientRelatedStudies="", NumberOfPatientRelatedInstances=""),
                           model=PatientRootQueryRetrieveInformationModelFind)
    assert status == 0x0000
    assert len(answers) == 1
    uid, objects = first_study(archive)
    assert int(answers[0].NumberOfPatientRelatedStudies) == 1
    assert int(answers[0].NumberOfPatientRelatedInstances) == len(objects)


def test_bad_level_is_refused(qr_scp: Scp) -> None:
    _, status = find(qr_scp, q("PATIENT", PatientID=""))  # PATIENT is not a Study Root level
    assert status == 0xA900
    _, status = find(qr_scp, q("WARD", PatientID=""))
    assert status == 0xA900


@pytest.mark.parametrize("study_date", ["2026-01-01", "20261301x", "2026010", "20260101-2026", "yesterday"])
def test_a_malformed_study_date_is_a_failure_not_an_empty_answer(qr_scp: Scp, study_date: str) -> None:
    answers, status = find(qr_scp, q("STUDY", StudyDate=study_date))
    assert (answers, status) == ([], 0xA900)


def test_well_formed_dates_and_times_still_match(qr_scp: Scp) -> None:
    for keys in ({"StudyDate": "19000101-"}, {"StudyDate": "-20991231"}, {"StudyTime": "00-235959.999"}):
        _, status = find(qr_scp, q("STUDY", **keys))
        assert status == 0x0000, keys


def test_dcmtk_findscu_finds_results_by_study_and_modality(archive: Archive, qr_scp: Scp,
                                                           tmp_path: Path) -> None:
    uid, objects = first_study(archive)
    out = tmp_path / "rsp"
    out.mkdir()
    run = subprocess.run(
        [dcmtk("findscu"), "-S", "-aec", QR_AET, "-X", "-od", str(out),
         "-k", "QueryRetrieveLevel=SERIES", "-k", f"StudyInstanceUID={uid}", "-k", "Modality=SR",
         "-k", "SeriesInstanceUID", "-k", "SeriesDescription", "127.0.0.1", str(qr_scp.port)],
        capture_output=True, text=True, timeout=60,
    )
    assert run.returncode == 0, run.stderr
    answers = [dcmread(p) for p in sorted(out.iterdir())]
    assert {a.SeriesInstanceUID for a in answers} == {o.SeriesInstanceUID for o in objects if o.Modality == "SR"}
    assert all(a.StudyInstanceUID == uid and a.Modality == "SR" for a in answers)
