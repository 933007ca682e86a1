"""Turn one analysis of a study into the DICOM objects the node stores and sends."""

from __future__ import annotations

import datetime

from pydicom import Dataset

from pacs_node.results.ai_sr import build_ai_findings_sr
from pacs_node.results.common import evidence_header, stamp
from pacs_node.results.gsps import build_gsps
from pacs_node.results.kos import build_kos
from pacs_node.results.narrative_sr import build_narrative_sr
from pacs_node.results.options import ResultOptions
from pacs_node.results.study import StudyReport
from pipelines.interface import ImageResult


def build_study_objects(study: StudyReport, options: ResultOptions,
                        now: datetime.datetime | None = None) -> list[Dataset]:
    """For an interpreted study: AI findings SR, then (as configured) narrative SR, KOS (only if a finding
    reaches its threshold) and GSPS (only if a region was reported). For a study not interpreted: the
    narrative SR that says so, nothing else (no finding codes, no flag). Every dataset carries complete
    file meta and can be written with ``save_as(path, enforce_file_format=True)`` or sent as is.

    Every object is dated ``now`` (default: the current time), so that the templates
    (:mod:`pacs_node.results.templates`) and the tests can reproduce a build exactly."""
    objects = _objects(study, options)
    when = now or datetime.datetime.now()
    for obj in objects:
        stamp(obj, when)
    return objects


def _objects(study: StudyReport, options: ResultOptions) -> list[Dataset]:
    if not study.interpreted:
        return [build_narrative_sr(study, options)]
    objects: list[Dataset] = [build_ai_findings_sr(study, options)]
    if options.make_narrative:
        objects.append(build_narrative_sr(study, options))
    if options.make_kos and (kos := build_kos(study, options)) is not None:
        objects.append(kos)
    if options.make_gsps and (gsps := build_gsps(study, options)) is not None:
        objects.append(gsps)
    return objects


def single_image_report(source: Dataset, result: ImageResult) -> StudyReport:
    """A study of one image, read as it is: the result UIDs derive from the image's SOP Instance UID.

    Raises ``ValueError`` when ``source`` cannot be referenced or ``result`` does not belong to it."""
    return StudyReport(evidence_header(source, result), "the only image", (), result, str(source.SOPInstanceUID))


def build_result_objects(source: Dataset, result: ImageResult, options: ResultOptions) -> list[Dataset]:
    """:func:`build_study_objects` of a one-image study (tools, tests and benchmarks of the builders)."""
    return build_study_objects(single_image_report(source, result), options)
