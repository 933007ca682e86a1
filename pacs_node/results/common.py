"""Pieces every result object shares: the evidence header, this node's identity, box geometry."""

from __future__ import annotations

import copy
import datetime
import logging
import re

import numpy as np
from highdicom import ContributingEquipment
from highdicom.sr import (
    DeviceObserverIdentifyingAttributes,
    ObservationContext,
    ObserverContext,
)
from pydicom import Dataset
from pydicom.dataelem import RawDataElement
from pydicom.sr.codedict import codes
from pydicom.valuerep import DA, DT, TM

from pacs_node.results.options import ResultOptions
from pacs_node.results.uids import derived_uid, result_series_uid, result_uid
from pacs_node.results.study import StudyReport
from pipelines.interface import ImageResult, NotInterpreted, RegionResult

log = logging.getLogger(__name__)

# Type 2 attributes of the Patient and General Study modules that highdicom reads from the evidence;
# a source missing one gets it empty (zero length) instead of failing the whole job.
_TYPE2_HEADER = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
                 "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber")

#: Optional Patient / Patient Study / General Study attributes carried over into every result, so
#: that the result sits in the PACS study exactly like the image it describes.
COPIED_ATTRIBUTES = ("IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence",
                     "OtherPatientIDsSequence", "PatientAge", "PatientSize", "PatientWeight",
                     "EthnicGroup", "StudyDescription", "ProcedureCodeSequence",
                     "ReferencedStudySequence", "PatientIdentityRemoved",
                     "DeidentificationMethod")

_REQUIRED_SOURCE = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
                    "Rows", "Columns")


#: The group of Pixel Data, Float Pixel Data and Double Float Pixel Data.
PIXEL_DATA_GROUP = 0x7FE0


def without_pixel_data(ds: Dataset) -> Dataset:
    """A copy of ``ds`` without its pixel data of any kind (no file meta). Its elements are copies, so
    changing one (normalising a date) leaves ``ds`` as it was; the values themselves are shared. An
    element still as read (a raw element: immutable) is shared as it is and converted in the copy only
    if the copy asks for it (the worker copies every image it analyses; most elements nobody reads)."""
    header = Dataset()
    for element in ds.elements():
        if element.tag.group != PIXEL_DATA_GROUP:
            header[element.tag] = element if isinstance(element, RawDataElement) else copy.copy(element)
    return header


def evidence_header(source: Dataset, result: ImageResult | None = None) -> Dataset:
    """A pixel-free copy of ``source`` usable as highdicom evidence.

    Raises ``ValueError`` when the source cannot be referenced (missing UIDs) or the result was
    computed on a differently sized image, which would put every box in the wrong place."""
    missing = [k for k in _REQUIRED_SOURCE if k not in source or source[k].value in (None, "")]
    if missing:
        raise ValueError(f"source dataset lacks {', '.join(missing)}: cannot reference it")
    if result is not None and (int(source.Rows), int(source.Columns)) != (result.source_rows, result.source_columns):
        raise ValueError(
            f"result is for a {result.source_columns}x{result.source_rows} image but the source is "
            f"{source.Columns}x{source.Rows} (columns x rows)"
        )
    header = without_pixel_data(source)  # evidence needs the header only
    for keyword in _TYPE2_HEADER:
        if keyword not in header:
            setattr(header, keyword, None)
    _normalise_header(header)
    return header


_SEXES = ("M", "F", "O")


def _digits(value: object) -> str:
    return re.sub(r"[^0-9.]", "", str(value or ""))


def _normalise_header(header: Dataset) -> None:
    """Values real modalities send that highdicom (rightly) refuses to write: ``U`` or lower-case sex,
    ``1960-01-01`` dates, ``10:15:00`` times. A value that has a standard spelling gets it; one that
    has none becomes empty (unknown), never the reason a patient's results are not delivered."""
    sex = str(header.get("PatientSex") or "").strip().upper()
    header.PatientSex = sex if sex in _SEXES else None
    for keyword in ("PatientBirthDate", "StudyDate"):
        value = _digits(header.get(keyword)).replace(".", "")
        header[keyword].value = value if re.fullmatch(r"\d{8}", value) else None
    time = _digits(header.get("StudyTime"))
    header.StudyTime = time if re.fullmatch(r"\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?", time) else None


def character_set_kwargs(source: Dataset, result: ImageResult | NotInterpreted) -> dict[str, object]:
    """Keep the source's Specific Character Set unless the model's text needs more than ASCII, then
    use UTF-8 (ISO_IR 192): names decoded from the source re-encode losslessly in UTF-8, and a
    sentence with "é" or "≥" must not be written in a character set that cannot hold it."""
    if isinstance(result, NotInterpreted):
        generated = [result.reason, result.model_name, result.model_version]
    else:
        generated = [result.report, result.impression or "", result.model_name, result.model_version,
                     *(r.sentence or "" for r in result.regions)]
    if all(text.isascii() for text in generated):
        return {}
    return {"specific_character_set": "ISO_IR 192"}


def copy_patient_study(source: Dataset, target: Dataset) -> None:
    """Copy the optional patient/study attributes highdicom does not carry over."""
    for keyword in COPIED_ATTRIBUTES:
        if keyword in source and keyword not in target:
            target[keyword] = source[keyword]


def device_observer(options: ResultOptions) -> ObserverContext:
    """TID 1004 Device Observer: this node, identified the same way in every object it makes."""
    uid = options.device_uid or derived_uid("device", options.device_name, options.device_serial_number)
    return ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=uid,
            name=options.device_name,
            manufacturer_name=options.manufacturer,
            model_name=options.model_name,
            serial_number=options.device_serial_number,
        ),
    )


def observation_context(options: ResultOptions) -> ObservationContext:
    return ObservationContext(observer_device_context=device_observer(options))


def contributing_equipment(options: ResultOptions, result: ImageResult | NotInterpreted) -> list[ContributingEquipment]:
    """The node as processing equipment (PS3.3 C.12.1 Contributing Equipment Sequence)."""
    return [
        ContributingEquipment(
            manufacturer=options.manufacturer,
            purpose_of_reference=codes.DCM.ProcessingEquipment,
            manufacturer_model_name=options.model_name,
            software_versions=options.software_versions,
            device_serial_number=options.device_serial_number,
            institution_name=options.institution_name,
            contribution_description=f"AI analysis by {result.model_name} {result.model_version}",
        )
    ]


def equipment_kwargs(options: ResultOptions) -> dict[str, str]:
    """General Equipment module attributes for a highdicom SOP class constructor."""
    kwargs = {
        "manufacturer": options.manufacturer,
        "manufacturer_model_name": options.model_name,
        "software_versions": options.software_versions,
        "device_serial_number": options.device_serial_number,
    }
    if options.institution_name:
        kwargs["institution_name"] = options.institution_name
    return kwargs


def clipped_box(region: RegionResult, rows: int, columns: int) -> tuple[float, float, float, float]:
    """The region's box clipped to the source grid ``[0, columns] x [0, rows]``.

    SCOORD and PIXEL graphic coordinates put (0, 0) at the top-left corner of the top-left pixel and
    (Columns, Rows) at the bottom-right corner of the bottom-right one (PS3.3 C.18.6.1.1), so that is
    the whole valid range. A model box spilling over the edge is clipped rather than rejected."""
    x0, y0, x1, y1 = (float(v) for v in region.box)
    if not all(np.isfinite([x0, y0, x1, y1])):
        raise ValueError(f"region {region.name!r} has a non-finite box {region.box}")
    x0, x1 = sorted((min(max(x0, 0.0), columns), min(max(x1, 0.0), columns)))
    y0, y1 = sorted((min(max(y0, 0.0), rows), min(max(y1, 0.0), rows)))
    if (x0, y0, x1, y1) != tuple(float(v) for v in region.box):
        log.debug("region %s box %s clipped to the %dx%d grid", region.name, region.box, columns, rows)
    return x0, y0, x1, y1


def rectangle_polyline(box: tuple[float, float, float, float]) -> np.ndarray:
    """A closed POLYLINE (first point repeated last) tracing the box, as (column, row) pairs."""
    x0, y0, x1, y1 = box
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=np.float64)


def not_for_clinical_use_notice(result: ImageResult | NotInterpreted) -> str:
    return (f"NOT FOR CLINICAL USE: produced by {result.model_name} {result.model_version}, "
            "a model not approved for diagnosis.")


def identity_kwargs(report: StudyReport, kind: str) -> dict[str, object]:
    """Series UID, SOP Instance UID and Instance Number of the ``kind`` object of ``report``: derived from
    the study's analysed set of instances and the bundle, so a re-run or re-send yields the same object,
    never a copy; the Instance Number is the analysis' version within the study."""
    outcome = report.outcome
    return {
        "series_instance_uid": result_series_uid(report.first_image.StudyInstanceUID, outcome.model_name,
                                                 outcome.model_version, kind),
        "sop_instance_uid": result_uid(report.subject, outcome.model_name, outcome.model_version, kind),
        "instance_number": instance_number(report),
    }


def instance_number(report: StudyReport) -> int:
    """The Instance Number of every object of ``report``: the analysis' version within the study."""
    return max(int(report.version), 1)


def previous_versions(report: StudyReport, kind: str) -> list[Dataset] | None:
    """The ``kind`` object this report replaces, for highdicom's ``previous_versions`` (Predecessor
    Documents Sequence), or None for a first report."""
    previous = report.predecessors.get(kind)
    return [previous] if previous is not None else None


#: The creation dates and times highdicom sets, each from its own call of the clock.
_STAMPED = (("InstanceCreationDate", "InstanceCreationTime"), ("ContentDate", "ContentTime"),
            ("PresentationCreationDate", "PresentationCreationTime"))


def stamp(ds: Dataset, now: datetime.datetime) -> None:
    """Date every creation date and time of ``ds`` (those it has) ``now``: one instant for the whole
    object, which a template can fill in and a test can fix."""
    for date_keyword, time_keyword in _STAMPED:
        if date_keyword in ds:
            ds[date_keyword].value = DA(now.date())
        if time_keyword in ds:
            ds[time_keyword].value = TM(now.time())
    for item in ds.get("ContributingEquipmentSequence", []):  # highdicom names itself, dated its own now
        if "ContributionDateTime" in item and item.get("ManufacturerModelName") == "highdicom":
            item.ContributionDateTime = DT(now)
