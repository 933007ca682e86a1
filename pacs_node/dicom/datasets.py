"""Reading a dataset a peer sent without trusting it: bounded inflation, headers without pixel data, and
compressed frames whose size is checked against the header before anything decodes them.

pydicom reads a Deflated Explicit VR Little Endian file by inflating all of it in memory, even with
``stop_before_pixels``: a 1 MB file that inflates to 1 GiB costs 1 GiB (and the node's memory) before a
single attribute is seen. Here the deflate stream is inflated in chunks, its size counted as it goes and
refused past :class:`InflateLimits` (an absolute size and a ratio to the compressed size), so what a
bomb costs is one chunk of memory and the CPU time to reach the limit. Only the prefix before Pixel Data
is kept to be parsed.

Encapsulated pixel data (JPEG, JPEG-LS, JPEG 2000) carries its own frame size in the codestream. A
decoder allocates what the codestream says, not what Rows and Columns say, so a frame claiming
12000 x 12000 inside a 64 x 64 header is refused here, by reading a few hundred bytes of its first
fragment, instead of by a decoder after it has allocated hundreds of megabytes.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from functools import lru_cache
from typing import Any, BinaryIO

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset, FileDataset
from pydicom.filereader import _read_file_meta_info, read_dataset, read_file_meta_info, read_partial, read_preamble
from pydicom.tag import BaseTag
from pydicom.valuerep import AMBIGUOUS_VR

from pacs_node.dicom.plain_header import PlainHeader

#: Bytes of a file's first fragment searched for the codestream's frame header (SOF / SIZ).
_FRAGMENT_PROBE = 64 * 1024
#: Compressed bytes read per step of the inflation.
_INFLATE_IN = 64 * 1024
#: Most inflated bytes one step may produce (what a bomb costs in memory at a time).
_INFLATE_OUT = 1024 * 1024
#: Inflated bytes kept for the header: everything before Pixel Data must fit in this.
MAX_HEADER_BYTES = 16 * 1024 * 1024
#: Below this inflated size the ratio is not checked: a small dataset of zeros compresses very well.
_RATIO_FLOOR = 16 * 1024 * 1024
_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00009, 0x7FE00008})
#: Bytes read at once for the header of a dataset that is not Deflated (a radiograph's attributes take a
#: few kilobytes; more than this are read from the file).
_HEADER_PROBE = 64 * 1024
#: Bytes of the dataset kept in ``Header.dataset_head``: an explicit VR element's tag and VR.
_DATASET_HEAD = 6


class DatasetRefused(Exception):
    """The bytes cannot be accepted as a dataset; the message is safe to log (no patient data)."""


@dataclass(frozen=True)
class InflateLimits:
    """Bounds on a Deflated dataset (``[limits]`` in the config)."""

    #: Largest inflated dataset accepted.
    max_bytes: int = 256 * 1024 * 1024
    #: Largest inflated/compressed ratio accepted once the dataset exceeds 16 MiB inflated.
    max_ratio: float = 100.0


@dataclass(frozen=True)
class Header:
    """A dataset's attributes before Pixel Data, and where its dataset bytes are."""

    dataset: FileDataset
    #: Bytes of the dataset after the file meta, inflated for a Deflated file.
    dataset_bytes: int
    #: File offset of the Pixel Data element, ``None`` when there is none or the file is Deflated.
    pixel_offset: int | None
    #: The first bytes of the dataset after the file meta as stored (empty for a Deflated file), for the
    #: check that its encoding is the one the transfer syntax says, without opening the file again.
    dataset_head: bytes = b""


def _dataset_offset(meta: Dataset) -> int:
    """Offset of the dataset after the file meta: preamble, "DICM", (0002,0000) and the group it counts."""
    length = meta.get("FileMetaInformationGroupLength")
    if length is None:
        raise DatasetRefused("the file meta information has no group length")
    return 128 + 4 + 12 + int(length)


def _inflate(fp: BinaryIO, limits: InflateLimits, keep: int) -> tuple[bytes, int]:
    """Inflate the raw deflate stream at ``fp``'s position within ``limits``; the first ``keep``
    inflated bytes and the inflated total."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    kept = bytearray()
    total = consumed = 0
    while not inflater.eof:
        data = inflater.unconsumed_tail or fp.read(_INFLATE_IN)
        if not data:
            raise DatasetRefused("the deflated dataset is truncated")
        if not inflater.unconsumed_tail:
            consumed += len(data)
        try:
            out = inflater.decompress(data, _INFLATE_OUT)
        except zlib.error as exc:
            raise DatasetRefused(f"the deflated dataset is corrupt: {exc}") from None
        total += len(out)
        if len(kept) < keep:
            kept += out[: keep - len(kept)]
        if total > limits.max_bytes:
            raise DatasetRefused(f"the deflated dataset inflates to more than limits.max_inflated_bytes "
                                 f"({limits.max_bytes} bytes); refused as a decompression bomb")
        if total > _RATIO_FLOOR and total > limits.max_ratio * max(consumed, 1):
            raise DatasetRefused(f"the deflated dataset inflates more than limits.max_inflate_ratio "
                                 f"({limits.max_ratio:g}) times its size; refused as a decompression bomb")
    return bytes(kept), total


def _stop_at_pixels(tag: BaseTag, vr: str | None, length: int) -> bool:
    return int(tag) in _PIXEL_TAGS


def read_header(path: Path, limits: InflateLimits) -> Header:
    """The attributes before Pixel Data, decoded lazily as pydicom does; Pixel Data never read.

    A Deflated dataset is inflated once, in bounded chunks, all the way to its end (so a bomb or a
    truncated stream is refused now, before the sender is told its image is safe)."""
    in_memory = _read_header_in_memory(path)
    if in_memory is not None:
        return in_memory
    meta = read_file_meta_info(path)
    syntax = meta.get("TransferSyntaxUID")
    if syntax is None or not syntax.is_deflated:
        with open(path, "rb") as fp:
            ds = pydicom.dcmread(fp, stop_before_pixels=True)
            position = fp.tell()
            end = fp.seek(0, io.SEEK_END)
            offset = _dataset_offset(ds.file_meta) if "FileMetaInformationGroupLength" in ds.file_meta else 0
            fp.seek(offset)
            head = fp.read(_DATASET_HEAD)
        return Header(ds, end - offset, position if position < end else None, head)
    offset = _dataset_offset(meta)
    with open(path, "rb") as fp:
        preamble = fp.read(128)
        fp.seek(offset)
        prefix, total = _inflate(fp, limits, MAX_HEADER_BYTES)
    stopped = False

    def stop(tag: BaseTag, vr: str | None, length: int) -> bool:
        nonlocal stopped
        stopped = _stop_at_pixels(tag, vr, length)
        return stopped

    if total > len(prefix):
        # Only the prefix was kept: the header must end (at Pixel Data) inside it.
        dataset = read_dataset(io.BytesIO(prefix), is_implicit_VR=False, is_little_endian=True, stop_when=stop)
        if not stopped:
            raise DatasetRefused(f"the attributes before Pixel Data exceed {MAX_HEADER_BYTES} bytes")
    else:
        dataset = read_dataset(io.BytesIO(prefix), is_implicit_VR=False, is_little_endian=True,
                               stop_when=_stop_at_pixels)
    ds = FileDataset(str(path), dataset, preamble, meta, False, True)
    ds.set_original_encoding(False, True, dataset._character_set)
    return Header(ds, total, None)


def _read_header_in_memory(path: Path) -> Header | None:
    """:func:`read_header` of a dataset that is not Deflated from its first :data:`_HEADER_PROBE` bytes,
    read at once; ``None`` when the file must be read as a file (Deflated, attributes before Pixel Data
    beyond the probe, anything pydicom does not read cleanly: that path says why).

    pydicom reading a file asks the kernel for its position at every element (``tell`` on a buffered
    file is a system call): ~90 calls for a small header, twice the file opened. From memory the same
    bytes give the same dataset: it is used only when pydicom stopped at Pixel Data inside the probe, or
    the probe is the whole file."""
    with open(path, "rb", buffering=0) as fp:
        prefix = fp.read(_HEADER_PROBE)
        end = os.fstat(fp.fileno()).st_size
    buffer = io.BytesIO(prefix)
    stopped = False

    def stop(tag: BaseTag, vr: str | None, length: int) -> bool:
        nonlocal stopped
        stopped = _stop_at_pixels(tag, vr, length)
        return stopped

    try:
        if read_preamble(buffer, False) is None:
            return None
        syntax = _read_file_meta_info(buffer).get("TransferSyntaxUID")
        if syntax is not None and syntax.is_deflated:
            return None
        buffer.seek(0)
        ds = read_partial(buffer, stop_when=stop)  # what dcmread(stop_before_pixels=True) reads
    except Exception:  # noqa: BLE001 (read from the file, which raises what it raises)
        return None
    position = buffer.tell()
    # Out of probe before Pixel Data: pydicom warns and keeps what it read (an element of undefined
    # length whose end lies beyond the probe even leaves the position inside it), so only a stop at Pixel
    # Data, seen by pydicom itself, says the header is whole.
    if len(prefix) < end and not stopped:
        return None
    ds.filename = str(path)
    offset = _dataset_offset(ds.file_meta) if "FileMetaInformationGroupLength" in ds.file_meta else 0
    return Header(ds, end - offset, position if position < end else None, prefix[offset:offset + _DATASET_HEAD])


def check_inflated_size(path: Path, limits: InflateLimits) -> None:
    """Refuse a stored Deflated file whose dataset breaks ``limits`` before pydicom inflates it whole
    (what the worker does before it reads a file; cheap for any other transfer syntax)."""
    meta = read_file_meta_info(path)
    syntax = meta.get("TransferSyntaxUID")
    if syntax is None or not syntax.is_deflated:
        return
    offset = _dataset_offset(meta)
    with open(path, "rb") as fp:
        fp.seek(offset)
        _inflate(fp, limits, 0)


# -- compressed frames ----------------------------------------------------------------------------------

_SOF_MARKERS = frozenset({*range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC}) | {0xF7}  # JPEG SOFn, JPEG-LS SOF55


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """``(rows, columns)`` from a JPEG or JPEG-LS frame header, walking the marker segments."""
    if data[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # no length
            i += 2
            continue
        (length,) = struct.unpack_from(">H", data, i + 2)
        if marker in _SOF_MARKERS:
            if i + 9 > len(data):
                return None
            rows, cols = struct.unpack_from(">HH", data, i + 5)
            return rows, cols
        i += 2 + length
    return None


def _j2k_size(data: bytes) -> tuple[int, int] | None:
    """``(rows, columns)`` from a JPEG 2000 codestream's SIZ segment (raw, or inside a JP2 file)."""
    at = data.find(b"\xff\x4f\xff\x51")
    if at < 0 or at + 4 + 2 + 2 + 16 > len(data):
        return None
    xsiz, ysiz, xosiz, yosiz = struct.unpack_from(">IIII", data, at + 4 + 2 + 2)
    return ysiz - yosiz, xsiz - xosiz


def frame_size(fragment: bytes) -> tuple[int, int] | None:
    """``(rows, columns)`` a compressed frame declares, ``None`` when its format is not recognised."""
    return _jpeg_size(fragment) or _j2k_size(fragment)


def _first_fragment(value: bytes) -> bytes:
    """The start of the first fragment of an encapsulated Pixel Data value (after its offset table)."""
    position = 0
    for _ in range(2):  # the Basic Offset Table item, then the first fragment
        if position + 8 > len(value):
            return b""
        group, element, length = struct.unpack_from("<HHI", value, position)
        if (group, element) != (0xFFFE, 0xE000):
            return b""
        position += 8
        if _ == 0:
            position += length
    return value[position:position + _FRAGMENT_PROBE]


def check_frame_size(ds: Dataset, encapsulated_value_prefix: bytes) -> None:
    """Refuse a compressed image whose first frame declares another size than Rows x Columns.

    ``encapsulated_value_prefix`` is the start of the Pixel Data value (its items), a few kilobytes
    are enough."""
    try:
        header = (int(ds.Rows), int(ds.Columns))
    except (AttributeError, TypeError, ValueError):
        return
    check_frame_dimensions(header, encapsulated_value_prefix)


def check_frame_dimensions(header: tuple[int, int], encapsulated_value_prefix: bytes) -> None:
    """:func:`check_frame_size` of the header's ``(rows, columns)``."""
    declared = frame_size(_first_fragment(encapsulated_value_prefix))
    if declared is None:
        return
    if declared != header:
        raise DatasetRefused(f"the compressed frame is {declared[0]} x {declared[1]} but the header says "
                             f"{header[0]} x {header[1]}; not decoded")


def pixel_value_prefix(path: Path, pixel_offset: int) -> bytes:
    """The start of the encapsulated Pixel Data value of the file at ``path`` (the element at
    ``pixel_offset``: tag, explicit VR OB, reserved, undefined length, then the items)."""
    with open(path, "rb") as fp:
        fp.seek(pixel_offset + 12)
        return fp.read(_FRAGMENT_PROBE + 1024)


#: The values pydicom converted raw elements to, by (tag, VR, encoded value, implicit VR, little endian,
#: character sets): a second dataset holding the same element converts it the same way. Values are shared
#: between datasets, so only for reading (:func:`header_value`).
_CONVERTED: dict[tuple[object, ...], Any] = {}
#: Entries kept before the memo starts again (a few hundred kilobytes; a modality's images share most
#: of their elements, their UIDs and dates differ).
_CONVERTED_KEPT = 8192
#: Longest value remembered.
_CONVERTED_VALUE_BYTES = 128
_SPECIFIC_CHARACTER_SET = BaseTag(0x00080005)


def _memo_vr(raw: RawDataElement) -> str | None:
    """The VR pydicom converts ``raw`` with, if that depends on nothing but its own tag and bytes: not a
    private element (its VR may come from its private creator), not an ambiguous VR (resolved from other
    elements), not a sequence (items converted later) nor unknown."""
    if raw.tag >> 16 & 1 or raw.tag == _SPECIFIC_CHARACTER_SET or raw.length == 0xFFFFFFFF:
        return None
    vr = raw.VR
    if vr is None:
        try:
            vr = dictionary_VR(raw.tag)
        except KeyError:
            return None
    if vr in AMBIGUOUS_VR or vr in ("SQ", "UN"):
        return None
    return vr


def _character_sets(ds: Dataset) -> object:
    """The character sets ``ds``'s text elements are converted with, as a memo key (Specific Character
    Set converted first, as pydicom does)."""
    ds.get(_SPECIFIC_CHARACTER_SET)
    charset = ds.original_character_set or ds._character_set
    return tuple(charset) if isinstance(charset, list) else charset


def _conversion_key(raw: RawDataElement, charsets: object) -> tuple[object, ...] | None:
    """What the conversion of ``raw`` depends on, ``None`` when that is more than this (see :func:`_memo_vr`)
    or its value is too long to remember."""
    vr = _memo_vr(raw)
    value = raw.value
    if vr is None or value is None or len(value) > _CONVERTED_VALUE_BYTES:
        return None
    return (raw.tag, vr, value, raw.is_implicit_VR, raw.is_little_endian, charsets)


def _remember(key: tuple[object, ...], value: Any) -> None:
    if len(_CONVERTED) >= _CONVERTED_KEPT:
        _CONVERTED.clear()
    _CONVERTED[key] = value


def decode_every_element(ds: Dataset) -> None:
    """Convert every top-level element of ``ds`` from its raw form, as ``for _ in ds`` does: an element
    pydicom cannot convert raises now.

    pydicom converts lazily, ~25 us per element, and a chest radiograph's header has 60 to 200 of them,
    most of them the same bytes in every image from one modality. An element converted successfully
    before (same tag, VR, bytes, encoding and character sets; see :func:`_memo_vr` for what else its
    conversion could depend on, and those are always converted) is left raw: its conversion, whenever
    something reads it, gives what it gave before (and :func:`header_value` reads the value it gave).
    Assumes pydicom's configuration does not change while the process runs (the node never changes it)."""
    charsets = _character_sets(ds)
    for tag in ds.keys():
        raw = ds.get_item(tag)
        if not isinstance(raw, RawDataElement):
            continue
        key = _conversion_key(raw, charsets)
        if key is None:
            ds[tag]
        elif key not in _CONVERTED:
            _remember(key, ds[tag].value)


def header_value(ds: Dataset | PlainHeader, keyword: str) -> Any:
    """``ds.get(keyword)``: the element's value, ``None`` when absent; an element converted before in
    another dataset (same bytes, see :func:`decode_every_element`) is not converted again. The value may
    be shared with other datasets: read it, never change it. A header the receive path read without
    pydicom (:class:`pacs_node.dicom.plain_header.PlainHeader`) answers for the attributes it keeps."""
    if isinstance(ds, PlainHeader):
        return ds.get(keyword)
    tag = _keyword_tag(keyword)
    elem = ds.get_item(tag)
    if elem is None:
        return None
    if not isinstance(elem, RawDataElement):
        return elem.value
    key = _conversion_key(elem, _character_sets(ds))
    if key is None:
        return ds[tag].value
    try:
        return _CONVERTED[key]
    except KeyError:
        value = ds[tag].value
        _remember(key, value)
        return value


@lru_cache(maxsize=None)
def _keyword_tag(keyword: str) -> BaseTag:
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise ValueError(f"{keyword!r} is not a DICOM keyword")
    return BaseTag(tag)
