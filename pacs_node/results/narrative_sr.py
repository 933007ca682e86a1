"""The narrative report SR: TID 2000 Basic Diagnostic Imaging Report in an Enhanced SR, one per study.

This is what a PACS without AI-result support shows a radiologist: the generated report as text,
in a Findings section (and Impressions when the bundle writes one). Each region sentence is a
separate Finding that is INFERRED FROM the region's box (a 2D SCOORD SELECTED FROM the source
image), so a viewer that follows the relationships can point at the region a sentence is about.
Comments before the findings say which image of the study was read and why, and why each other image was
set aside, each INFERRED FROM a reference to its image.

A study the models did not read (no view they read, or the content gate found the image outside what they
were trained on) gets the same document with one Finding saying so and why: no finding codes, no boxes.
highdicom has no TID 2000 builder; the tree is assembled from its typed content items.
"""

from __future__ import annotations

from collections import OrderedDict

from highdicom.sr import (
    CodeContentItem,
    ContainerContentItem,
    ContentSequence,
    EnhancedSR,
    GraphicTypeValues,
    ImageContentItem,
    LanguageOfContentItemAndDescendants,
    ScoordContentItem,
    SourceImageForRegion,
    TextContentItem,
)
from highdicom.sr.enum import RelationshipTypeValues
from highdicom.sr.templates import DEFAULT_LANGUAGE
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

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
from pipelines.interface import ImageResult, NotInterpreted, RegionResult

KIND = "narrative-sr"
TITLE = codes.LN.DiagnosticImagingReport
IMAGE_REGION = codes.DCM.ImageRegion
#: the concept of the reference from a comment on a study's image (read or set aside) to that image
STUDY_IMAGE = codes.DCM.SourceImageForImageProcessingOperation

_CONTAINS = RelationshipTypeValues.CONTAINS


def _region_scoord(source: Dataset, region: RegionResult) -> ScoordContentItem:
    box = clipped_box(region, int(source.Rows), int(source.Columns))
    scoord = ScoordContentItem(
        name=IMAGE_REGION,
        graphic_type=GraphicTypeValues.POLYLINE,
        graphic_data=rectangle_polyline(box),
        relationship_type=RelationshipTypeValues.INFERRED_FROM,
    )
    scoord.ContentSequence = ContentSequence([SourceImageForRegion.from_source_image(source)])
    return scoord


def _image_reference(image: Dataset, concept: Code = STUDY_IMAGE) -> ImageContentItem:
    """An IMAGE item INFERRED FROM ``image``; by default the study image a comment is about, for a finding
    TID 2001 row 1's "Best illustration of finding" (CID 7003)."""
    return ImageContentItem(
        name=concept,
        referenced_sop_class_uid=image.SOPClassUID,
        referenced_sop_instance_uid=image.SOPInstanceUID,
        relationship_type=RelationshipTypeValues.INFERRED_FROM,
    )


def image_comment_lines(study: StudyReport) -> list[tuple[Dataset, str]]:
    """Each image of the study with the comment on it: read, or set aside, and why."""
    lines = ([(study.analysed, f"Image analysed: {study.analysed_reason}.")] if study.analysed is not None else [])
    lines += [(image, f"Image set aside: {reason}.") for image, reason in study.set_aside]
    return lines


def not_interpreted_text(study: StudyReport) -> str:
    """The one finding of a study the models did not read."""
    reason = study.outcome.reason if isinstance(study.outcome, NotInterpreted) else ""
    return f"Not interpreted: {reason}. No findings are reported for this study."


def _image_comments(study: StudyReport) -> list[TextContentItem]:
    """What was read and what was set aside, with the reasons, each pointing at its image."""
    items = []
    for image, text in image_comment_lines(study):
        item = TextContentItem(name=codes.DCM.Comment, value=text, relationship_type=_CONTAINS)
        item.ContentSequence = ContentSequence([_image_reference(image)])
        items.append(item)
    return items


def _not_interpreted_section(study: StudyReport) -> ContainerContentItem:
    section = ContainerContentItem(name=codes.LN.Findings, relationship_type=_CONTAINS)
    section.ContentSequence = ContentSequence([TextContentItem(
        name=codes.DCM.Finding, value=not_interpreted_text(study), relationship_type=_CONTAINS)])
    return section


def unique_sentences(result: ImageResult) -> OrderedDict[str, list[RegionResult]]:
    """Unique sentences in report order, each with the regions that produced it."""
    by_sentence: OrderedDict[str, list[RegionResult]] = OrderedDict()
    for region in result.selected_regions:
        if region.sentence and region.sentence.strip():
            by_sentence.setdefault(region.sentence.strip(), []).append(region)
    return by_sentence


def _findings_section(source: Dataset, result: ImageResult) -> ContainerContentItem:
    section = ContainerContentItem(name=codes.LN.Findings, relationship_type=_CONTAINS)
    items = ContentSequence()
    by_sentence = unique_sentences(result)
    report = result.report.strip()
    if report and report != " ".join(by_sentence):
        # The report is more than its region sentences (e.g. post-processed): keep it verbatim.
        items.append(TextContentItem(name=codes.DCM.Finding, value=report, relationship_type=_CONTAINS))
    for sentence, regions in by_sentence.items():
        finding = TextContentItem(name=codes.DCM.Finding, value=sentence, relationship_type=_CONTAINS)
        # TID 2001 has no row for a bare SCOORD; the image reference is the template-conformant
        # pointer, the SCOORDs (one per region that produced the sentence) say where on it.
        finding.ContentSequence = ContentSequence(
            [_image_reference(source, codes.DCM.BestIllustrationOfFinding), *(_region_scoord(source, r) for r in regions)]
        )
        items.append(finding)
    if not items:
        items.append(TextContentItem(name=codes.DCM.Finding,
                                     value="The algorithm reported no findings for this image.",
                                     relationship_type=_CONTAINS))
    section.ContentSequence = items
    return section


def _impression_section(text: str) -> ContainerContentItem:
    section = ContainerContentItem(name=codes.LN.Impressions, relationship_type=_CONTAINS)
    section.ContentSequence = ContentSequence(
        [TextContentItem(name=codes.DCM.Impression, value=text, relationship_type=_CONTAINS)]
    )
    return section


def _replaced(study: StudyReport) -> list[Dataset] | None:
    """The documents this one replaces: the previous narrative SR, and for a study no longer interpreted
    the previous AI findings SR too (no new findings SR will name it, and its findings no longer stand)."""
    previous = previous_versions(study, KIND) or []
    if not study.interpreted and (findings := study.predecessors.get("ai-sr")) is not None:
        previous.append(findings)
    return previous or None


def build_narrative_sr(study: StudyReport, options: ResultOptions) -> EnhancedSR:
    """The narrative report SR of one study (interpreted or not)."""
    result = study.outcome
    root = ContainerContentItem(name=TITLE, template_id="2000")
    content = ContentSequence()
    content.extend(LanguageOfContentItemAndDescendants(DEFAULT_LANGUAGE))
    content.extend(observation_context(options))
    content.append(CodeContentItem(name=codes.DCM.ProcedureReported, value=voc.CHEST_RADIOGRAPH,
                                   relationship_type=RelationshipTypeValues.HAS_CONCEPT_MOD))
    if not result.clinical_use:
        content.append(TextContentItem(name=codes.DCM.Comment, value=not_for_clinical_use_notice(result),
                                       relationship_type=_CONTAINS))
    content.extend(_image_comments(study))
    if study.interpreted:
        content.append(_findings_section(study.analysed, study.result))
        if study.result.impression and study.result.impression.strip():
            content.append(_impression_section(study.result.impression.strip()))
    else:
        content.append(_not_interpreted_section(study))
    root.ContentSequence = content

    description = "AI report" if study.interpreted else "AI report - NOT INTERPRETED"
    if not result.clinical_use:
        description += " - NOT FOR CLINICAL USE"
    source = study.first_image
    sr = EnhancedSR(
        evidence=study.evidence,
        content=root,
        series_number=options.narrative_series_number,
        **identity_kwargs(study, KIND),
        previous_versions=_replaced(study),
        is_complete=True,
        is_final=False,
        series_description=description,
        performed_procedure_codes=[voc.CHEST_RADIOGRAPH],
        contributing_equipment=contributing_equipment(options, result),
        **equipment_kwargs(options),
        **character_set_kwargs(source, result),
    )
    copy_patient_study(source, sr)
    return sr
