"""Query/Retrieve SCP (C-FIND, C-MOVE, C-GET; Patient Root and Study Root) over stored instances."""

from pacs_node.dicom.qr.service import QueryRetrieveService

__all__ = ["QueryRetrieveService"]
