"""Which SOP classes and transfer syntaxes the node accepts and sends.

Images are accepted in every transfer syntax a chest X-ray modality or PACS commonly uses and are stored
exactly as received: transcoding on ingest would cost CPU on the receive path and change the bytes a
radiologist's PACS holds. Decoding happens later, in the worker.
"""

from __future__ import annotations

from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import (
    BasicTextSRStorage,
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    EnhancedSRStorage,
    GrayscaleSoftcopyPresentationStateStorage,
    KeyObjectSelectionDocumentStorage,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    SecondaryCaptureImageStorage,
    Verification,
)

#: Image classes a chest radiograph arrives as.
IMAGE_SOP_CLASSES: tuple[UID, ...] = (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
)

#: Result classes: what this node produces, and what a PACS may push back to it.
RESULT_SOP_CLASSES: tuple[UID, ...] = (
    BasicTextSRStorage,
    EnhancedSRStorage,
    ComprehensiveSRStorage,
    Comprehensive3DSRStorage,
    KeyObjectSelectionDocumentStorage,
    GrayscaleSoftcopyPresentationStateStorage,
)

STORAGE_SOP_CLASSES: tuple[UID, ...] = IMAGE_SOP_CLASSES + RESULT_SOP_CLASSES

#: Accepted on ingest, in order of preference (the SCP takes the first one the requestor also proposes).
TRANSFER_SYNTAXES: tuple[UID, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
)


def storage_sop_classes(any_storage_class: bool) -> tuple[UID, ...]:
    """The storage classes the listener accepts: radiographs and results, and with ``any_storage_class``
    every other storage class pynetdicom knows (an ultrasound from a PACS that forwards everything is
    acknowledged, then kept or discarded by policy and recorded as not processed)."""
    if not any_storage_class:
        return STORAGE_SOP_CLASSES
    others = (UID(cx.abstract_syntax) for cx in AllStoragePresentationContexts)
    return STORAGE_SOP_CLASSES + tuple(uid for uid in others if uid not in STORAGE_SOP_CLASSES)


def add_scp_contexts(ae: AE, sop_classes: tuple[UID, ...] = STORAGE_SOP_CLASSES) -> None:
    """Verification plus storage of ``sop_classes``, in every accepted transfer syntax."""
    ae.add_supported_context(Verification)
    for sop_class in sop_classes:
        ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))


def is_image_class(sop_class_uid: str) -> bool:
    return sop_class_uid in IMAGE_SOP_CLASSES
