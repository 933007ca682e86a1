"""Results as DICOM: AI findings SR (TID 1500), narrative SR (TID 2000), KOS and GSPS.

UIDs are derived from (source SOP Instance UID, bundle name, bundle version, object kind), so a
re-run or re-send never creates a duplicate object in the PACS.
"""

from pacs_node.results.build import build_result_objects
from pacs_node.results.fallback import comprehensive_fallback
from pacs_node.results.options import ResultOptions

__all__ = ["ResultOptions", "build_result_objects", "comprehensive_fallback"]
