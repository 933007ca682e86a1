"""Turn one pipeline result into the DICOM objects the node stores and sends."""

from __future__ import annotations

from pydicom import Dataset

from pacs_node.results.ai_sr import build_ai_findings_sr
from pacs_node.results.common import evidence_header
from pacs_node.results.gsps import build_gsps
from pacs_node.results.kos import build_kos
from pacs_node.results.narrative_sr import build_narrative_sr
from pacs_node.results.options import ResultOptions
from pipelines.interface import ImageResult


def build_result_objects(source: Dataset, result: ImageResult, options: ResultOptions) -> list[Dataset]:
    """AI findings SR, then (as configured) narrative SR, KOS (only if a finding reaches its threshold)
    and GSPS (only if a region was reported). Every dataset carries complete file meta and can be
    written with ``save_as(path, enforce_file_format=True)`` or sent as is.

    Raises ``ValueError`` when ``source`` cannot be referenced or ``result`` does not belong to it."""
    header = evidence_header(source, result)
    objects: list[Dataset] = [build_ai_findings_sr(header, result, options)]
    if options.make_narrative:
        objects.append(build_narrative_sr(header, result, options))
    if options.make_kos and (kos := build_kos(header, result, options)) is not None:
        objects.append(kos)
    if options.make_gsps and (gsps := build_gsps(header, result, options)) is not None:
        objects.append(gsps)
    return objects
