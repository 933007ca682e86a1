"""Result objects from templates are the objects highdicom builds: for studies of many shapes, a template
made from two studies fills in a third that is identical, element by element and byte for byte, to
highdicom's build of it at the same instant; and dciodvfy finds nothing in them."""

from __future__ import annotations

import copy
import dataclasses
import datetime
import io
import threading
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom import DataElement, Dataset, config
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid
from pydicom.valuerep import DSfloat

from pacs_node.results import ResultOptions, StudyReport, build_study_objects
from pacs_node.results.build import single_image_report
from pacs_node.results.builder_pool import ResultBuilders
from pacs_node.results.common import evidence_header
from pacs_node.results.templates import TEMPLATES, TemplateCache, _pydicom_element, _value_bytes, encode, shape
from pacs_node.work.instance_record import instance_record
from pipelines.interface import FakePipeline, ImageResult, NotInterpreted
from tests.pacs_node.results.synthetic import make_cr
from tests.pacs_node.results.test_validators import validate_with_dciodvfy

#: The instant both ways build at.
NOW = datetime.datetime(2026, 3, 4, 5, 6, 7, 890123)


def _source(i: int, *, name: str = "Test^Patient", charset: str | None = None, study_uid: str | None = None,
            rows: int = 200, columns: int = 160) -> Dataset:
    ds = make_cr(patient_id=f"P-{i}", patient_name=name, study_uid=study_uid or generate_uid(),
                 study_date=f"2024010{i + 1}", accession=f"A{i}{i}", rows=rows + 10 * i, columns=columns + 6 * i)
    ds.StudyTime = f"10{i:02d}00"
    ds.PatientBirthDate = f"196{i}0101"
    if charset:
        ds.SpecificCharacterSet = charset
    return ds


def _result(source: Dataset, i: int, **changes: object) -> ImageResult:
    result = FakePipeline().analyse([source])[0]
    assert isinstance(result, ImageResult)
    probs = {label: p + 0.01 * i for label, p in result.label_probs.items()}
    regions = tuple(dataclasses.replace(r, box=tuple(v + i for v in r.box)) for r in result.regions)
    return dataclasses.replace(result, label_probs=probs, regions=regions, **changes)


def _single(i: int, **source_kwargs: object) -> StudyReport:
    source = _source(i, **source_kwargs)  # type: ignore[arg-type]
    return single_image_report(source, _result(source, i))


def _utf8(i: int) -> StudyReport:
    source = _source(i, name=f"Sÿnthëtic^Jöhn{i}", charset="ISO_IR 192")
    result = _result(source, i)
    regions = list(result.regions)
    regions[0] = dataclasses.replace(regions[0], sentence=f"Heart size ≥ normal {i}.")
    report = " ".join(r.sentence for r in regions if r.selected and r.sentence)
    return single_image_report(source, dataclasses.replace(result, regions=tuple(regions), report=report))


def _latin1(i: int) -> StudyReport:
    source = _source(i, name=f"Müller^Jürgen{i}", charset="ISO_IR 100")
    return single_image_report(source, _result(source, i))


def _findings(i: int) -> StudyReport:
    """Other findings present, a sentence shared by two regions, an edge-spilling box, an impression, a
    bundle for clinical use, and a report that is more than its sentences."""
    source = _source(i)
    result = _result(source, i, clinical_use=True, impression=f"Normal chest {i}.",
                     report=f"Verbatim report {i}.")
    probs = dict(result.label_probs, Pneumothorax=0.7 + 0.01 * i, Edema=0.6 - 0.01 * i)
    regions = list(result.regions)
    regions[0] = dataclasses.replace(regions[0], box=(-5.0, -5.0, 3000.0, 4000.0), sentence=f"Clear {i}.")
    regions[8] = dataclasses.replace(regions[8], sentence=f"Clear {i}.")
    regions[3] = dataclasses.replace(regions[3], selected=True, sentence=None)
    return single_image_report(source, dataclasses.replace(result, label_probs=probs, regions=tuple(regions)))


def _sparse(i: int) -> StudyReport:
    """A source without the optional attributes (no birth date, description, referring physician...)."""
    source = _source(i)
    for keyword in ("PatientBirthDate", "StudyDescription", "ReferringPhysicianName", "StudyID", "PatientSex",
                    "BodyPartExamined", "ViewPosition"):
        delattr(source, keyword)
    return single_image_report(source, _result(source, i))


def _monochrome1_with_sequences(i: int) -> StudyReport:
    source = _source(i)
    source.PhotometricInterpretation = "MONOCHROME1"
    other = Dataset()
    other.PatientID, other.TypeOfPatientID = f"OTHER-{i}", "TEXT"
    source.OtherPatientIDsSequence = Sequence([other])
    source.PatientAge, source.PatientWeight = f"0{60 + i}Y", str(70.5 + i)
    return single_image_report(source, _result(source, i))


def _options_case(i: int) -> StudyReport:
    return _single(i)


def _multi_image(i: int) -> StudyReport:
    """A two-image study (the lateral set aside), superseding a first analysis."""
    study = generate_uid()
    pa, lateral = _source(i, study_uid=study), _source(i, study_uid=study)
    lateral.ViewPosition = "LL"
    result = _result(pa, i)
    aside = ((evidence_header(lateral), f"lateral view {i}"),)
    first = StudyReport(evidence_header(pa, result), f"frontal {i}", aside, result, f"{study}:first")
    objects = build_study_objects(first, ResultOptions(), now=NOW)
    return StudyReport(first.analysed, first.analysed_reason, aside, result, f"{study}:second", version=2,
                       predecessors={"ai-sr": objects[0], "narrative-sr": objects[1]})


def _not_interpreted(i: int) -> StudyReport:
    source = _source(i)
    outcome = NotInterpreted(f"out of distribution {i}", "fake", "0", False)
    return StudyReport(None, "", ((evidence_header(source), f"not a chest {i}"),), outcome, f"s{i}")


CASES: dict[str, tuple[Callable[[int], StudyReport], ResultOptions]] = {
    "default": (_single, ResultOptions()),
    "utf8": (_utf8, ResultOptions()),
    "latin1": (_latin1, ResultOptions()),
    "findings": (_findings, ResultOptions(kos_threshold=0.5, per_finding_thresholds={"Edema": 0.3},
                                          institution_name="Test Hospital")),
    "sparse": (_sparse, ResultOptions()),
    "monochrome1-sequences": (_monochrome1_with_sequences, ResultOptions()),
    "no-optional-objects": (_options_case, ResultOptions(make_kos=False, make_gsps=False)),
    "multi-image-superseding": (_multi_image, ResultOptions()),
    "not-interpreted": (_not_interpreted, ResultOptions()),
}


def _elements(ds: Dataset, path: str = "") -> list[tuple[str, str, object]]:
    """Every element of ``ds``, sequences' items recursively, as (path, VR, value)."""
    out: list[tuple[str, str, object]] = []
    for elem in ds:
        here = f"{path}{elem.tag}"
        if elem.VR == "SQ":
            out.append((here, "SQ", len(elem.value)))
            for n, item in enumerate(elem.value):
                out.extend(_elements(item, f"{here}[{n}]"))
        else:
            out.append((here, elem.VR, elem.value))
    return out


def _decoded(data: bytes) -> list[tuple[str, str, object]]:
    ds = pydicom.dcmread(io.BytesIO(data))
    return _elements(ds.file_meta) + _elements(ds)


def _trained(case: str) -> tuple[TemplateCache, Callable[[int], StudyReport], ResultOptions]:
    make, options = CASES[case]
    cache = TemplateCache()
    for i in (0, 1):  # seen once, then templated
        cache.encoded_study_objects(make(i), options)
    assert (cache.made, cache.refused) == (1, 0)
    return cache, make, options


@pytest.mark.parametrize("case", list(CASES))
def test_a_template_fills_in_what_highdicom_builds(case: str) -> None:
    cache, make, options = _trained(case)
    study = make(2)
    assert shape(study, options) == shape(make(0), options)
    templated = cache.encoded_study_objects(study, options, now=NOW)
    assert cache.hits == 1
    reference = [encode(obj) for obj in build_study_objects(study, options, now=NOW)]
    assert len(templated) == len(reference) >= 1
    for mine, theirs in zip(templated, reference, strict=True):
        assert _decoded(mine.data) == _decoded(theirs)
        assert mine.data == theirs
        assert mine.fields == instance_record(pydicom.dcmread(io.BytesIO(theirs)))


def test_templated_objects_pass_dciodvfy(tmp_path: Path) -> None:
    files = {}
    for case in ("default", "utf8", "findings", "multi-image-superseding", "not-interpreted"):
        cache, make, options = _trained(case)
        for n, built in enumerate(cache.encoded_study_objects(make(2), options)):
            files[f"{case}-{n}"] = tmp_path / f"{case}-{n}.dcm"
            files[f"{case}-{n}"].write_bytes(built.data)
    assert cache.hits == 1
    assert {name: validate_with_dciodvfy(path) for name, path in files.items()} == {name: [] for name in files}


def test_the_shape_holds_options_bundle_and_structure_not_values() -> None:
    options = ResultOptions()
    assert shape(_single(0), options) == shape(_single(1), options)
    assert shape(_single(0), options) != shape(_single(0), ResultOptions(kos_threshold=0.2))
    assert shape(_single(0), options) != shape(_utf8(0), options)
    other_bundle = _single(0)
    other_bundle = dataclasses.replace(other_bundle, outcome=dataclasses.replace(other_bundle.result,
                                                                                 model_version="1"))
    assert shape(other_bundle, options) != shape(_single(0), options)
    absent = _single(0)
    assert shape(dataclasses.replace(absent, outcome=dataclasses.replace(
        absent.result, label_probs=dict(absent.result.label_probs, Edema=0.99))), options) != shape(absent, options)


def test_options_of_another_shape_get_their_own_template() -> None:
    cache, make, options = _trained("default")
    other, study = ResultOptions(kos_threshold=0.01), make(2)
    built = cache.encoded_study_objects(study, other, now=NOW)
    assert cache.hits == 0 and cache.misses == 3
    assert [b.data for b in built] == [encode(o) for o in build_study_objects(study, other, now=NOW)]


def test_threads_share_a_cache() -> None:
    cache, make, options = _trained("default")
    studies = [make(i) for i in range(2, 8)]
    reference = [[encode(o) for o in build_study_objects(s, options, now=NOW)] for s in studies]
    results: dict[int, list[bytes]] = {}

    def run(n: int) -> None:
        results[n] = [b.data for b in cache.encoded_study_objects(studies[n], options, now=NOW)]

    threads = [threading.Thread(target=run, args=(n,)) for n in range(len(studies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [results[n] for n in range(len(studies))] == reference
    assert cache.hits == len(studies)


def test_an_error_is_the_same_both_ways() -> None:
    cache, make, options = _trained("default")
    study = make(2)
    regions = list(study.result.regions)
    regions[0] = dataclasses.replace(regions[0], box=(float("nan"), 0.0, 1.0, 1.0))
    broken = dataclasses.replace(study, outcome=dataclasses.replace(study.result, regions=tuple(regions)))
    with pytest.raises(ValueError) as templated:
        cache.encoded_study_objects(broken, options)
    with pytest.raises(ValueError) as reference:
        build_study_objects(broken, options)
    assert str(templated.value) == str(reference.value)


def test_file_meta_is_complete() -> None:
    cache, make, options = _trained("default")
    (first, *_) = cache.encoded_study_objects(make(2), options)
    ds = pydicom.dcmread(io.BytesIO(first.data))
    assert isinstance(ds.file_meta, FileMetaDataset)
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID


#: Set at build time: the worker's path dates its objects when it builds them.
_BUILD_TIME = {"InstanceCreationDate", "InstanceCreationTime", "ContentDate", "ContentTime",
               "PresentationCreationDate", "PresentationCreationTime", "ContributionDateTime"}


def test_the_worker_path_builds_from_templates() -> None:
    options = ResultOptions()
    studies = [_single(i) for i in range(4)]
    before = TEMPLATES.hits
    with ResultBuilders(0, options) as builders:
        built = builders.build(studies)
    assert TEMPLATES.hits - before >= 2
    last = built[-1]
    assert isinstance(last, list)
    reference = build_study_objects(studies[-1], options)
    assert [b.fields for b in last] == [instance_record(obj) for obj in reference]
    assert [_undated(b.data) for b in last] == [_undated(encode(obj)) for obj in reference]


def _undated(data: bytes) -> list[tuple[str, str, object]]:
    dated = _time_paths(data)
    return [e for e in _decoded(data) if e[0] not in dated]


def _time_paths(data: bytes) -> set[str]:
    ds = pydicom.dcmread(io.BytesIO(data))
    paths: set[str] = set()

    def walk(item: Dataset, path: str) -> None:
        for elem in item:
            here = f"{path}{elem.tag}"
            if elem.keyword in _BUILD_TIME:
                paths.add(here)
            if elem.VR == "SQ":
                for n, child in enumerate(elem.value):
                    walk(child, f"{here}[{n}]")

    walk(ds, "")
    return paths


@pytest.mark.parametrize("name", ["RG1_UNCR.dcm", "RG1_J2KR.dcm"])
def test_a_real_radiograph_is_templated(real_dicom_dir: Path, name: str) -> None:
    """A real CR header (ISO_IR 100, a copied Source Image Sequence of undefined length, window values
    highdicom rewrites as floats) templates, and its next patient's objects are highdicom's."""
    source = pydicom.dcmread(real_dicom_dir / name)

    def patient(i: int) -> StudyReport:
        image = copy.deepcopy(source)
        image.SOPInstanceUID, image.StudyInstanceUID = generate_uid(), generate_uid()
        image.PatientID, image.PatientName = f"REAL-{i}", f"Müller^Anna{i}"
        return single_image_report(image, _result(image, i))

    cache = TemplateCache()
    for i in (0, 1):
        cache.encoded_study_objects(patient(i), ResultOptions())
    assert (cache.made, cache.refused) == (1, 0)
    study = patient(2)
    templated = [b.data for b in cache.encoded_study_objects(study, ResultOptions(), now=NOW)]
    assert cache.hits == 1
    reference = [encode(obj) for obj in build_study_objects(study, ResultOptions(), now=NOW)]
    assert [_decoded(b) for b in templated] == [_decoded(b) for b in reference]
    assert templated == reference


@pytest.mark.parametrize(("vr", "value"), [
    ("SL", [160, 200]), ("SL", [-(1 << 31), (1 << 31) - 1]), ("SL", [7]), ("UL", [0, 0xFFFFFFFF]), ("US", 7),
    ("US", [1, 2, 3]), ("FD", [1.5, -2.25]), ("FL", 0.1), ("FD", 3.0), ("UI", "1.2.3"), ("UI", "1.2"),
    ("LO", "odd"), ("LO", "even"), ("CS", "A"), ("DA", "20260304"), ("PN", "Doe^Jane"), ("UT", "x" * 70001),
    ("SL", [1 << 31]), ("US", [-1]), ("US", 70000), ("LO", "Müller"), ("SS", [1, -2]),
    ("DS", DSfloat("1")), ("DS", DSfloat(" 2.5 ")), ("DS", DSfloat("-0")), ("DS", DSfloat("1e3")),
    ("DS", DSfloat("0.50000000000000")), ("DS", DSfloat(1.5)), ("DS", DSfloat(1 / 3, auto_format=True)),
    ("DS", DSfloat("0.333333333333333333", validation_mode=config.IGNORE)),
    ("DS", DSfloat(DSfloat("4096"))),
])
def test_values_written_without_pydicom_are_written_as_pydicom_writes_them(vr: str, value: object) -> None:
    """The slots' own encoding of plain values (ASCII text, floats, integers in range) is pydicom's, byte
    for byte; anything else (out of range, non-ASCII, SS) is pydicom's own."""
    try:
        expected: bytes | type[Exception] = _pydicom_element(DataElement(0x00700053, vr, value), ["iso8859"])
    except Exception as exc:  # noqa: BLE001 - then the templates' encoding must fail alike
        expected = type(exc)
    if isinstance(expected, bytes):
        assert _value_bytes(0x00700053, vr, value, ["iso8859"]) == expected
    else:
        with pytest.raises(expected):
            _value_bytes(0x00700053, vr, value, ["iso8859"])


def test_a_decimal_string_is_pydicom_s_under_raising_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where pydicom would refuse a decimal string it was read as (too long, validation raising), the
    templates' encoding refuses it too (and highdicom builds, or fails alike)."""
    monkeypatch.setattr(config.settings, "reading_validation_mode", config.RAISE)
    long = DSfloat("0.333333333333333333", validation_mode=config.IGNORE)
    with pytest.raises(OverflowError):
        _pydicom_element(DataElement(0x00281050, "DS", long), ["iso8859"])
    with pytest.raises(OverflowError):
        _value_bytes(0x00281050, "DS", long, ["iso8859"])
    assert _value_bytes(0x00281050, "DS", DSfloat("40"), ["iso8859"]) == _pydicom_element(
        DataElement(0x00281050, "DS", DSfloat("40")), ["iso8859"])
