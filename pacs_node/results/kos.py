"""Key Object Selection flagging the image when any finding reaches its threshold.

Many PACS worklists can filter or badge studies on a KOS "Of Interest" without understanding SR
content, which makes this the cheapest classification result a site can act on.
"""

from __future__ import annotations

from highdicom.ko import KeyObjectSelection, KeyObjectSelectionDocument
from pydicom.sr.codedict import codes

from pacs_node.results.common import (
    character_set_kwargs,
    contributing_equipment,
    copy_patient_study,
    device_observer,
    identity_kwargs,
)
from pacs_node.results.options import ResultOptions
from pacs_node.results.study import StudyReport
from pipelines.constants import CHEXPERT_LABELS
from pipelines.interface import ImageResult

KIND = "kos"

# "No Finding" above threshold is not a reason to flag an image.
_FLAGGING_LABELS = tuple(label for label in CHEXPERT_LABELS if label != "No Finding")


def flagged_findings(result: ImageResult, options: ResultOptions) -> list[str]:
    """CheXpert findings at or above their threshold, in vocabulary order."""
    return [label for label in _FLAGGING_LABELS
            if float(result.label_probs[label]) >= options.threshold(label)]


def kos_description(result: ImageResult, findings: list[str]) -> str:
    """The KOS's description of why it flags the image: the findings and their probabilities."""
    description = "AI flagged: " + ", ".join(
        f"{label} {float(result.label_probs[label]):.2f}" for label in findings)
    if not result.clinical_use:
        description = "NOT FOR CLINICAL USE. " + description
    return description[:1024]


def build_kos(study: StudyReport, options: ResultOptions) -> KeyObjectSelectionDocument | None:
    """The KOS flagging the study's analysed image, or None when no finding reaches its threshold (or the
    study was not interpreted)."""
    if not study.interpreted:
        return None
    source, result = study.analysed, study.result
    findings = flagged_findings(result, options)
    if not findings:
        return None
    description = kos_description(result, findings)
    content = KeyObjectSelection(
        document_title=codes.DCM.OfInterest,
        referenced_objects=[source],
        observer_device_context=device_observer(options),
        description=description,
    )
    kos = KeyObjectSelectionDocument(
        evidence=[source],
        content=content,
        series_number=options.kos_series_number,
        **identity_kwargs(study, KIND),
        manufacturer=options.manufacturer,
        institution_name=options.institution_name,
        contributing_equipment=contributing_equipment(options, result),
        **character_set_kwargs(source, result),
    )
    kos.SeriesDescription = "AI key images" if result.clinical_use else "AI key images - NOT FOR CLINICAL USE"
    copy_patient_study(source, kos)
    return kos
