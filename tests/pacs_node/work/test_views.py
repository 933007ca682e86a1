"""Which projection a radiograph is, from each kind of header evidence, and which image of a study is read."""

from __future__ import annotations

import pytest
from pydicom import Dataset
from pydicom.sequence import Sequence

from pacs_node.work.views import Candidate, View, choose, classify_view


def header(**attributes: object) -> Dataset:
    ds = Dataset()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def view_code(value: str, meaning: str) -> Sequence:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "SCT", meaning
    return Sequence([item])


@pytest.mark.parametrize("ds, name", [
    (header(ViewPosition="PA"), "PA"),
    (header(ViewPosition="AP"), "AP"),
    (header(ViewPosition="LL"), "LATERAL"),
    (header(ViewPosition="RL"), "LATERAL"),
    (header(ViewPosition="LLD"), "DECUBITUS"),
    (header(ViewPosition="RAO"), "OBLIQUE"),
    (header(ViewPosition="XYZ"), "OTHER"),
    (header(ViewCodeSequence=view_code("272479007", "postero-anterior")), "PA"),
    (header(ViewCodeSequence=view_code("399348003", "antero-posterior")), "AP"),
    (header(ViewCodeSequence=view_code("399173006", "left lateral")), "LATERAL"),
    (header(ViewCodeSequence=view_code("399162004", "cranio-caudal")), "OTHER"),
    (header(PatientOrientation=["L", "F"]), "PA"),
    (header(PatientOrientation=["R", "F"]), "AP"),
    (header(PatientOrientation=["A", "F"]), "LATERAL"),
    (header(PatientOrientation=["P", "FL"]), "LATERAL"),
    (header(), "UNKNOWN"),
])
def test_views_from_each_kind_of_evidence(ds: Dataset, name: str) -> None:
    assert classify_view(ds).name == name


def test_view_position_wins_over_weaker_evidence_and_the_evidence_is_named() -> None:
    view = classify_view(header(ViewPosition="LL", PatientOrientation=["L", "F"]))
    assert view == View("LATERAL", "View Position LL")
    assert "no View Position" in classify_view(header()).evidence


def test_pa_over_ap_then_the_latest_acquisition() -> None:
    choice = choose([Candidate("ap", View("AP", "View Position AP"), "20260101130000"),
                     Candidate("pa1", View("PA", "View Position PA"), "20260101120000"),
                     Candidate("pa2", View("PA", "View Position PA"), "20260101121000"),
                     Candidate("lat", View("LATERAL", "View Position LL"), "20260101122000")])
    assert choice.analysed == "pa2"
    assert choice.reason.startswith("postero-anterior view (View Position PA); chosen over 2")
    assert choice.set_aside["lat"].startswith("lateral view (View Position LL); the model reads PA, AP views only")
    assert "a later acquisition of the same view was analysed" in choice.set_aside["pa1"]
    assert "a preferred view was analysed" in choice.set_aside["ap"]


def test_an_unknown_view_is_read_only_when_no_image_is_known_frontal() -> None:
    unknown = Candidate("u", View("UNKNOWN", "no View Position, View Code Sequence or Patient Orientation"), "")
    alone = choose([unknown, Candidate("lat", View("LATERAL", "View Position LL"), "")])
    assert alone.analysed == "u" and "assumed frontal" in alone.reason
    assert choose([unknown, Candidate("ap", View("AP", "View Position AP"), "")]).analysed == "ap"


def test_a_bundle_reading_other_views_gets_them_and_none_is_a_stated_reason() -> None:
    lateral = Candidate("lat", View("LATERAL", "View Position LL"), "")
    assert choose([lateral], readable=("LATERAL",)).analysed == "lat"
    nothing = choose([lateral])
    assert nothing.analysed is None and nothing.reason == "no image of the study is a view the model reads (PA, AP)"
