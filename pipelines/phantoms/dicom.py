"""Phantoms as realistic CR / DX DICOM instances, for node tests, demos and benchmarks.

Every instance is unmistakably synthetic: the patient name is ``PHANTOM^<seed>``, the patient ID
``PHANTOM-<seed>``, the image comments say so, and a private block (creator ``PACS_NODE_PHANTOM``,
group 0x0011) carries a synthetic flag, the seed and the ground-truth report.

UIDs are derived from the seed and the encoding options, so writing the same phantom twice gives the
same SOP Instance UID (a retransmission), while the same seed written as MONOCHROME1 and as JPEG 2000 gives
two instances of one study. Pass explicit UIDs to override.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    JPEG2000,
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    generate_uid,
)

from pipelines.phantoms.generator import Phantom, generate_phantom

CR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1")
DX_FOR_PRESENTATION_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1.1")
PRIVATE_CREATOR = "PACS_NODE_PHANTOM"
PRIVATE_GROUP = 0x0011
UID_PREFIX = "1.2.826.0.1.3680043.10.1561."  # seeded generate_uid() hashes below this root

#: transfer syntax keyword accepted by the writer and the CLI -> UID
ENCODINGS: dict[str, UID] = {
    "explicit": ExplicitVRLittleEndian,
    "j2k-lossless": JPEG2000Lossless,
    "j2k-lossy": JPEG2000,
}
FIELD_OF_VIEW_MM = 375.0  # height of the detector area the phantom fills: a 35 x 43 cm plate, roughly


def _uid(*parts: object) -> UID:
    return generate_uid(prefix=UID_PREFIX, entropy_srcs=[str(p) for p in parts])


def phantom_dataset(
    seed: int,
    size: int = 2500,
    *,
    modality: str = "CR",
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    encoding: str = "explicit",
    phantom: Phantom | None = None,
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    instance_number: int = 1,
    study_datetime: dt.datetime | None = None,
) -> Dataset:
    """A complete CR or DX (for presentation) dataset of phantom ``seed`` ``size`` pixels tall.

    ``photometric`` is MONOCHROME1 (white = low values, as many CR readers write) or MONOCHROME2;
    ``bits_stored`` 12..16; ``encoding`` one of :data:`ENCODINGS`. ``phantom`` skips regeneration when the
    caller already has it (it must be the one for ``seed`` and ``size``)."""
    if modality not in ("CR", "DX"):
        raise ValueError(f"modality must be CR or DX, got {modality!r}")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"photometric must be MONOCHROME1 or MONOCHROME2, got {photometric!r}")
    if not 12 <= bits_stored <= 16:
        raise ValueError(f"bits_stored must be 12..16, got {bits_stored}")
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {sorted(ENCODINGS)}, got {encoding!r}")
    ph = phantom if phantom is not None else generate_phantom(seed, size)
    rows, cols = ph.image.shape
    when = study_datetime or dt.datetime(2024, 1, 1, 8, 0, 0) + dt.timedelta(minutes=17 * int(seed))
    options = (modality, photometric, bits_stored, encoding, size)

    ds = Dataset()
    sop_class = CR_IMAGE_STORAGE if modality == "CR" else DX_FOR_PRESENTATION_STORAGE
    # SOP Common
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance_uid or _uid("sop", seed, *options, instance_number)
    ds.InstanceCreationDate = when.strftime("%Y%m%d")
    ds.InstanceCreationTime = when.strftime("%H%M%S")
    # Patient
    ds.PatientName = f"PHANTOM^{seed}"
    ds.PatientID = f"PHANTOM-{seed}"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "Synthetic phantom: no patient"
    # General Study
    ds.StudyInstanceUID = study_instance_uid or _uid("study", seed)
    ds.StudyDate = when.strftime("%Y%m%d")
    ds.StudyTime = when.strftime("%H%M%S")
    ds.ReferringPhysicianName = ""
    ds.StudyID = f"PH{seed}"[:16]
    ds.AccessionNumber = f"PHA{seed}"[:16]
    ds.StudyDescription = "Synthetic chest phantom"
    # General Series
    ds.Modality = modality
    ds.SeriesInstanceUID = series_instance_uid or _uid("series", seed, *options)
    ds.SeriesNumber = 1
    ds.SeriesDate = ds.StudyDate
    ds.SeriesTime = ds.StudyTime
    ds.SeriesDescription = "PHANTOM CHEST PA"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    # General Equipment
    ds.Manufacturer = "pacs-node phantom generator"
    ds.ManufacturerModelName = "pipelines.phantoms"
    ds.SoftwareVersions = "1"
    ds.InstitutionName = "Synthetic"
    # General Image
    ds.InstanceNumber = instance_number
    ds.PatientOrientation = ["L", "F"]
    ds.ContentDate = ds.StudyDate
    ds.ContentTime = ds.StudyTime
    ds.ImageComments = "SYNTHETIC PHANTOM - not a patient image - not for clinical use"
    ds.BurnedInAnnotation = "NO"
    ds.AnatomicRegionSequence = Sequence([_code("51185008", "SCT", "Chest")])
    spacing = round(FIELD_OF_VIEW_MM / rows, 4)
    if modality == "CR":
        ds.ImageType = ["DERIVED", "PRIMARY"]
        ds.PixelSpacing = [spacing, spacing]
        ds.KVP = 120
        ds.PlateID = f"PH{seed % 10000}"
    else:
        _dx_modules(ds, spacing, photometric)
    # Image Pixel
    stored = _stored_values(ph.image, bits_stored, photometric)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = stored.tobytes()
    ds.WindowCenter = (1 << bits_stored) // 2
    ds.WindowWidth = 1 << bits_stored
    ds.VOILUTFunction = "LINEAR"
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.LossyImageCompression = "00"
    # the synthetic flag, where software that ignores the names still sees it
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(0x01, "CS", "SYNTHETIC")
    block.add_new(0x02, "UL", int(seed) & 0xFFFFFFFF)
    block.add_new(0x03, "UT", ph.report)

    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta.ImplementationVersionName = "PACS_NODE_PH"
    if encoding != "explicit":
        _compress(ds, ENCODINGS[encoding])
    return ds


def write_phantom_dicom(path: str | Path, seed: int, size: int = 2500, **options) -> Dataset:
    """Write phantom ``seed`` as a DICOM Part 10 file at ``path`` (parents created); returns the dataset.
    ``options`` are :func:`phantom_dataset`'s keywords."""
    ds = phantom_dataset(seed, size, **options)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return ds


def is_phantom(ds: Dataset) -> bool:
    """True for instances this module wrote (checks the private flag, not the name)."""
    try:
        block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
        return block[0x01].value == "SYNTHETIC"
    except KeyError:
        return False


def _stored_values(image: np.ndarray, bits: int, photometric: str) -> np.ndarray:
    top = (1 << bits) - 1
    values = np.rint(np.clip(image, 0.0, 1.0) * top).astype(np.uint16)
    return (top - values).astype(np.uint16) if photometric == "MONOCHROME1" else values


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _dx_modules(ds: Dataset, spacing: float, photometric: str) -> None:
    """The DX Series / Anatomy Imaged / Image / Detector / Positioning attributes a DX IOD requires."""
    ds.ImageType = ["DERIVED", "PRIMARY", ""]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ImageLaterality = "U"
    ds.PixelIntensityRelationship = "LOG"
    # +1: lower stored values mean less X-ray intensity reached the detector (bone, white on MONO1 film)
    ds.PixelIntensityRelationshipSign = 1 if photometric == "MONOCHROME1" else -1
    ds.PresentationLUTShape = "IDENTITY" if photometric == "MONOCHROME2" else "INVERSE"
    ds.DetectorType = "SCINTILLATOR"
    ds.ImagerPixelSpacing = [spacing, spacing]
    ds.PixelSpacing = [spacing, spacing]
    ds.PatientOrientation = ["L", "F"]
    ds.PatientPosition = ""
    ds.ViewCodeSequence = Sequence([_code("272479007", "SCT", "postero-anterior")])
    ds.PositionerType = ""
    ds.AcquisitionContextSequence = Sequence()
    ds.KVP = 120
    ds.DistanceSourceToDetector = 1800
    ds.ExposureTime = 10


def _compress(ds: Dataset, syntax: UID) -> None:
    """JPEG 2000 through pydicom's pylibjpeg-openjpeg encoder (lossy: ~20:1 rate, visually lossless)."""
    kwargs = {"encoding_plugin": "pylibjpeg"}
    if syntax == JPEG2000:
        kwargs["j2k_cr"] = [20]
    ds.compress(syntax, **kwargs)
    if syntax == JPEG2000:
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionRatio = 20
        ds.LossyImageCompressionMethod = "ISO_15444_1"
