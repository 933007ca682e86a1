"""Datasets built to cost the node memory (a deflate bomb, a JPEG frame far larger than its header),
sent to a ``pacs-node serve`` subprocess, and the legitimate Deflated and YBR images they must not be
confused with: DCMTK ``storescu -xd``, pydicom's writer, pydicom's own ``image_dfl.dcm``, native
YBR_FULL_422."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pydicom.encaps
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.data import get_testdata_file
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    generate_uid,
)
from pynetdicom import _config
from pynetdicom.sop_class import ComputedRadiographyImageStorage, SecondaryCaptureImageStorage

from pacs_node.dicom import datasets
from pacs_node.dicom.datasets import DatasetRefused, InflateLimits, check_frame_size, read_header
from tests.pacs_node.helpers import Node, make_cr, requestor, storescu
from tests.support import dcmtk

MiB = 1024 * 1024


def _header(rows: int, cols: int, syntax: str) -> pydicom.Dataset:
    ds = make_cr_dataset(rows, cols)
    ds.file_meta.TransferSyntaxUID = syntax
    return ds


def make_cr_dataset(rows: int, cols: int) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = ComputedRadiographyImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality, ds.BodyPartExamined = "Bomb^Test", "BOMB1", "CR", "CHEST"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, cols, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    return ds


def write_deflate_bomb(path: Path, inflated: int = 1024 * MiB) -> None:
    """A Deflated CR whose Pixel Data inflates to ``inflated`` bytes of zeros, in about 1/1000 of that.

    Built without compressing a gibibyte: after a full flush a deflate segment references nothing
    before it, so one compressed MiB of zeros repeated N times inflates to N MiB."""
    ds = make_cr_dataset(16384, inflated // (16384 * 2))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    header = DicomBytesIO()
    header.is_little_endian, header.is_implicit_VR = True, False
    write_dataset(header, ds)
    pixel_tag = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, inflated)
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    start = deflater.compress(header.getvalue() + pixel_tag) + deflater.flush(zlib.Z_FULL_FLUSH)
    segment = deflater.compress(bytes(MiB)) + deflater.flush(zlib.Z_FULL_FLUSH)
    with open(path, "wb") as f:
        f.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(f, ds.file_meta, enforce_standard=True)
        f.write(start)
        for _ in range(inflated // MiB):
            f.write(segment)
        f.write(deflater.flush())


def write_jpeg_liar(path: Path, claimed: int = 12000) -> None:
    """A 64 x 64 CR header around a baseline JPEG frame whose SOF says ``claimed`` x ``claimed``."""
    ds = _header(64, 64, JPEGBaseline8Bit)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, claimed, claimed, 1) + b"\x01\x11\x00"
    frame = b"\xff\xd8" + sof + b"\xff\xd9"
    ds.PixelData = pydicom.encaps.encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.save_as(path, enforce_file_format=True)


def _send(port: int, path: Path, sop_class: str, syntax: str) -> int:
    """C-STORE of ``path`` straight from the file (the sender inflates nothing) -> status."""
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        ae = requestor("MODALITY")
        ae.add_requested_context(sop_class, syntax)
        assoc = ae.associate("127.0.0.1", port, ae_title="PACSNODE")
        assert assoc.is_established
        try:
            return int(assoc.send_c_store(path).Status)
        finally:
            assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous


def _peak_rss(node: Node) -> int:
    assert node.proc is not None
    for line in Path(f"/proc/{node.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.fixture
def node(make_node) -> Iterator[Node]:  # noqa: ANN001
    yield make_node()


@pytest.mark.timeout(180)
def test_deflate_bomb_and_lying_jpeg_refused_while_serve_stays_small(node: Node, tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.dcm"
    write_deflate_bomb(bomb)
    assert bomb.stat().st_size < 2 * MiB
    liar = tmp_path / "liar.dcm"
    write_jpeg_liar(liar)
    status = _send(node.port, bomb, ComputedRadiographyImageStorage, DeflatedExplicitVRLittleEndian)
    assert 0xC200 <= status <= 0xC2FF, hex(status)
    assert 0xC200 <= _send(node.port, liar, ComputedRadiographyImageStorage, JPEGBaseline8Bit) <= 0xC2FF
    peak = _peak_rss(node)
    print(f"serve peak RSS after a 1 GiB deflate bomb: {peak / MiB:.0f} MiB")
    assert peak < 300 * MiB
    assert "decompression bomb" in node.log()
    assert "12000 x 12000" in node.log()
    assert node.query("SELECT COUNT(*) AS n FROM instances")[0]["n"] == 0


@pytest.mark.timeout(180)
def test_valid_deflated_and_ybr_images_are_accepted_and_analysed(node: Node, tmp_path: Path) -> None:
    dcmtk("storescu")
    plain = tmp_path / "plain.dcm"
    make_cr(plain, seed=1)
    # DCMTK compresses on the wire (-xd proposes Deflated first); the node stores what it received.
    sent = storescu(node.port, [plain], "-xd", "-R")
    assert sent.returncode == 0, sent.stdout + sent.stderr
    written = tmp_path / "pydicom-deflated.dcm"
    ds = make_cr(tmp_path / "tmp.dcm", seed=2)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(written, enforce_file_format=True)
    assert _send(node.port, written, ComputedRadiographyImageStorage, DeflatedExplicitVRLittleEndian) == 0
    stock = Path(get_testdata_file("image_dfl.dcm"))
    assert _send(node.port, stock, SecondaryCaptureImageStorage, DeflatedExplicitVRLittleEndian) == 0
    ybr = tmp_path / "ybr.dcm"
    source = pydicom.dcmread(get_testdata_file("SC_ybr_full_422_uncompressed.dcm"))
    source.Modality, source.BodyPartExamined = "CR", "CHEST"  # a chest radiograph, as a colour capture
    source.save_as(ybr, enforce_file_format=True)
    assert _send(node.port, ybr, SecondaryCaptureImageStorage, ExplicitVRLittleEndian) == 0
    rows = node.query("SELECT transfer_syntax_uid, disposition FROM instances WHERE origin = 'received'")
    assert len(rows) == 4
    assert sum(r["transfer_syntax_uid"] == DeflatedExplicitVRLittleEndian for r in rows) == 3
    node.wait_jobs(lambda jobs: len([j for j in jobs if j["kind"] == "analyse"]) == 3
                   and all(j["state"] == "done" for j in jobs if j["kind"] == "analyse"))


def test_header_of_a_bomb_costs_one_chunk(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.dcm"
    write_deflate_bomb(bomb, inflated=64 * MiB)
    with pytest.raises(DatasetRefused, match="bomb"):
        read_header(bomb, InflateLimits(max_bytes=32 * MiB, max_ratio=1e9))
    with pytest.raises(DatasetRefused, match="ratio"):
        read_header(bomb, InflateLimits(max_bytes=1024 * MiB, max_ratio=100))
    header = read_header(bomb, InflateLimits(max_bytes=1024 * MiB, max_ratio=1e9))
    assert header.dataset_bytes > 64 * MiB and "PixelData" not in header.dataset
    assert header.dataset.PatientID == "BOMB1"


def test_frame_size_of_jpeg_and_jpeg2000(tmp_path: Path) -> None:
    liar = tmp_path / "liar.dcm"
    write_jpeg_liar(liar, claimed=12000)
    ds = pydicom.dcmread(liar)
    with pytest.raises(DatasetRefused, match="12000 x 12000"):
        check_frame_size(ds, ds.PixelData)
    for name in ("JPEG2000.dcm", "SC_rgb_jpeg.dcm", "MR_small_jpeg_ls_lossless.dcm", "JPEG-lossy.dcm"):
        honest = pydicom.dcmread(get_testdata_file(name))
        check_frame_size(honest, honest.PixelData)  # its own size: accepted
        honest.Rows = int(honest.Rows) * 4
        with pytest.raises(DatasetRefused):
            check_frame_size(honest, honest.PixelData)


def _explicit(*elements: tuple[int, str, bytes]) -> Dataset:
    """A dataset read lazily, as pydicom reads a received one, from explicit VR little endian elements."""
    encoded = b"".join(struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr.encode(), len(value)) + value
                       for tag, vr, value in elements)
    return read_dataset(io.BytesIO(encoded), is_implicit_VR=False, is_little_endian=True)


def _converted(ds: Dataset) -> list[tuple[int, str, object]]:
    return [(int(elem.tag), elem.VR, elem.value) for elem in ds]


def test_every_element_is_decoded_or_known_to_decode() -> None:
    elements = [(0x00080060, "CS", b"CR"), (0x00100010, "PN", b"Doe^Jane"), (0x00280010, "US", b"\x40\0"),
                (0x00200013, "IS", b"12"), (0x00181164, "DS", b"0.1\\0.1 "), (0x00090010, "LO", b"ACME")]
    first, second = _explicit(*elements), _explicit(*elements)
    datasets.decode_every_element(first)
    datasets.decode_every_element(second)  # left raw where known to convert
    assert isinstance(second.get_item(0x00280010), RawDataElement)
    assert not isinstance(second.get_item(0x00090010), RawDataElement)  # private: always converted
    assert _converted(second) == _converted(first) == _converted(_explicit(*elements))


@pytest.mark.parametrize("bad", [(0x00280010, "US", b"\x40\0\0"), (0x00280010, "US", b"\x40")])
def test_an_element_that_does_not_decode_is_refused_even_after_good_ones(bad: tuple[int, str, bytes]) -> None:
    good = _explicit((0x00080060, "CS", b"CR"), (0x00280010, "US", b"\x40\0"))
    datasets.decode_every_element(good)
    for _ in range(2):  # a failure is never remembered as a success
        with pytest.raises(Exception, match="bytes per value"):
            datasets.decode_every_element(_explicit((0x00080060, "CS", b"CR"), bad))


def test_text_is_decoded_again_under_other_character_sets() -> None:
    name = (0x00100010, "PN", "Dürer^Anna".encode("latin-1"))
    latin = _explicit((0x00080005, "CS", b"ISO_IR 100"), name)
    datasets.decode_every_element(latin)
    utf8 = _explicit((0x00080005, "CS", b"ISO_IR 192"), name)
    with pytest.warns(UserWarning):  # not valid UTF-8: pydicom warns, so it was converted again
        datasets.decode_every_element(utf8)
    assert _converted(latin)[1][2] == "Dürer^Anna"


@pytest.mark.parametrize("text_bytes", [100, 200 * 1024])
@pytest.mark.parametrize("rows", [64, 512])
def test_a_header_read_in_memory_is_the_header_read_from_the_file(tmp_path: Path, rows: int, text_bytes: int) -> None:
    """Headers that fit the in-memory probe and ones that do not (a long text before Pixel Data), of
    files smaller and larger than it: the same dataset, sizes and offsets as pydicom reading the file."""
    ds = make_cr_dataset(rows, rows)
    ds.add_new(0x00090010, "LO", "PACS NODE TEST")
    ds.add_new(0x00091000, "UT", "x" * text_bytes)
    ds.PixelData = b"\0" * (rows * rows * 2)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = tmp_path / "cr.dcm"
    ds.save_as(path, enforce_file_format=True)
    header = read_header(path, InflateLimits())
    with open(path, "rb") as fp:
        reference = pydicom.dcmread(fp, stop_before_pixels=True)
        pixel_offset = fp.tell()
    assert [(e.tag, e.VR, e.value) for e in header.dataset] == [(e.tag, e.VR, e.value) for e in reference]
    assert header.dataset.file_meta == reference.file_meta and header.dataset.filename == str(path)
    offset = 144 + reference.file_meta.FileMetaInformationGroupLength
    assert (header.pixel_offset, header.dataset_bytes) == (pixel_offset, path.stat().st_size - offset)
    assert header.dataset_head == path.read_bytes()[offset:offset + 6]


def test_a_header_whose_element_runs_past_the_probe_is_read_from_the_file(tmp_path: Path) -> None:
    """An element of undefined length whose delimiter lies beyond the in-memory probe, its value starting
    with the bytes of the Pixel Data tag: pydicom, out of probe, keeps nothing and stops inside that value.
    Only pydicom's own stop at Pixel Data counts, so this header is read from the file, whole."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out = io.BytesIO()
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(out, meta)
    out.write(struct.pack("<HH2sH", 0x0008, 0x0018, b"UI", 8) + b"1.2.3.4\0")
    out.write(struct.pack("<HH2sHL", 0x0009, 0x1001, b"OB", 0, 0xFFFFFFFF) + b"\xe0\x7f\x10\x00"
              + b"\0" * (70 * 1024) + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0))
    out.write(struct.pack("<HH2sH", 0x0010, 0x0010, b"PN", 4) + b"A^B ")
    out.write(struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, 8) + b"\0" * 8)
    path = tmp_path / "long.dcm"
    path.write_bytes(out.getvalue())
    header = read_header(path, InflateLimits())
    reference = pydicom.dcmread(path, stop_before_pixels=True)
    assert [e.tag for e in header.dataset] == [e.tag for e in reference] == [0x00080018, 0x00091001, 0x00100010]
    assert str(header.dataset.PatientName) == "A^B"
