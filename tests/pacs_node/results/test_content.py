"""What the result objects say: references, geometry, thresholds, notices, identity and UIDs."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator

import pytest
from pydicom import Dataset
from pydicom.uid import (
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    EnhancedSRStorage,
    GrayscaleSoftcopyPresentationStateStorage,
    KeyObjectSelectionDocumentStorage,
    generate_uid,
)

from pacs_node.results import ResultOptions, build_result_objects, comprehensive_fallback
from pacs_node.results.common import evidence_header
from pacs_node.results.kos import build_kos, flagged_findings
from pacs_node.results.narrative_sr import build_narrative_sr
from pipelines.constants import CHEXPERT_LABELS
from pipelines.interface import FakePipeline, ImageResult, RegionResult
from tests.pacs_node.results.synthetic import make_cr


def items(ds: Dataset) -> Iterator[Dataset]:
    """Every content item of an SR tree, depth first."""
    stack = list(reversed(ds.get("ContentSequence", [])))
    while stack:
        item = stack.pop()
        yield item
        stack.extend(reversed(item.get("ContentSequence", [])))


def name(item: Dataset) -> str:
    return item.ConceptNameCodeSequence[0].CodeMeaning


def texts(ds: Dataset) -> list[str]:
    return [i.TextValue for i in items(ds) if i.ValueType == "TEXT"]


@pytest.fixture(scope="module")
def source() -> Dataset:
    return make_cr(patient_id="P-9", patient_name="Test^Patient", study_uid=generate_uid(),
                   study_date="20240101", accession="A9", rows=200, columns=160)


@pytest.fixture(scope="module")
def result(source: Dataset) -> ImageResult:
    return FakePipeline().analyse([source])[0]


@pytest.fixture(scope="module")
def objects(source: Dataset, result: ImageResult) -> list[Dataset]:
    """The default objects (AI SR, narrative SR, KOS, GSPS); built once, only read by the tests."""
    return build_result_objects(source, result, ResultOptions())


def narrative(source: Dataset, result: ImageResult) -> Dataset:
    """Only the narrative SR: the AI SR is the expensive one to build."""
    return build_narrative_sr(evidence_header(source, result), result, ResultOptions())


# -- the real radiograph -------------------------------------------------------------------------------


def test_real_sr_boxes_inside_grid_and_reference_the_source(real_source: Dataset,
                                                           real_objects: dict[str, Dataset]) -> None:
    assert (real_source.Columns, real_source.Rows) == (1841, 1955)
    sr = real_objects["ai-sr"]
    scoords = [i for i in items(sr) if i.ValueType == "SCOORD"]
    assert len(scoords) == 3  # FakePipeline reports three regions
    for scoord in scoords:
        assert scoord.GraphicType == "POLYLINE"
        xs, ys = scoord.GraphicData[0::2], scoord.GraphicData[1::2]
        assert all(0 <= x <= 1841 for x in xs) and all(0 <= y <= 1955 for y in ys)
        assert (xs[0], ys[0]) == (xs[-1], ys[-1])  # closed rectangle
        (image,) = scoord.ContentSequence
        assert image.RelationshipType == "SELECTED FROM"
        assert image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == real_source.SOPInstanceUID
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == real_source.SOPInstanceUID


def test_results_join_the_source_study_in_new_series(real_source: Dataset,
                                                    real_objects: dict[str, Dataset]) -> None:
    series = set()
    for ds in real_objects.values():
        assert ds.StudyInstanceUID == real_source.StudyInstanceUID
        assert ds.PatientID == real_source.PatientID and ds.PatientName == real_source.PatientName
        assert str(ds.PatientBirthDate) == str(real_source.PatientBirthDate)
        assert ds.AccessionNumber == real_source.AccessionNumber
        assert ds.StudyDescription == real_source.StudyDescription
        assert ds.SeriesInstanceUID != real_source.SeriesInstanceUID
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        series.add(ds.SeriesInstanceUID)
    assert len(series) == len(real_objects) - 1  # the fallback shares the AI SR's series


def test_gsps_inverts_a_monochrome1_source(real_source: Dataset, real_objects: dict[str, Dataset]) -> None:
    assert real_source.PhotometricInterpretation == "MONOCHROME1"
    gsps = real_objects["gsps"]
    assert gsps.PresentationLUTShape == "INVERSE"
    annotation = gsps.GraphicAnnotationSequence[0]
    assert annotation.ReferencedImageSequence[0].ReferencedSOPInstanceUID == real_source.SOPInstanceUID
    assert [t.UnformattedTextValue for t in annotation.TextObjectSequence] == \
        ["right lung", "left lung", "cardiac silhouette"]


# -- content -------------------------------------------------------------------------------------------


def test_object_classes(source: Dataset, result: ImageResult, objects: list[Dataset]) -> None:
    assert [o.SOPClassUID for o in objects] == [Comprehensive3DSRStorage, EnhancedSRStorage,
                                                KeyObjectSelectionDocumentStorage,
                                                GrayscaleSoftcopyPresentationStateStorage]
    objects = build_result_objects(source, result, ResultOptions(make_kos=False, make_gsps=False,
                                                                 make_narrative=False))
    assert [o.SOPClassUID for o in objects] == [Comprehensive3DSRStorage]


def test_ai_sr_findings_algorithm_and_sentences(result: ImageResult, objects: list[Dataset]) -> None:
    sr = objects[0]  # kos_threshold 0.5
    root_names = [name(i) for i in sr.ContentSequence]
    assert "Procedure reported" in root_names and "Observer Type" in root_names
    groups = [i for i in items(sr) if name(i) == "Measurement Group"]
    assert len(groups) == len(CHEXPERT_LABELS) + 3
    evaluations = {}
    for group in groups[:len(CHEXPERT_LABELS)]:
        finding = next(i for i in group.ContentSequence if name(i) == "Finding")
        label = finding.ConceptCodeSequence[0].CodeMeaning
        evaluation = next(i for i in group.ContentSequence
                          if i.ValueType == "CODE" and i.ConceptNameCodeSequence[0].CodeMeaning.lower()
                          == label.lower())
        evaluations[label] = evaluation.ConceptCodeSequence[0].CodeMeaning
        probability = next(i for i in group.ContentSequence if i.ValueType == "NUM")
        assert name(probability) == "Probability"
        assert 0.0 <= float(probability.MeasuredValueSequence[0].NumericValue) <= 1.0
        version = next(i for i in group.ContentSequence if name(i) == "Algorithm Version")
        assert version.TextValue == "fake 0"
    assert evaluations["Cardiomegaly"] == "Present"  # FakePipeline: 0.9
    assert evaluations["Pulmonary edema"] == "Absent"  # 0.05, SNOMED CT coded
    sentences = [i.TextValue for g in groups[len(CHEXPERT_LABELS):] for i in g.ContentSequence
                 if i.ValueType == "TEXT" and name(i) == "Finding"]
    assert sentences == [r.sentence for r in result.selected_regions]
    purposes = [i.ConceptCodeSequence[0].CodeMeaning for i in items(sr)
                if name(i) == "Geometric purpose of region"]
    assert purposes == ["Bounded by"] * 3


def test_not_for_clinical_use_is_stated(source: Dataset, result: ImageResult, objects: list[Dataset]) -> None:
    ai, report, *_ = objects
    assert not result.clinical_use
    assert any("NOT FOR CLINICAL USE" in t for t in texts(report))
    assert any("NOT FOR CLINICAL USE" in t for t in texts(ai))
    assert "NOT FOR CLINICAL USE" in ai.SeriesDescription
    clinical = dataclasses.replace(result, clinical_use=True)
    ai, report, *_ = build_result_objects(source, clinical, ResultOptions(make_kos=False, make_gsps=False))
    assert not any("NOT FOR CLINICAL USE" in t for t in texts(report) + texts(ai))


def test_narrative_sentences_point_at_their_regions(source: Dataset, result: ImageResult) -> None:
    with_impression = dataclasses.replace(result, impression="No acute findings.")
    report = narrative(source, with_impression)
    assert report.ContentTemplateSequence[0].TemplateIdentifier == "2000"
    sections = {name(i): i for i in report.ContentSequence if i.ValueType == "CONTAINER"}
    assert set(sections) == {"Findings", "Impressions"}
    findings = sections["Findings"].ContentSequence
    assert [f.TextValue for f in findings] == [r.sentence for r in result.selected_regions]
    for finding, region in zip(findings, result.selected_regions, strict=True):
        image, scoord = finding.ContentSequence
        assert image.RelationshipType == scoord.RelationshipType == "INFERRED FROM"
        assert image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        x0, y0, x1, y1 = region.box
        assert list(scoord.GraphicData) == pytest.approx([x0, y0, x1, y0, x1, y1, x0, y1, x0, y0])
    assert sections["Impressions"].ContentSequence[0].TextValue == "No acute findings."


def test_duplicate_sentences_are_one_finding_pointing_at_both_regions(source: Dataset,
                                                                     result: ImageResult) -> None:
    regions = [dataclasses.replace(r, sentence="Clear lungs.") if r.name in ("right lung", "left lung") else r
               for r in result.regions]
    report = "Clear lungs. The cardiac silhouette is unremarkable."
    findings = narrative(source, dataclasses.replace(result, regions=tuple(regions), report=report)
                         ).ContentSequence[-1].ContentSequence
    assert [f.TextValue for f in findings] == ["Clear lungs.", "The cardiac silhouette is unremarkable."]
    assert [i.ValueType for i in findings[0].ContentSequence] == ["IMAGE", "SCOORD", "SCOORD"]


def test_boxes_spilling_over_the_edge_are_clipped(source: Dataset, result: ImageResult) -> None:
    regions = list(result.regions)
    regions[0] = dataclasses.replace(regions[0], box=(-12.5, -3.0, 500.0, 90.0))
    scoord = next(i for i in items(narrative(source, dataclasses.replace(result, regions=tuple(regions))))
                  if i.ValueType == "SCOORD")
    assert list(scoord.GraphicData) == [0, 0, 160, 0, 160, 90, 0, 90, 0, 0]


def test_result_for_another_image_size_is_refused(source: Dataset, result: ImageResult) -> None:
    with pytest.raises(ValueError, match="source is 160x200"):
        build_result_objects(source, dataclasses.replace(result, source_rows=201), ResultOptions())


def test_source_without_uids_is_refused(source: Dataset, result: ImageResult) -> None:
    broken = copy.deepcopy(source)
    del broken.StudyInstanceUID
    with pytest.raises(ValueError, match="StudyInstanceUID"):
        build_result_objects(broken, result, ResultOptions())


# -- thresholds and KOS --------------------------------------------------------------------------------


def test_kos_flags_only_when_a_finding_reaches_its_threshold(source: Dataset, result: ImageResult,
                                                             objects: list[Dataset]) -> None:
    assert flagged_findings(result, ResultOptions(kos_threshold=0.5)) == ["Cardiomegaly"]
    assert flagged_findings(result, ResultOptions(kos_threshold=0.95)) == []
    per_finding = ResultOptions(kos_threshold=0.95, per_finding_thresholds={"Pneumothorax": 0.01})
    assert flagged_findings(result, per_finding) == ["Pneumothorax"]
    assert build_kos(evidence_header(source, result), result, ResultOptions(kos_threshold=0.95)) is None
    kos = next(o for o in objects if o.SOPClassUID == KeyObjectSelectionDocumentStorage)
    assert kos.ConceptNameCodeSequence[0].CodeMeaning == "Of Interest"
    assert any("Cardiomegaly 0.90" in t for t in texts(kos))
    referenced = [i for i in items(kos) if i.ValueType == "IMAGE"]
    assert [i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in referenced] == [source.SOPInstanceUID]


def test_no_finding_label_never_flags(source: Dataset, result: ImageResult) -> None:
    probs = {label: 0.0 for label in CHEXPERT_LABELS} | {"No Finding": 0.99}
    assert flagged_findings(dataclasses.replace(result, label_probs=probs), ResultOptions()) == []


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [({"kos_threshold": 1.5}, "results.kos_threshold"),
     ({"per_finding_thresholds": {"Cardiomegaly": -0.1}}, "results.per_finding_thresholds.Cardiomegaly"),
     ({"per_finding_thresholds": {"Cardiomegally": 0.5}}, "results.per_finding_thresholds"),
     ({"gsps_series_number": 0}, "results.gsps_series_number")],
)
def test_bad_options_name_their_key(kwargs: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        ResultOptions(**kwargs)


def test_no_regions_no_gsps_and_a_stated_empty_report(source: Dataset, result: ImageResult) -> None:
    empty = dataclasses.replace(
        result, regions=tuple(dataclasses.replace(r, selected=False, sentence=None) for r in result.regions),
        report="")
    built = build_result_objects(source, empty, ResultOptions())
    assert GrayscaleSoftcopyPresentationStateStorage not in [o.SOPClassUID for o in built]
    assert "The algorithm reported no findings for this image." in texts(built[1])


# -- identity ------------------------------------------------------------------------------------------


def test_uids_are_deterministic_per_source_and_bundle(source: Dataset, result: ImageResult,
                                                     objects: list[Dataset]) -> None:
    first = objects
    again = build_result_objects(source, result, ResultOptions())
    assert [o.SOPInstanceUID for o in first] == [o.SOPInstanceUID for o in again]
    assert [o.SeriesInstanceUID for o in first] == [o.SeriesInstanceUID for o in again]
    assert len({o.SOPInstanceUID for o in first}) == len(first)
    newer = build_result_objects(source, dataclasses.replace(result, model_version="1"), ResultOptions())
    assert not {o.SOPInstanceUID for o in first} & {o.SOPInstanceUID for o in newer}
    assert all(len(o.SOPInstanceUID) <= 64 for o in first)


def test_device_observer_and_contributing_equipment(source: Dataset, result: ImageResult) -> None:
    options = ResultOptions(device_name="CXR-AI-1", institution_name="General Hospital", device_serial_number="42")
    sr = build_result_objects(source, result, options)[0]
    observer = {name(i): i.get("TextValue") for i in sr.ContentSequence if i.RelationshipType == "HAS OBS CONTEXT"}
    assert observer["Device Observer Name"] == "CXR-AI-1"
    assert observer["Device Observer Serial Number"] == "42"
    equipment = sr.ContributingEquipmentSequence
    assert any(e.Manufacturer == options.manufacturer and e.InstitutionName == "General Hospital"
               for e in equipment)


def test_comprehensive_fallback(objects: list[Dataset]) -> None:
    ai, report, *_ = objects
    fallback = comprehensive_fallback(ai)
    assert fallback.SOPClassUID == ComprehensiveSRStorage
    assert fallback.file_meta.MediaStorageSOPClassUID == ComprehensiveSRStorage
    assert fallback.SOPInstanceUID != ai.SOPInstanceUID
    assert fallback.SOPInstanceUID == comprehensive_fallback(ai).SOPInstanceUID
    assert fallback.file_meta.MediaStorageSOPInstanceUID == fallback.SOPInstanceUID
    assert fallback.ContentSequence == ai.ContentSequence
    assert ai.SOPClassUID == Comprehensive3DSRStorage  # the original is untouched
    assert comprehensive_fallback(report) is None


def test_region_result_contract_is_what_we_read() -> None:
    """Guards the fields this package relies on, so an interface change fails here first."""
    fields = {f.name for f in dataclasses.fields(RegionResult)}
    assert {"name", "box", "selected", "sentence"} <= fields


def test_non_ascii_text_switches_to_utf8(result: ImageResult) -> None:
    import io

    from pydicom import dcmread

    source = make_cr(patient_id="P-8", patient_name="Müller^Jürgen", study_uid=generate_uid(),
                     study_date="20240101", accession="A8", rows=200, columns=160)
    source.SpecificCharacterSet = "ISO_IR 100"
    sentence = "Heart size ≥ upper limit of normal."
    regions = tuple(dataclasses.replace(r, sentence=sentence) if r.name == "cardiac silhouette" else r
                    for r in result.regions)
    report = narrative(source, dataclasses.replace(result, regions=regions))
    assert report.SpecificCharacterSet == "ISO_IR 192"
    buffer = io.BytesIO()
    report.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    again = dcmread(buffer)
    assert sentence in texts(again) and str(again.PatientName) == "Müller^Jürgen"
    plain = narrative(source, result)
    assert plain.SpecificCharacterSet == "ISO_IR 100"  # ASCII model text keeps the source's


@pytest.mark.filterwarnings("ignore:Invalid value for VR")  # the values are invalid on purpose
@pytest.mark.parametrize(
    ("keyword", "sent", "written"),
    [("PatientSex", "U", ""), ("PatientSex", "f", "F"), ("PatientBirthDate", "1960-01-31", "19600131"),
     ("StudyDate", "2024.01.15", "20240115"), ("StudyDate", "unknown", ""), ("StudyTime", "10:15", "1015"),
     ("StudyTime", "101500.123", "101500.123")],
)
def test_nonconformant_header_values_do_not_stop_results(result: ImageResult, keyword: str, sent: str,
                                                         written: str) -> None:
    source = make_cr(patient_id="P-6", patient_name="Odd^Header", study_uid=generate_uid(),
                     study_date="20240101", accession="A6", rows=200, columns=160)
    setattr(source, keyword, sent)
    report = narrative(source, result)
    assert str(report.get(keyword) or "") == written
    assert str(source.get(keyword)) == sent  # the caller's dataset is not touched


@pytest.mark.parametrize(("image_laterality", "series_laterality"), [("B", None), ("U", None), ("L", "L")])
def test_gsps_series_laterality_takes_only_r_or_l(source: Dataset, result: ImageResult, image_laterality: str,
                                                  series_laterality: str | None) -> None:
    """Image Laterality B (both lungs: every PA chest) is not a General Series Laterality (R/L only)."""
    lateral = copy.deepcopy(source)
    lateral.ImageLaterality = image_laterality
    gsps = build_result_objects(lateral, result, ResultOptions())[-1]
    assert gsps.SOPClassUID == GrayscaleSoftcopyPresentationStateStorage
    assert (gsps.get("Laterality") or None) == series_laterality


def test_no_grayscale_presentation_state_for_a_colour_source(source: Dataset, result: ImageResult) -> None:
    colour = copy.deepcopy(source)
    colour.SamplesPerPixel, colour.PhotometricInterpretation = 3, "YBR_FULL_422"
    objects = build_result_objects(colour, result, ResultOptions())
    assert GrayscaleSoftcopyPresentationStateStorage not in {o.SOPClassUID for o in objects}
