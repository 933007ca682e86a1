"""Result objects from templates: highdicom builds each object's structure once per *shape*, and every
later study of that shape gets its encoded bytes by filling the per-image values into that structure.

Why: highdicom builds and pydicom encodes an image's four objects in ~200 ms of pure Python (deep copies,
content-tree searches, element-by-element encoding), while the part that differs from one image to the
next (UIDs, dates, patient and study attributes, references, probabilities, coordinates, text) is a few
hundred bytes.

How, and why it cannot silently go wrong:

* The *shape* of a study (:func:`shape`) is everything that can change an object's structure: the
  options, the bundle, which attributes each evidence header has (and which are empty), the values that
  select a structure (code strings, binary numbers such as Samples per Pixel, the SOP Class), which
  findings are present, which regions are selected and which have sentences, and which values are equal
  to which (equal series UIDs are grouped, equal sentences merged). It holds no patient data itself,
  only positions of values among their equals.
* The first time a shape is seen, highdicom builds the study as before. The second time, highdicom builds
  it and a *probe*: the same study with every other value replaced (:func:`probe_of`). The elements that
  differ between the two encodings are the per-image ones; each must be, in both, the encoding of one
  named value computed cheaply from the study (:func:`facts`), or no template is made. The template is
  then rendered for both studies and must reproduce pydicom's bytes for both exactly, or it is dropped.
* A template is only a list of encoded segments and slots: sequences and items keep pydicom's defined
  lengths, which rendering recomputes (all at once, from one running sum of the slots' lengths); text is
  encoded in the object's Specific Character Set (a non-ASCII value goes through pydicom's own encoder,
  once per study for all its objects).
* What an object's database row records is read from the values its elements hold, as
  :func:`~pacs_node.work.instance_record.instance_record` reads it from a dataset; no dataset is made.

Templates live in the process that made them (each spawned builder makes its own) behind a lock, at most
:data:`MAX_TEMPLATES` shapes, the least recently used dropped first.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import io
import logging
import re
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import accumulate
from operator import itemgetter
from typing import Any

from pydicom import DataElement, Dataset, config
from pydicom.charset import convert_encodings
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRLittleEndian
from pydicom.valuerep import DA, DS, DT, TM, DSfloat, PersonName

from pacs_node.results.build import build_study_objects
from pacs_node.results.common import (character_set_kwargs, clipped_box, identity_kwargs, instance_number,
                                      rectangle_polyline)
from pacs_node.results.kos import flagged_findings, kos_description
from pacs_node.results.narrative_sr import image_comment_lines, not_interpreted_text, unique_sentences
from pacs_node.results.options import ResultOptions
from pacs_node.results.study import StudyReport
from pacs_node.results.uids import derived_uid
from pacs_node.results import vocabulary as voc
from pacs_node.work.instance_record import COLUMNS, DEFAULT_TRANSFER_SYNTAX, column_value, instance_record
from pipelines.constants import CHEXPERT_LABELS
from pipelines.interface import ImageResult, NotInterpreted
from storage.repository import InstanceRecord

log = logging.getLogger(__name__)

#: Shapes whose templates a process keeps.
MAX_TEMPLATES = 256
#: The kinds of object, in the order :func:`build_study_objects` returns them.
KINDS = ("ai-sr", "narrative-sr", "kos", "gsps")

_KIND_BY_CLASS = {
    "1.2.840.10008.5.1.4.1.1.88.34": "ai-sr",
    "1.2.840.10008.5.1.4.1.1.88.22": "narrative-sr",
    "1.2.840.10008.5.1.4.1.1.88.59": "kos",
    "1.2.840.10008.5.1.4.1.1.11.1": "gsps",
}

#: Value representations whose value selects a structure (kept in the shape, never probed).
_SHAPE_VRS = frozenset({"CS", "US", "SS", "UL", "SL", "UV", "SV", "AT"})
#: Attributes that select a structure whatever their VR.
_SHAPE_TAGS = frozenset({0x00080005, 0x00080016})  # Specific Character Set, SOP Class UID
_ROWS_COLUMNS = frozenset({0x00280010, 0x00280011})
_TEXT_VRS = frozenset({"AE", "AS", "DA", "DS", "DT", "IS", "LO", "LT", "SH", "ST", "TM", "UC", "UR", "UT",
                       "CS"})
_LONG_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})
_CHARSET_VRS = frozenset({"LO", "LT", "SH", "ST", "UC", "UT"})
_MAX_LENGTH = {"SH": 16, "LO": 64, "ST": 1024, "LT": 10240}
#: What a value of the other string VRs may be spelt with (PS3.5 6.2), to try only values that fit.
_SPELLINGS = {vr: re.compile(pattern) for vr, pattern in {
    "AE": r"[ -~]{0,16}", "AS": r"\d{3}[DWMY]", "CS": r"[A-Z0-9_ ]{0,16}", "DA": r"\d{8}",
    "DS": r"[0-9+\-eE. ]{1,16}", "DT": r"[0-9.+\-]{4,26}", "IS": r"[0-9+\- ]{1,12}", "TM": r"[0-9.]{2,14}",
    "UI": r"[0-9.]{1,64}", "UR": r"\S*"}.items()}
#: The name of a fact that is an attribute of an evidence header: e<image>.<tag>.<VR>[.<form>]
_SOURCE_FACT = re.compile(r"e\d+\.[0-9a-f]{8}\.")
_BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})


class NotTemplatable(Exception):
    """This shape's objects cannot be made from a template (the reason says which element); highdicom
    builds them."""


# -- the shape of a study, and its probe -----------------------------------------------------------------


class _Walk:
    """One pass over everything a study's objects are made of. Each value that may vary is numbered by
    its first occurrence among equal values of its kind (the shape records the numbers, so equalities are
    part of the shape); with ``seed`` set, each such value is also replaced by a fresh one, the same for
    equal values (the probe keeps the study's equalities and hence its structure)."""

    def __init__(self, options: ResultOptions, seed: int | None, utf8: bool = False) -> None:
        self.options = options
        self.seed = seed
        self.utf8 = utf8
        self.tokens: list[object] = []
        self._numbers: dict[tuple[str, object], int] = {}
        #: the top-level elements of each evidence header by tag, as the walk met them
        self.sources: list[dict[int, DataElement]] = []

    def number(self, kind: str, value: object) -> int:
        key = (kind, value)
        if key not in self._numbers:
            self._numbers[key] = len(self._numbers)
        n = self._numbers[key]
        self.tokens.append(n)
        return n

    def text(self, kind: str, value: str) -> str:
        n = self.number(kind, value)
        return f"Probe {kind} {self.seed}-{n}{' ≥' if self.utf8 else ''}"

    # -- headers --------------------------------------------------------------------------------------------

    def header(self, ds: Dataset, evidence: bool = False) -> Dataset | None:
        out = Dataset() if self.seed is not None else None
        if evidence:
            self.sources.append(seen := {})
        for elem in ds:
            if evidence:
                seen[int(elem.tag)] = elem
            value = self.element(elem)
            if out is not None:
                probed = DataElement(elem.tag, elem.VR, value)
                probed.is_undefined_length = elem.is_undefined_length  # how a copied sequence is written
                out.add(probed)
        return out

    def element(self, elem: DataElement) -> Any:
        tag, vr, value = int(elem.tag), elem.VR, elem.value
        if vr == "SQ":
            self.tokens.append((tag, "SQ", len(value), elem.is_undefined_length))
            items = []
            for item in value:
                undefined = getattr(item, "is_undefined_length_sequence_item", False)
                self.tokens.append(undefined)
                probed = self.header(item)
                if probed is not None:
                    probed.is_undefined_length_sequence_item = undefined
                items.append(probed)
                self.tokens.append("end")
            return Sequence(items) if self.seed is not None else value
        multiple = isinstance(value, (MultiValue, list))  # (once: an ABC's instance check is not cheap)
        empty = value is None or value == "" or (multiple and len(value) == 0)
        self.tokens.append((tag, vr, len(value) if multiple else 1, empty))
        if empty:
            return value
        # (a private attribute selects nothing: no builder reads one)
        if tag in _SHAPE_TAGS or (vr in _SHAPE_VRS and tag not in _ROWS_COLUMNS and not elem.tag.is_private):
            self.tokens.append(str(value))
            return value
        if multiple and isinstance(value, MultiValue):
            values = [self.scalar(tag, vr, v) for v in value]
            return values if self.seed is not None else value
        return self.scalar(tag, vr, value)

    def scalar(self, tag: int, vr: str, value: Any) -> Any:
        if tag in _ROWS_COLUMNS:  # no structure depends on them, nor on their being equal
            return _probe_dimension(tag, int(value))
        if vr in _BINARY_VRS:
            n = self.number("bytes", bytes(value))
            return bytes(b ^ (0x5A + n) % 256 for b in value)
        kind = "uid" if vr == "UI" else vr
        n = self.number(kind, str(value))
        if self.seed is None:
            return value
        seed = self.seed
        if vr == "UI":
            return derived_uid("template-probe", str(seed), str(value))
        if vr == "PN":
            return f"Probe{seed}^N{n}"
        if vr == "DA":
            return (datetime.date(1950, 1, 1) + datetime.timedelta(days=37 * n + seed)).strftime("%Y%m%d")
        if vr == "TM":
            return f"{n % 24:02d}{n // 24 % 60:02d}{seed % 60:02d}"
        if vr == "DT":
            return f"{1950 + n:04d}0102{n % 24:02d}{seed % 60:02d}00"
        if vr == "AS":
            return f"{(n + seed) % 1000:03d}Y"
        if vr in ("DS", "FL", "FD", "OF", "OD"):
            return float(f"{n + 1}.{seed}5") if vr in ("FL", "FD") else f"{n + 1}.{seed}5"
        if vr == "IS":
            return str(10 * n + seed + 1)
        if vr in ("US", "UL", "SS", "SL", "UV", "SV"):
            return n + 3 + seed
        if vr == "CS":
            return f"P{seed}_{n}"
        if vr in ("SH", "LO", "LT", "ST", "UT", "UC", "AE"):
            return f"P{seed}-{n}"
        if vr == "UR":
            return f"urn:probe:{seed}:{n}"
        raise NotTemplatable(f"no probe value for VR {vr}")

    # -- the study -----------------------------------------------------------------------------------------

    def study(self, study: StudyReport) -> StudyReport | None:
        probing = self.seed is not None
        analysed = self.header(study.analysed, True) if study.analysed is not None else None
        self.tokens.append(study.analysed is None)
        set_aside = []
        for header, reason in study.set_aside:
            set_aside.append((self.header(header, True), self.text("reason", reason)))
            self.tokens.append("aside")
        analysed_reason = self.text("reason", study.analysed_reason)
        subject = derived_uid("template-probe", str(self.seed), study.subject) if probing else study.subject
        self.number("uid", study.subject)
        version = 100 + self.number("version", int(study.version)) if probing else study.version
        predecessors = {}
        for kind in sorted(study.predecessors):
            previous = study.predecessors[kind]
            self.tokens.append(kind)
            reduced = Dataset()
            for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
                reduced[keyword] = previous[keyword]
            predecessors[kind] = self.header(reduced)
        outcome = self.outcome(study)
        if not probing:
            return None
        return StudyReport(analysed, analysed_reason, tuple(set_aside), outcome, subject, version,
                           predecessors)

    def outcome(self, study: StudyReport) -> ImageResult | NotInterpreted:
        outcome = study.outcome
        self.tokens.append((type(outcome).__name__, outcome.model_name, outcome.model_version,
                            outcome.clinical_use))
        if isinstance(outcome, NotInterpreted):
            return dataclasses.replace(outcome, reason=self.text("reason", outcome.reason))
        rows = _probe_dimension(0x00280010, int(outcome.source_rows))
        columns = _probe_dimension(0x00280011, int(outcome.source_columns))
        probs = {}
        for label in CHEXPERT_LABELS:
            p, threshold = float(outcome.label_probs[label]), self.options.threshold(label)
            present = p >= threshold
            self.tokens.append(present)
            n = self.number(f"p{threshold!r}{present}", p)
            probs[label] = (threshold + (1 - threshold) / (n + 2)) if present else threshold * (n + 1) / (n + 2)
        sentences = list(unique_sentences(outcome))
        report = outcome.report.strip()
        self.tokens.append((bool(report), report == " ".join(sentences)))
        regions = []
        for region in outcome.regions:
            self.tokens.append((region.name, region.selected, bool(region.sentence),
                                bool(region.sentence and region.sentence.strip())))
            if not region.selected:
                regions.append(region)
                continue
            n = self.number("box", tuple(float(v) for v in region.box))
            box = (1.0 + n, 2.5 + n, 11.75 + n, 9.25 + n)
            sentence = region.sentence
            if sentence and sentence.strip():
                sentence = self.text("sentence", sentence.strip())
            else:  # held as it is (blank, or None) by the findings SR: part of the shape
                self.tokens.append(sentence)
            regions.append(dataclasses.replace(region, box=box, sentence=sentence))
        probe_sentences = list(unique_sentences(dataclasses.replace(outcome, regions=tuple(regions))))
        if report == " ".join(sentences):
            new_report = " ".join(probe_sentences)
        else:
            new_report = self.text("report", report) if report else outcome.report
        impression = outcome.impression
        self.tokens.append(impression is not None and bool(impression.strip()))
        if impression is not None and impression.strip():
            impression = self.text("impression", impression.strip())
        return dataclasses.replace(outcome, regions=tuple(regions), report=new_report, label_probs=probs,
                                   impression=impression, source_rows=rows, source_columns=columns)


def _probe_dimension(tag: int, value: int) -> int:
    """Rows (0028,0010) or Columns (0028,0011) of a probe: never equal to each other in both the study and
    its probe, so that the two can never be mistaken for one another."""
    return value + (7 if tag == 0x00280010 else 12)


def _generated_text_is_ascii(outcome: ImageResult | NotInterpreted) -> bool:
    return not character_set_kwargs(Dataset(), outcome)  # one rule for the character set


def _options_key(options: ResultOptions) -> tuple[object, ...]:
    return tuple((f.name, tuple(sorted(getattr(options, f.name).items())) if f.name == "per_finding_thresholds"
                  else getattr(options, f.name)) for f in dataclasses.fields(options))


def shape(study: StudyReport, options: ResultOptions) -> tuple[object, ...]:
    """What a template of ``study``'s objects is made for (see the module docstring)."""
    return _survey(study, options)[0]


def _survey(study: StudyReport, options: ResultOptions) -> tuple[tuple[object, ...], list[dict[int, DataElement]]]:
    """:func:`shape`, and the top-level elements of each evidence header by tag, which the walk meets
    anyway and :func:`facts` looks up without asking the datasets again."""
    walk = _Walk(options, None)
    walk.study(study)
    return (_options_key(options), _generated_text_is_ascii(study.outcome), *walk.tokens), walk.sources


def probe_of(study: StudyReport, options: ResultOptions, seed: int = 1) -> StudyReport:
    """``study`` with every value its shape leaves free replaced, equal values by equal ones."""
    walk = _Walk(options, seed, utf8=not _generated_text_is_ascii(study.outcome))
    probe = walk.study(study)
    assert probe is not None
    return probe


# -- the per-image values ------------------------------------------------------------------------------


def facts(study: StudyReport, options: ResultOptions, now: datetime.datetime,
          wanted: frozenset[str] | None = None,
          sources: list[dict[int, DataElement]] | None = None) -> dict[str, Any]:
    """Every value a result object of ``study`` may hold that is not fixed by its shape, by name; with
    ``wanted`` (the names a shape's templates hold), those only: a template holds a third of them (a
    probability only where it is a finding, no source attribute that it does not copy), and some are
    costly (a derived UID, a decimal string). ``sources``: the evidence headers' elements as
    :func:`_survey` found them (else they are looked up in the headers)."""
    def want(name: str) -> bool:
        return wanted is None or name in wanted

    out: dict[str, Any] = {}
    if want("now.date"):
        out["now.date"] = str(DA(now.date()))
    if want("now.time"):
        out["now.time"] = str(TM(now.time()))
    if want("now.datetime"):
        out["now.datetime"] = str(DT(now))
    evidence = study.evidence
    if wanted is None:
        for i, header in enumerate(evidence):
            for elem in header:
                if not elem.is_empty:
                    _source_facts(out, f"e{i}.{int(elem.tag):08x}.{elem.VR}", elem, True)
    else:
        headers: list[Dataset] | list[dict[int, DataElement]] = evidence if sources is None else sources
        for i, tag, vr, name, as_float in _wanted_sources(wanted):
            if i < len(headers) and (elem := headers[i].get(tag)) is not None and elem.VR == vr \
                    and not elem.is_empty:
                _source_facts(out, name, elem, as_float)
    for kind, previous in study.predecessors.items():
        for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
            out[f"previous.{kind}.{keyword}"] = previous[keyword].value
    for kind in KINDS:
        if want(f"{kind}.series") or want(f"{kind}.sop"):
            identity = identity_kwargs(study, kind)
            out[f"{kind}.series"] = identity["series_instance_uid"]
            out[f"{kind}.sop"] = identity["sop_instance_uid"]
    out["instance_number"] = str(instance_number(study))
    for i, (_, text) in enumerate(image_comment_lines(study)):
        out[f"comment.{i}"] = text
    if not study.interpreted:
        out["not-interpreted"] = not_interpreted_text(study)
        return out
    source, result = study.analysed, study.result
    assert source is not None
    uid = str(source.SOPInstanceUID)
    rows, columns = int(source.Rows), int(source.Columns)
    out["columns-rows"] = [columns, rows]
    for label, (p_name, ds_name, present_names, tracking_name) in _LABEL_FACTS.items():
        p = float(result.label_probs[label])
        out[p_name] = p
        if want(ds_name):
            out[ds_name] = str(DS(p, auto_format=True))
        if wanted is None or not wanted.isdisjoint(present_names):
            code = voc.PRESENT if p >= options.threshold(label) else voc.ABSENT
            out.update(zip(present_names, (code.value, code.scheme_designator, code.meaning), strict=True))
        if want(tracking_name):
            out[tracking_name] = derived_uid("tracking", uid, result.model_name, result.model_version, label)
    for region in result.selected_regions:
        box = clipped_box(region, rows, columns)
        out[f"polyline.{region.name}"] = [float(v) for v in rectangle_polyline(box).flatten()]
        out[f"anchor.{region.name}"] = [box[0], box[1]]
        if want(f"tracking.{region.name}"):
            out[f"tracking.{region.name}"] = derived_uid("tracking", uid, result.model_name, result.model_version,
                                                         region.name)
        if region.sentence:
            out[f"sentence.{region.name}"] = region.sentence
    for i, sentence in enumerate(unique_sentences(result)):
        out[f"finding.{i}"] = sentence
    out["report"] = result.report.strip()
    if result.impression:
        out["impression"] = result.impression.strip()
    findings = flagged_findings(result, options)
    if findings:
        out["kos.description"] = kos_description(result, findings)
    return out


#: The names of each finding's facts: its probability, as a decimal string, the code of whether it is
#: present (value, scheme, meaning), its tracking UID.
_LABEL_FACTS = {label: (f"p.{label}", f"ds.{label}", tuple(f"present.{label}.{part}" for part in
                                                            ("value", "scheme", "meaning")), f"tracking.{label}")
                for label in CHEXPERT_LABELS}


def _source_facts(out: dict[str, Any], name: str, elem: DataElement, as_float: bool) -> None:
    """The fact ``name`` of a source attribute, and (``as_float``) a decimal string as highdicom rewrites
    one (a window centre, a spacing): a float."""
    out[name] = elem.value
    if elem.VR == "DS" and as_float:
        out[f"{name}.float"] = [float(v) for v in elem.value] if elem.VM > 1 else float(elem.value)


@functools.lru_cache(maxsize=MAX_TEMPLATES)
def _wanted_sources(wanted: frozenset[str]) -> tuple[tuple[int, int, str, str, bool], ...]:
    """The source attributes among ``wanted``: (image, tag, VR, name, whether as a float too)."""
    out: dict[str, bool] = {}
    for name in wanted:
        if _SOURCE_FACT.match(name):
            base = name.removesuffix(".float")
            out[base] = out.get(base, False) or base != name
    return tuple((int(base[1:base.index(".")]), int(base.split(".")[1], 16), base.split(".")[2], base, as_float)
                 for base, as_float in sorted(out.items()))


# -- encoding ------------------------------------------------------------------------------------------


def _header(tag: int, vr: str, length: int) -> bytes:
    if vr in _LONG_VRS:
        return struct.pack("<HH2sHL", tag >> 16, tag & 0xFFFF, vr.encode(), 0, length)
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr.encode(), length)


def _pydicom_element(elem: DataElement, encodings: list[str]) -> bytes:
    """``elem`` exactly as pydicom writes it (explicit VR little endian)."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_data_element(fp, elem, encodings)
    return fp.getvalue()


def _plain_value(vr: str, value: Any) -> bytes | None:
    """The encoded value of a plain string (ASCII: the same in every character set), float(s),
    unsigned or long integer(s) in range or a decimal string as read, or None for anything else."""
    kind = type(value)
    if kind is str or kind is UID:
        if vr in _TEXT_VRS or vr in ("UI", "PN"):
            return _ascii(value, b"\x00" if vr == "UI" else b" ", 0xFFFFFFFF if vr in _LONG_VRS else 0xFFFF)
    elif kind is float and vr in ("FD", "FL"):
        return struct.pack("<d" if vr == "FD" else "<f", value)
    elif kind is list and vr in ("FD", "FL") and all(type(v) is float for v in value):
        return struct.pack(f"<{len(value)}{'d' if vr == 'FD' else 'f'}", *value)
    elif kind is DSfloat and vr == "DS":
        # a decimal string copied from a source header (a window centre): pydicom writes the string it was
        # read as, when the element it makes of it keeps that string (no auto format, no decimal class)
        # and cannot refuse it (validation that raises)
        if (not value.auto_format and hasattr(value, "original_string") and not config.use_DS_decimal
                and config.settings.reading_validation_mode != config.RAISE):
            return _ascii(value.original_string, b" ", 0xFFFF)
    elif (kind is int or kind is list) and vr in _INTEGERS:
        code, low, high = _INTEGERS[vr]
        values = [value] if kind is int else value
        if values and all(type(v) is int and low <= v <= high for v in values):
            return struct.pack(f"<{len(values)}{code}", *values)
    return None


def _ascii(value: str, pad: bytes, limit: int) -> bytes | None:
    """An ASCII text value padded to an even length, or None where it is not ASCII or longer than
    ``limit``."""
    if not value.isascii():
        return None
    data = value.encode("ascii")
    if len(data) % 2:
        data += pad
    return data if len(data) <= limit else None


#: struct code and range of the integer VRs written as plain numbers (not SS: pydicom writes a LUT
#: Descriptor's first value as US)
_INTEGERS = {"US": ("H", 0, 0xFFFF), "UL": ("L", 0, 0xFFFFFFFF), "SL": ("l", -(1 << 31), (1 << 31) - 1)}


def _value_bytes(tag: int, vr: str, value: Any, encodings: list[str]) -> bytes:
    """The whole element ``tag`` holding ``value``: plain strings and floats directly, the rest (person
    names, non-ASCII text, multiple values, sequences) by pydicom."""
    data = _plain_value(vr, value)
    if data is not None:
        return _header(tag, vr, len(data)) + data
    return _pydicom_element(DataElement(tag, vr, value), encodings)


# -- templates -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Slot:
    tag: int
    vr: str
    fact: str
    encodings: list[str]

    prefix: bytes = dataclasses.field(init=False, repr=False)
    pack_length: Callable[[int], bytes] = dataclasses.field(init=False, repr=False)
    #: a text VR, and its padding and longest value (what _plain_value decides by the VR, decided once)
    text: bool = dataclasses.field(init=False, repr=False)
    pad: bytes = dataclasses.field(init=False, repr=False)
    limit: int = dataclasses.field(init=False, repr=False)
    #: what pydicom's encoding of this element's value is remembered by, for the study being rendered
    key: tuple[object, ...] = dataclasses.field(init=False, repr=False)

    def __post_init__(self) -> None:
        long = self.vr in _LONG_VRS
        object.__setattr__(self, "prefix", struct.pack("<HH2s", self.tag >> 16, self.tag & 0xFFFF, self.vr.encode())
                           + (b"\x00\x00" if long else b""))
        object.__setattr__(self, "pack_length", struct.Struct("<L" if long else "<H").pack)
        object.__setattr__(self, "text", self.vr in _TEXT_VRS or self.vr in ("UI", "PN"))
        object.__setattr__(self, "pad", b"\x00" if self.vr == "UI" else b" ")
        object.__setattr__(self, "limit", 0xFFFFFFFF if long else 0xFFFF)
        object.__setattr__(self, "key", (self.tag, self.vr, self.fact, tuple(self.encodings)))

    def render(self, value: Any, memo: dict[Any, Any]) -> bytes:
        """The element holding ``value``. What pydicom encodes (a person name, above all, which each of
        a study's objects holds) is encoded once per study: ``memo`` is the study's."""
        kind = type(value)
        if self.text and (kind is str or kind is UID):
            data = _ascii(value, self.pad, self.limit)
        else:
            data = _plain_value(self.vr, value)
        if data is not None:
            return self.prefix + self.pack_length(len(data)) + data
        encoded = memo.get(self.key)
        if encoded is None:
            encoded = memo[self.key] = _pydicom_element(DataElement(self.tag, self.vr, value), self.encodings)
        return encoded


@dataclass(frozen=True)
class _Block:
    """A sequence (``tag`` set) or one of its items (``tag`` None), with the parts inside it."""

    tag: int | None
    parts: list[Any]
    undefined: bool


_ITEM_DELIMITER = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
_SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"


_LENGTH = struct.Struct("<L")
_ITEM = b"\xfe\xff\x00\xe0"
_UNDEFINED_ITEM = b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
_META_GROUP_LENGTH = b"\x02\x00\x00\x00UL\x04\x00"


class _Layout:
    """A whole object's template flattened for rendering: constant segments with a hole between each two,
    either a slot's element or the 4-byte length of the file meta group, a sequence or an item of defined
    length.

    Why: a length is its part's constant bytes plus the lengths of the slots inside it, and those slots
    are consecutive, so one running sum of the slots' lengths gives every length at once, and one join
    the object, instead of encoding and joining each of the hundreds of nested sequences and items of an
    SR content tree on its own."""

    __slots__ = ("segments", "slots", "lengths", "order", "_in_order", "_constant", "_holes", "_size")

    def __init__(self, meta: list[Any], body: list[Any]) -> None:
        self.segments: list[bytes | None] = []  # a segment, then None where a hole goes, and so on
        self.slots: list[_Slot] = []
        #: per length: its constant bytes, and its first slot and the one after its last
        self.lengths: list[tuple[int, int, int]] = []
        self._constant: list[bytes] = []  # the segment being assembled
        self._holes: list[tuple[bool, int]] = []  # (a slot?, its index) in order
        self._size = 0  # constant bytes so far (a length field's own size never changes: it counts)
        self._put(_PREAMBLE + _META_GROUP_LENGTH)
        self._length(meta)
        self._flatten(body)
        self.segments.append(b"".join(self._constant))
        self.order = [i if is_slot else len(self.slots) + i for is_slot, i in self._holes]
        # the holes' contents in the order they go in (an itemgetter of one index returns no tuple)
        self._in_order = itemgetter(*self.order) if len(self.order) > 1 else lambda h: [h[self.order[0]]]
        del self._constant, self._holes, self._size

    def _put(self, data: bytes) -> None:
        self._constant.append(data)
        self._size += len(data)

    def _hole(self, is_slot: bool, index: int) -> None:
        self.segments.extend((b"".join(self._constant), None))
        self._constant = []
        self._holes.append((is_slot, index))

    def _length(self, parts: list[Any]) -> None:
        """A length field, then ``parts``, which it measures."""
        index = len(self.lengths)
        self.lengths.append((0, 0, 0))
        self._hole(False, index)
        self._size += 4
        size, first = self._size, len(self.slots)
        self._flatten(parts)
        self.lengths[index] = (self._size - size, first, len(self.slots))

    def _flatten(self, parts: list[Any]) -> None:
        for part in parts:
            if type(part) is bytes:
                self._put(part)
            elif type(part) is _Slot:
                self._hole(True, len(self.slots))
                self.slots.append(part)
            elif part.tag is None:  # an item
                if part.undefined:
                    self._put(_UNDEFINED_ITEM)
                    self._flatten(part.parts)
                    self._put(_ITEM_DELIMITER)
                else:
                    self._put(_ITEM)
                    self._length(part.parts)
            elif part.undefined:
                self._put(_header(part.tag, "SQ", 0xFFFFFFFF))
                self._flatten(part.parts)
                self._put(_SEQUENCE_DELIMITER)
            else:
                self._put(_header(part.tag, "SQ", 0)[:-4])
                self._length(part.parts)

    def render(self, values: dict[str, Any], memo: dict[Any, Any]) -> bytes:
        elements = [slot.render(values[slot.fact], memo) for slot in self.slots]
        ends = [0, *accumulate(map(len, elements))]
        holes = elements + [_LENGTH.pack(constant + ends[last] - ends[first])
                            for constant, first, last in self.lengths]
        out = self.segments.copy()
        out[1::2] = self._in_order(holes)
        return b"".join(out)


def _merged(parts: list[Any]) -> list[Any]:
    """Adjacent constant segments as one."""
    out: list[Any] = []
    for part in parts:
        if type(part) is bytes and out and type(out[-1]) is bytes:
            out[-1] += part
        else:
            out.append(part)
    return out


class _Matcher:
    """Which fact an element that differs between the study and its probe holds, in both."""

    #: any tag will do: the values are compared without their element headers
    _TAG = 0x00091010

    def __init__(self, mine: dict[str, Any], probe: dict[str, Any]) -> None:
        self.mine, self.probe = mine, probe
        self._index: dict[tuple[str, tuple[str, ...]], tuple[dict[bytes, set[str]], dict[str, bytes | None]]] = {}

    def __call__(self, tag: int, vr: str, encodings: list[str], mine: bytes, probe: bytes) -> str:
        by_value, probe_values = self._indexed(vr, encodings)
        skip = 12 if vr in _LONG_VRS else 8
        for name in sorted(by_value.get(mine[skip:], ())):
            if probe_values.get(name) == probe[skip:]:
                return name
        raise NotTemplatable(f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) {vr} differs per image and holds "
                             "no value the template knows")

    def _indexed(self, vr: str, encodings: list[str]) -> tuple[dict[bytes, set[str]], dict[str, bytes | None]]:
        key = (vr, tuple(encodings))
        if key not in self._index:
            by_value: dict[bytes, set[str]] = {}
            for name, value in self.mine.items():
                data = self._value(name, vr, value, encodings)
                if data is not None:
                    by_value.setdefault(data, set()).add(name)
            probe_values = {name: self._value(name, vr, value, encodings) for name, value in self.probe.items()}
            self._index[key] = (by_value, probe_values)
        return self._index[key]

    def _value(self, name: str, vr: str, value: Any, encodings: list[str]) -> bytes | None:
        if _SOURCE_FACT.match(name) and name.split(".")[2] != vr:
            return None  # a source attribute is only ever copied as what it is
        if not _fits(vr, value):
            return None
        try:
            return _value_bytes(self._TAG, vr, value, encodings)[12 if vr in _LONG_VRS else 8:]
        except Exception:  # noqa: BLE001 - a value that cannot be this element is not the one it holds
            return None


def _fits(vr: str, value: Any) -> bool:
    """Whether ``value`` may be the value of an element of ``vr`` (so that trying it warns of nothing)."""
    values = list(value) if isinstance(value, (list, MultiValue)) else [value]
    if vr == "SQ":
        return isinstance(value, Sequence)
    if vr in ("FD", "FL", "OF", "OD"):
        return all(type(v) is float for v in values)
    if vr in ("US", "UL", "SS", "SL", "UV", "SV"):
        return all(type(v) is int for v in values)
    if vr == "PN":
        return all(isinstance(v, PersonName) or (type(v) is str and len(v) <= 64) for v in values)
    if vr in _CHARSET_VRS:
        return all(type(v) in (str, UID) and len(v) <= _MAX_LENGTH.get(vr, 1 << 32) for v in values)
    if vr in _SPELLINGS:
        return all((type(v) in (str, UID) and _SPELLINGS[vr].fullmatch(v) is not None)
                   or (vr == "DS" and isinstance(v, float)) or (vr == "IS" and isinstance(v, int))
                   for v in values)
    return False


def _encodings(ds: Dataset, parent: list[str]) -> list[str]:
    charset = ds.get("SpecificCharacterSet")
    return convert_encodings(charset) if charset else parent


def _diff(mine: Dataset, probe: Dataset, encodings: list[str], match: _Matcher, top: bool) -> list[Any]:
    keys = [t for t in sorted(mine.keys()) if not (t.element == 0 and t.group > 6)]
    if keys != [t for t in sorted(probe.keys()) if not (t.element == 0 and t.group > 6)]:
        raise NotTemplatable("the probe has other attributes than the study")
    mine_enc, probe_enc = _encodings(mine, encodings), _encodings(probe, encodings)
    if mine_enc != probe_enc:
        raise NotTemplatable("the probe has another character set")
    parts: list[Any] = []
    for tag in keys:
        a, b = mine[tag], probe[tag]
        if a.VR != b.VR:
            raise NotTemplatable(f"({tag}) has another VR in the probe")
        encoded_a, encoded_b = _pydicom_element(a, mine_enc), _pydicom_element(b, probe_enc)
        if encoded_a == encoded_b:
            parts.append(encoded_a)
            continue
        if a.VR != "SQ":
            parts.append(_Slot(int(tag), a.VR, match(int(tag), a.VR, mine_enc, encoded_a, encoded_b), mine_enc))
            continue
        if top:
            try:  # a sequence copied whole from a source header
                parts.append(_Slot(int(tag), "SQ", match(int(tag), "SQ", mine_enc, encoded_a, encoded_b), mine_enc))
                continue
            except NotTemplatable:
                pass
        if len(a.value) != len(b.value) or a.is_undefined_length != b.is_undefined_length:
            raise NotTemplatable(f"({tag}) has other items in the probe")
        items = []
        for item_a, item_b in zip(a.value, b.value, strict=True):
            undefined = getattr(item_a, "is_undefined_length_sequence_item", False)
            items.append(_Block(None, _merged(_diff(item_a, item_b, mine_enc, match, False)), undefined))
        parts.append(_Block(int(tag), items, a.is_undefined_length))
    return _merged(parts)


_PREAMBLE = b"\x00" * 128 + b"DICM"


@dataclass(frozen=True)
class Template:
    """One object's encoding with its per-image values left out."""

    kind: str
    meta: list[Any]
    body: list[Any]
    #: keyword -> the constant value or the (tag, VR, fact) it holds, of the attributes the object's
    #: database row records
    record: dict[str, Any]
    transfer_syntax: str

    layout: _Layout = dataclasses.field(init=False, repr=False, compare=False)
    #: the columns of the row that are the same for every image, and (column, tag, VR, fact) of the others
    _columns: dict[str, Any] = dataclasses.field(init=False, repr=False, compare=False)
    _filled: tuple[tuple[str, int, str, str], ...] = dataclasses.field(init=False, repr=False, compare=False)
    #: the facts it holds
    wanted: frozenset[str] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        columns: dict[str, Any] = {"transfer_syntax_uid": self.transfer_syntax or DEFAULT_TRANSFER_SYNTAX}
        filled = []
        for column, keyword in COLUMNS.items():
            value = self.record.get(keyword)
            if isinstance(value, _Filled):
                filled.append((column, value.tag, value.vr, value.fact))
            else:
                columns[column] = column_value(column, value)
        object.__setattr__(self, "layout", _Layout(self.meta, self.body))
        object.__setattr__(self, "_columns", columns)
        object.__setattr__(self, "_filled", tuple(filled))
        object.__setattr__(self, "wanted", frozenset([slot.fact for slot in self.layout.slots]
                                                     + [fact for *_, fact in self._filled]))

    def render(self, values: dict[str, Any], memo: dict[Any, Any] | None = None) -> bytes:
        """The object's file bytes. ``memo``: one dict for all the objects of a study, in which what
        pydicom encodes (or converts) for one of them is kept for the others."""
        return self.layout.render(values, {} if memo is None else memo)

    def fields(self, values: dict[str, Any], memo: dict[Any, Any] | None = None) -> InstanceRecord:
        """What the object's database row records: :func:`instance_record` of the object, column by
        column from the values its elements hold (no dataset is made)."""
        memo = {} if memo is None else memo
        columns = self._columns.copy()
        for column, tag, vr, fact in self._filled:
            key = (column, tag, vr, fact)
            if key not in memo:
                # of the value as pydicom holds it in an element (a person name, a UID...); it was checked
                # when the template reproduced pydicom's encoding of it
                value = DataElement(tag, vr, values[fact], validation_mode=config.IGNORE).value
                memo[key] = column_value(column, value)
            columns[column] = memo[key]
        return InstanceRecord(**columns)


@dataclass(frozen=True)
class _Filled:
    """An attribute the row records whose value is a per-image one: the fact its element holds."""

    tag: int
    vr: str
    fact: str


def _slots(parts: Iterable[Any]) -> dict[int, _Slot]:
    return {p.tag: p for p in parts if type(p) is _Slot}


def make_template(mine: Dataset, probe: Dataset, mine_facts: dict[str, Any],
                  probe_facts: dict[str, Any]) -> Template:
    """The template of one object from its highdicom build for a study and for that study's probe (both
    already encoded, so that their file meta is complete). Raises :class:`NotTemplatable`."""
    kind = _KIND_BY_CLASS.get(str(mine.SOPClassUID))
    if kind is None or str(mine.file_meta.TransferSyntaxUID) != ExplicitVRLittleEndian:
        raise NotTemplatable("not a result object in explicit VR little endian")
    match = _Matcher(mine_facts, probe_facts)
    meta_mine, meta_probe = Dataset(), Dataset()
    for meta_ds, full in ((meta_mine, mine), (meta_probe, probe)):
        for elem in full.file_meta:
            if int(elem.tag) != 0x00020000:
                meta_ds.add(elem)
    meta = _diff(meta_mine, meta_probe, ["iso8859"], match, False)
    body = _diff(mine, probe, ["iso8859"], match, True)
    slots = _slots(body)
    record: dict[str, Any] = {}
    for keyword in COLUMNS.values():
        if keyword not in mine:
            continue
        elem = mine[keyword]
        slot = slots.get(int(elem.tag))
        record[keyword] = _Filled(int(elem.tag), elem.VR, slot.fact) if slot is not None else elem.value
    return Template(kind, meta, body, record, str(mine.file_meta.TransferSyntaxUID))


# -- the cache and the entry point ---------------------------------------------------------------------


def encode(ds: Dataset) -> bytes:
    """``ds`` in the DICOM file format, as it will be stored and sent (pydicom's encoding)."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@dataclass(frozen=True)
class Encoded:
    """One result object: what its row records, and its file bytes."""

    fields: InstanceRecord
    data: bytes


_REFUSED = "refused"


@dataclass(frozen=True)
class _Made:
    """The templates of a shape's objects, in order, and the facts they hold."""

    templates: list[Template]
    wanted: frozenset[str] = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "wanted", frozenset().union(*(t.wanted for t in self.templates)))

    def encoded(self, values: dict[str, Any]) -> list[Encoded]:
        memo: dict[Any, Any] = {}  # what pydicom encodes or converts once for all the objects
        return [Encoded(t.fields(values, memo), t.render(values, memo)) for t in self.templates]


class TemplateCache:
    """Templates by shape. A shape's template is made the second time the shape is seen (one highdicom
    build more, for the probe); a shape that cannot be templated is remembered as such."""

    def __init__(self, capacity: int = MAX_TEMPLATES) -> None:
        self.capacity = capacity
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[object, ...], Any] = OrderedDict()
        self.hits = self.misses = self.made = self.refused = 0

    def encoded_study_objects(self, study: StudyReport, options: ResultOptions,
                              now: datetime.datetime | None = None,
                              build: Callable[..., list[Dataset]] = build_study_objects) -> list[Encoded]:
        """The result objects of ``study`` as :func:`build_study_objects` builds them, encoded."""
        when = now or datetime.datetime.now()
        study_shape, sources = _survey(study, options)
        key = (build, *study_shape)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
        if isinstance(entry, _Made):
            try:
                encoded = entry.encoded(facts(study, options, when, entry.wanted, sources))
            except Exception:  # noqa: BLE001 - highdicom builds it, and says what is wrong if anything is
                log.debug("a templated study fell back to highdicom", exc_info=True)
            else:
                with self._lock:
                    self.hits += 1
                return encoded
        objects = build(study, options, now=when)
        encoded = [Encoded(instance_record(obj), encode(obj)) for obj in objects]
        with self._lock:
            self.misses += 1
        if entry is None:
            self._remember(key, "seen")
        elif entry == "seen":
            self._remember(key, self._make(study, options, when, objects, encoded, build))
        return encoded

    def _remember(self, key: tuple[object, ...], entry: Any) -> None:
        with self._lock:
            self._entries[key] = entry
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def _make(self, study: StudyReport, options: ResultOptions, now: datetime.datetime, objects: list[Dataset],
              encoded: list[Encoded], build: Callable[..., list[Dataset]]) -> Any:
        try:
            probe = probe_of(study, options)
            later = now + datetime.timedelta(days=1, hours=1, minutes=1, seconds=1, microseconds=1001)
            probe_shape, probe_sources = _survey(probe, options)
            study_shape, study_sources = _survey(study, options)
            if probe_shape != study_shape:
                raise NotTemplatable("the probe has another shape")
            probe_objects = build(probe, options, now=later)
            probe_bytes = [encode(obj) for obj in probe_objects]
            if len(probe_objects) != len(objects):
                raise NotTemplatable("the probe has other objects")
            mine_facts, probe_facts = facts(study, options, now), facts(probe, options, later)
            made = _Made([make_template(a, b, mine_facts, probe_facts) for a, b in zip(objects, probe_objects)])
            # (rendered as later studies are: from the facts the templates hold only)
            for got, expected in ((made.encoded(facts(study, options, now, made.wanted, study_sources)), encoded),
                                  (made.encoded(facts(probe, options, later, made.wanted, probe_sources)),
                                   [Encoded(instance_record(obj), data)
                                    for obj, data in zip(probe_objects, probe_bytes, strict=True)])):
                for template, mine, theirs in zip(made.templates, got, expected, strict=True):
                    if mine != theirs:
                        raise NotTemplatable(f"the {template.kind} template does not reproduce pydicom's encoding")
        except Exception as exc:  # noqa: BLE001 - whatever stops a template, highdicom still builds the objects
            reason = str(exc) if isinstance(exc, NotTemplatable) else type(exc).__name__  # never patient data
            log.info("result objects of this shape are built by highdicom each time: %s", reason)
            with self._lock:
                self.refused += 1
            return _REFUSED
        with self._lock:
            self.made += 1
        return made


#: This process's templates.
TEMPLATES = TemplateCache()
