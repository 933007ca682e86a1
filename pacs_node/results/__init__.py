"""Results as DICOM: AI findings SR (TID 1500), narrative SR (TID 2000), KOS and GSPS, one set per analysis
of a study.

UIDs are derived from (the study's analysed set of instances, bundle name, bundle version, object kind),
so a re-run or re-send never creates a duplicate object in the PACS, and a new set of instances makes a new
version that names the one it replaces.
"""

from pacs_node.results.build import build_result_objects, build_study_objects
from pacs_node.results.fallback import comprehensive_fallback
from pacs_node.results.options import ResultOptions
from pacs_node.results.study import StudyReport

__all__ = ["ResultOptions", "StudyReport", "build_result_objects", "build_study_objects", "comprehensive_fallback"]
