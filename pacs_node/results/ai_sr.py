"""The AI findings SR (IHE AI Results): a Comprehensive 3D SR whose content is a TID 1500
Measurement Report built with highdicom's typed templates.

* one TID 1501 group per CheXpert finding: qualitative evaluation present/absent at the configured
  threshold plus the probability as a NUM;
* one TID 1410 planar ROI group per reported region: its box as a 2D SCOORD POLYLINE on the source
  image ("Bounded by"), the region's finding site, and the sentence the model wrote for it.

Projection radiographs have no Frame of Reference, so every coordinate is a 2D SCOORD: the document
is valid under both the Comprehensive 3D SR and the Comprehensive SR class, which makes the
fallback for receivers without the 3D class a pure class change (``comprehensive_fallback``).
"""

from __future__ import annotations

from highdicom.sr import (
    AlgorithmIdentification,
    Comprehensive3DSR,
    GraphicTypeValues,
    ImageRegion,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    PlanarROIMeasurementsAndQualitativeEvaluations,
    QualitativeEvaluation,
    SourceImageForMeasurementGroup,
    SourceImageForRegion,
    TextContentItem,
    TrackingIdentifier,
)
from highdicom.sr.enum import RelationshipTypeValues
from pydicom import Dataset
from pydicom.sr.codedict import codes

from pacs_node.results import vocabulary as voc
from pacs_node.results.common import (
    character_set_kwargs,
    clipped_box,
    contributing_equipment,
    copy_patient_study,
    equipment_kwargs,
    identity_kwargs,
    not_for_clinical_use_notice,
    observation_context,
    previous_versions,
    rectangle_polyline,
)
from pacs_node.results.options import ResultOptions
from pacs_node.results.study import StudyReport
from pacs_node.results.uids import derived_uid
from pipelines.constants import CHEXPERT_LABELS
from pipelines.interface import ImageResult

KIND = "ai-sr"
TITLE = codes.cid7021.ImagingMeasurementReport


def algorithm_identification(result: ImageResult, parameters: list[str]) -> AlgorithmIdentification:
    """TID 4019. The version names the bundle too: a version string alone does not say which model.
    Each group lists only the parameters that shaped it (its threshold), which keeps the tree small."""
    parameters = [*parameters, f"clinical_use={'true' if result.clinical_use else 'false'}"]
    if not result.clinical_use:
        parameters.append(not_for_clinical_use_notice(result))
    return AlgorithmIdentification(
        name=result.model_name,
        version=f"{result.model_name} {result.model_version}",
        parameters=parameters,
    )


def _classification_groups(source: Dataset, result: ImageResult,
                           options: ResultOptions) -> list[MeasurementsAndQualitativeEvaluations]:
    groups = []
    uid = source.SOPInstanceUID
    for label in CHEXPERT_LABELS:
        probability = float(result.label_probs[label])
        finding = voc.finding_code(label)
        threshold = options.threshold(label)
        present = probability >= threshold
        algorithm = algorithm_identification(result, [f"threshold={threshold:g}"])
        groups.append(
            MeasurementsAndQualitativeEvaluations(
                tracking_identifier=TrackingIdentifier(
                    uid=derived_uid("tracking", uid, result.model_name, result.model_version, label),
                    identifier=f"{label} classification",
                ),
                finding_type=finding,
                algorithm_id=algorithm,
                measurements=[
                    Measurement(name=voc.PROBABILITY, value=probability, unit=voc.UNITLESS)
                ],
                qualitative_evaluations=[
                    QualitativeEvaluation(name=finding, value=voc.PRESENT if present else voc.ABSENT)
                ],
                source_images=[SourceImageForMeasurementGroup.from_source_image(source)],
            )
        )
    return groups


def _region_groups(source: Dataset, result: ImageResult,
                   algorithm: AlgorithmIdentification) -> list[PlanarROIMeasurementsAndQualitativeEvaluations]:
    groups = []
    rows, columns = int(source.Rows), int(source.Columns)
    for region in result.selected_regions:
        box = clipped_box(region, rows, columns)
        group = PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(
                uid=derived_uid("tracking", source.SOPInstanceUID, result.model_name,
                                result.model_version, region.name),
                identifier=region.name,
            ),
            referenced_region=ImageRegion(
                graphic_type=GraphicTypeValues.POLYLINE,
                graphic_data=rectangle_polyline(box),
                source_image=SourceImageForRegion.from_source_image(source),
            ),
            finding_type=voc.region_code(region.name),
            finding_category=voc.ANATOMICAL_STRUCTURE,
            algorithm_id=algorithm,
            finding_sites=voc.region_finding_sites(region.name) or None,
            geometric_purpose=codes.SCT.BoundedBy,
        )
        if region.sentence:
            # TID 1419 row "TEXT $QualitativeEvaluation" is not built by highdicom; the sentence is
            # the model's free-text evaluation of this region.
            group[0].ContentSequence.append(
                TextContentItem(name=codes.DCM.Finding, value=region.sentence,
                                relationship_type=RelationshipTypeValues.CONTAINS)
            )
        groups.append(group)
    return groups


def build_ai_findings_sr(study: StudyReport, options: ResultOptions) -> Comprehensive3DSR:
    """The AI findings SR of one interpreted study: the findings of the image read; the evidence
    (Current Requested Procedure Evidence Sequence) lists every image of the study, those set aside too.
    (No TID 1600 Image Library: highdicom's requires pixel spacing that many CR images do not carry.)"""
    source, result = study.analysed, study.result
    assert source is not None
    report = MeasurementReport(
        observation_context=observation_context(options),
        procedure_reported=voc.CHEST_RADIOGRAPH,
        imaging_measurements=[
            *_classification_groups(source, result, options),
            *_region_groups(source, result, algorithm_identification(result, [])),
        ],
        title=TITLE,
    )
    description = "AI findings" if result.clinical_use else "AI findings - NOT FOR CLINICAL USE"
    sr = Comprehensive3DSR(
        evidence=study.evidence,
        content=report,
        series_number=options.ai_sr_series_number,
        **identity_kwargs(study, KIND),
        previous_versions=previous_versions(study, KIND),
        is_complete=True,
        is_final=False,
        series_description=description,
        coding_schemes=voc.coding_schemes(),
        contributing_equipment=contributing_equipment(options, result),
        **equipment_kwargs(options),
        **character_set_kwargs(source, result),
    )
    copy_patient_study(source, sr)
    return sr
