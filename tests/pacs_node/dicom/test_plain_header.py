"""The receive path's plain header reader against pydicom's: over real, phantom, pydicom's own and
deliberately odd datasets, and thousands of truncations and corruptions of them, the header the listener
reads (values, row, acceptance decision, refusal and its words) is the one pydicom's reading gives."""

from __future__ import annotations

import random
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pydicom
import pytest
from pydicom.data import get_testdata_files
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless, generate_uid

from pacs_node.dicom.datasets import InflateLimits, header_value
from pacs_node.dicom.plain_header import KEYWORDS, PlainHeader, read_plain_header
from pacs_node.work import ingest
from pacs_node.work.acceptance import decide
from pipelines.phantoms.dicom import phantom_dataset

LIMITS = InflateLimits()


def _normalised(value: Any) -> Any:
    if value is None:
        return None
    return int(value) if isinstance(value, int) else str(value)


def _outcome(path: Path, expected_uid: str | None = None) -> tuple[Any, ...]:
    """What the receive path makes of the file: the refusal's words, or the row, the decision and every
    kept value; and whether it was read without pydicom."""
    try:
        ds, record = ingest.read_header(path, expected_uid, LIMITS)
    except ingest.UnreadableDataset as exc:
        return ("refused", str(exc)), False
    values = {keyword: _normalised(header_value(ds, keyword)) for keyword in KEYWORDS}
    return ("read", record, decide(ds), values), isinstance(ds, PlainHeader)


def _by_pydicom(path: Path, expected_uid: str | None = None) -> tuple[Any, ...]:
    with mock.patch.object(ingest, "read_plain_header", return_value=None):
        outcome, plain = _outcome(path, expected_uid)
    assert not plain
    return outcome


def _same(path: Path, expected_uid: str | None = None) -> bool:
    """Assert the two readers agree on ``path``; whether the plain reader answered."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outcome, plain = _outcome(path, expected_uid)
        reference = _by_pydicom(path, expected_uid)
    assert outcome == reference, path
    if plain:
        assert outcome[0] == "read"
    return plain


def _cr(**changes: Any) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName, ds.PatientID, ds.Modality, ds.BodyPartExamined = "Plain^Reader", "PR1", "CR", "CHEST"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20260101", "120000", "A1", "S1"
    ds.StudyDescription, ds.SeriesDescription = "Chest PA", "PA"
    ds.SeriesNumber, ds.InstanceNumber = 1, 2
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 4, 4, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = bytes(32)
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    if "PixelData" in ds:
        ds["PixelData"].VR = "OW"
    return ds


def _code_item(value: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "SCT", "Chest"
    return item


def _variants() -> Iterator[tuple[str, Dataset, dict[str, Any]]]:
    """Odd but legal (and some illegal) datasets: (name, dataset, save_as options)."""
    explicit: dict[str, Any] = {}
    yield "plain", _cr(), explicit
    yield "implicit", _cr(), {"implicit": True}
    yield "latin-1 name", _cr(PatientName="Müller^Jürgen"), explicit
    yield "utf-8", _cr(SpecificCharacterSet="ISO_IR 192", PatientName="Müller^Jürgen",
                       StudyDescription="Thorax \u00e9"), explicit
    yield "no charset", _cr(SpecificCharacterSet=None), explicit
    yield "japanese", _cr(SpecificCharacterSet=["", "ISO 2022 IR 87"], PatientName="Yamada^Tarou=山田^太郎"), explicit
    yield "greek", _cr(SpecificCharacterSet="ISO_IR 126", StudyDescription="Chest"), explicit
    yield "multi-valued description", _cr(StudyDescription=["Chest", "PA"]), explicit
    yield "multi-valued modality", _cr(Modality=["CR", "DX"]), explicit
    yield "empty values", _cr(PatientName="", StudyDescription="", SeriesNumber="", Modality=""), explicit
    yield "padded", _cr(AccessionNumber="A1 ", StudyID=" S1"), explicit
    yield "control characters", _cr(PatientID="P\x00Q", StudyDescription="Chest\tPA"), explicit
    yield "long description", _cr(StudyDescription="C" * 90), explicit
    yield "no body part", _cr(BodyPartExamined=None), explicit
    yield "hand", _cr(BodyPartExamined="HAND"), explicit
    yield "secondary capture", _cr(SOPClassUID="1.2.840.10008.5.1.4.1.1.7", Modality="OT"), explicit
    yield "no SOP instance", _cr(SOPInstanceUID=None), explicit
    yield "no study", _cr(StudyInstanceUID=None), explicit
    yield "long uid", _cr(SeriesInstanceUID="1." * 40), explicit
    yield "no rows", _cr(Rows=None), explicit
    yield "no bits allocated", _cr(BitsAllocated=None), explicit
    yield "no samples", _cr(SamplesPerPixel=None), explicit
    yield "too small for its pixels", _cr(Rows=400), explicit
    yield "ybr 422", _cr(PhotometricInterpretation="YBR_FULL_422", SamplesPerPixel=3, BitsAllocated=8,
                         PixelData=bytes(32)), explicit
    yield "frames", _cr(NumberOfFrames=2, PixelData=bytes(64)), explicit
    yield "frames too few bytes", _cr(NumberOfFrames=30, PixelData=bytes(64)), explicit
    yield "one bit", _cr(BitsAllocated=1, BitsStored=1, HighBit=0, PixelData=bytes(2)), explicit
    yield "no pixel data", _cr(PixelData=None), explicit
    yield "IS fraction", _cr(SeriesNumber=864), {"replace": (b"864 ", b"1.5 ")}
    yield "IS text", _cr(InstanceNumber=97531), {"replace": (b"97531 ", b"x     ")}
    yield "IS plus", _cr(InstanceNumber="+7"), explicit
    yield "DS", _cr(PixelSpacing=[0.1, 0.2], WindowCenter="1.5E3", KVP="120"), explicit
    yield "DS text", _cr(KVP="1234"), {"replace": (b"1234", b"lots")}
    yield "DS infinite", _cr(KVP="1234567"), {"replace": (b"1234567 ", b"1e999   ")}
    yield "US odd length", _cr(HighBit=11), {"replace": (b"\x28\x00\x02\x01US\x02\x00", b"\x28\x00\x02\x01US\x01\x00")}
    yield "sequence", _cr(AnatomicRegionSequence=Sequence([_code_item("51185008")])), explicit
    nested = _code_item("1")
    nested.ModifierCodeSequence = Sequence([_code_item("2"), _code_item("3")])
    yield "nested sequence", _cr(AnatomicRegionSequence=Sequence([nested]), ViewCodeSequence=Sequence([])), explicit
    yield "nested sequence implicit", _cr(AnatomicRegionSequence=Sequence([nested])), {
        "enforce_file_format": True, "implicit_vr": True}
    private = _cr()
    private.private_block(0x0011, "ACME", create=True).add_new(0x01, "US", 3)
    private.private_block(0x0011, "ACME").add_new(0x02, "UT", "text")
    yield "private", private, explicit
    yield "private implicit", private, {"implicit": True}
    known = _cr()
    block = known.private_block(0x0009, "GEMS_ACQU_01", create=True)
    block.add_new(0x25, "US", 7)
    block.add_new(0x24, "DS", "1.5")
    block.add_new(0x3E, "US", 9)
    yield "known private implicit", known, {"implicit": True}
    yield "known private implicit, wrong length", known, {
        "implicit": True, "replace": (b"\x09\x00\x3e\x10\x02\x00\x00\x00\x09\x00",
                                      b"\x09\x00\x3e\x10\x03\x00\x00\x00\x09\x00\x00")}
    yield "UN element", _cr(DeviceSerialNumber="SERIAL1"), {
        "replace": (b"\x18\x00\x00\x10LO\x08\x00SERIAL1 ", b"\x18\x00\x00\x10UN\x00\x00\x08\x00\x00\x00SERIAL1 ")}
    yield "UN modality", _cr(Modality="CR"), {
        "replace": (b"\x08\x00\x60\x00CS\x02\x00CR", b"\x08\x00\x60\x00UN\x00\x00\x02\x00\x00\x00CR")}
    wrong = _cr()
    wrong.add_new(0x00280034, "IS", "1\\1")
    yield "other elements", wrong, explicit
    odd = _cr()
    odd.add_new(0x00181050, "DS", "0.1\\0.1")
    odd.add_new(0x00209161, "UI", generate_uid())
    odd.add_new(0x00080008, "CS", ["ORIGINAL", "PRIMARY"])
    odd.add_new(0x00080201, "SH", "+0100")
    odd.add_new(0x00200062, "CS", "L")
    odd.add_new(0x00280009, "AT", [0x00180050, 0x00181063])
    odd.add_new(0x00181164, "DS", ["0.1", "0.1"])
    odd.add_new(0x00283010, "SQ", Sequence([]))
    yield "assorted VRs", odd, explicit
    yield "name with empty groups", _cr(), {"replace": (b"Plain^Reader", b"Doe^John==  ")}
    yield "referring name with groups", _cr(ReferringPhysicianName="A^B=C^D"), explicit
    yield "transfer syntax as LO", _cr(), {"replace": (b"\x02\x00\x10\x00UI", b"\x02\x00\x10\x00LO")}
    rle = _cr(PixelData=encapsulate([bytes(64)]))
    rle["PixelData"].VR = "OB"
    yield "transfer syntax with a tab", rle, {
        "syntax": RLELossless, "replace": (b"1.2.840.10008.1.2.5\x00", b"1.2.840.10008.1.2.5\t")}
    yield "encapsulated", rle, {"syntax": RLELossless}


def _write(tmp_path: Path, name: str, ds: Dataset, options: dict[str, Any]) -> Path:
    path = tmp_path / f"{name.replace(' ', '-')}.dcm"
    ds.file_meta.TransferSyntaxUID = options.get("syntax") or (
        ImplicitVRLittleEndian if options.get("implicit") else ExplicitVRLittleEndian)
    ds.save_as(path, enforce_file_format=True)
    if "replace" in options:
        old, new = options["replace"]
        data = path.read_bytes()
        assert data.count(old) == 1
        path.write_bytes(data.replace(old, new))
    return path


def _bytes_variants(data: bytes, seed: int, count: int) -> Iterator[bytes]:
    """Truncations and single-byte corruptions of ``data``: every byte of the file meta and the first
    elements, then ``count`` at random; each byte replaced by a random one and, in turn, by one of those
    that mean something (NUL, 0xFF, a backslash, ESC, a space, an uppercase letter)."""
    rng = random.Random(seed)
    for cut in sorted({*range(128, min(len(data), 420), 5), *(rng.randrange(len(data)) for _ in range(count // 2))}):
        yield data[:cut]
    special = (0x00, 0xFF, ord("\\"), 0x1B, 0x20, ord("Q"))
    positions = [*range(128, min(len(data), 640))] + [rng.randrange(128, len(data)) for _ in range(count)]
    for i, position in enumerate(positions):
        for byte in {rng.randrange(256), special[i % len(special)]}:
            if data[position] != byte:
                yield data[:position] + bytes([byte]) + data[position + 1:]


def test_the_datasets_a_node_receives_are_read_without_pydicom_and_alike(tmp_path: Path,
                                                                        real_dicom_dir: Path) -> None:
    files = sorted(real_dicom_dir.glob("*.dcm"))
    for seed, (modality, photometric, bits) in enumerate([("CR", "MONOCHROME2", 12), ("DX", "MONOCHROME1", 16)]):
        path = tmp_path / f"phantom-{seed}.dcm"
        phantom_dataset(seed, 96, modality=modality, photometric=photometric, bits_stored=bits).save_as(
            path, enforce_file_format=True)
        files.append(path)
    assert files
    for path in files:
        assert _same(path), path  # read without pydicom, and alike
        uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        assert _same(path, uid)
        assert _same(path, uid + ".9") is False  # a refusal is pydicom's


def test_odd_datasets_are_read_alike(tmp_path: Path) -> None:
    plain = {}
    for name, ds, options in _variants():
        plain[name] = _same(_write(tmp_path, name, ds, options))
    # what the plain reader must answer itself (the rest it may leave to pydicom)
    for name in ("plain", "implicit", "latin-1 name", "utf-8", "no charset", "empty values", "padded",
                 "control characters", "long description", "no body part", "hand", "secondary capture",
                 "ybr 422", "frames", "one bit", "no pixel data", "DS", "sequence", "nested sequence",
                 "nested sequence implicit", "private", "private implicit", "known private implicit",
                 "assorted VRs", "encapsulated"):
        assert plain[name], name
    for name in ("japanese", "multi-valued description", "no SOP instance", "too small for its pixels",
                 "frames too few bytes", "IS fraction", "IS text", "DS text", "DS infinite", "US odd length",
                 "UN element", "UN modality", "known private implicit, wrong length", "name with empty groups",
                 "referring name with groups", "transfer syntax as LO", "transfer syntax with a tab"):
        assert not plain[name], name


def test_pydicom_test_files_are_read_alike(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        files = [Path(f) for f in get_testdata_files("*.dcm") if Path(f).stat().st_size < 1024 * 1024]
    assert len(files) > 20
    for path in files:
        _same(path)


@pytest.mark.parametrize("name", ["plain", "implicit", "nested sequence", "private", "known private implicit",
                                  "assorted VRs", "utf-8"])
def test_truncated_and_corrupted_datasets_are_read_alike(tmp_path: Path, name: str) -> None:
    ds, options = next((d, o) for n, d, o in _variants() if n == name)
    data = _write(tmp_path, name, ds, options).read_bytes()
    path = tmp_path / "variant.dcm"
    answered = 0
    for variant in _bytes_variants(data, zlib.crc32(name.encode()), 300):
        path.write_bytes(variant)
        answered += _same(path)
    assert answered > 100  # most corruptions of a value leave a header the plain reader reads


def test_real_and_phantom_corruptions_are_read_alike(tmp_path: Path, real_dicom_dir: Path) -> None:
    sources = [real_dicom_dir / "RG1_UNCR.dcm"]
    phantom = tmp_path / "phantom.dcm"
    phantom_dataset(3, 64).save_as(phantom, enforce_file_format=True)
    sources.append(phantom)
    path = tmp_path / "variant.dcm"
    for source in sources:
        data = source.read_bytes()[:8192]  # the header, and a little pixel data
        for variant in _bytes_variants(data, 7, 150):
            path.write_bytes(variant)
            _same(path)


def test_plain_header_answers_only_what_it_keeps(tmp_path: Path) -> None:
    path = _write(tmp_path, "plain", _cr(), {})
    header = read_plain_header(path)
    assert header is not None
    assert header.get("Modality") == "CR" and header.get("ProtocolName") is None
    with pytest.raises(KeyError):
        header.get("PatientComments")
