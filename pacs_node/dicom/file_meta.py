"""The File Meta Information pynetdicom writes at the head of every received C-STORE dataset, written
with ``struct``.

With ``STORE_RECV_CHUNKED_DATASET`` pynetdicom starts each spool file with a File Meta Information group
it builds as a pydicom ``FileMetaDataset`` (``dsutils.create_file_meta``: seven validated attribute
assignments) and writes with pydicom's ``write_file_meta_info`` (validation, a dataset write into a
buffer, the group length patched, written again): about a millisecond of CPU per received message on
this machine, more than the command set costs, for seven elements whose layout never changes.
:func:`plan_file_meta` (installed as ``pynetdicom.dimse_messages.create_file_meta``) keeps the values as
they are, and :func:`write_file_meta` (installed as ``pynetdicom.dimse_messages.write_file_meta_info``,
which pynetdicom calls only with what ``create_file_meta`` returned) writes them as Explicit VR Little
Endian elements, byte for byte what pydicom writes (tested). A value pydicom might warn about or pad
differently (not a plain UID of at most 64 characters, a version name longer than 16) is left to
pydicom: :func:`plan_file_meta` then returns pynetdicom's own dataset and :func:`write_file_meta` hands
it to pydicom. Both are in place only while a listener runs (:mod:`pacs_node.dicom.adjustments`).
"""

from __future__ import annotations

import re
import struct
from typing import Any, BinaryIO, NamedTuple

from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.dsutils import create_file_meta

_PLAIN_UID = re.compile(r"[0-9.]{1,64}")
_PLAIN_VERSION = re.compile(r"[ -~]{1,16}")  # SH of printable ASCII without a backslash, checked below
_SHORT = struct.Struct("<HH2sH")  # explicit VR element with a 2-byte length
_LONG = struct.Struct("<HH2s2xL")  # explicit VR element with a 4-byte length (OB)
_GROUP_LENGTH = struct.Struct("<HH2sHL")


class PlannedFileMeta(NamedTuple):
    """The values of a received dataset's File Meta Information, to be written by :func:`write_file_meta`."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    implementation_uid: str
    implementation_version: str

    def encoded(self) -> bytes:
        """The group as pydicom writes it, (0002,0000) first."""
        body = [_LONG.pack(2, 0x0001, b"OB", 2), b"\0\1"]
        for element, value in ((0x0002, self.sop_class_uid), (0x0003, self.sop_instance_uid),
                               (0x0010, self.transfer_syntax), (0x0012, self.implementation_uid)):
            data = value.encode("ascii")
            if len(data) % 2:
                data += b"\0"
            body += [_SHORT.pack(2, element, b"UI", len(data)), data]
        version = self.implementation_version.encode("ascii")
        if len(version) % 2:
            version += b" "
        body += [_SHORT.pack(2, 0x0013, b"SH", len(version)), version]
        encoded = b"".join(body)
        return _GROUP_LENGTH.pack(2, 0x0000, b"UL", 4, len(encoded)) + encoded


def plan_file_meta(*, sop_class_uid: UID, sop_instance_uid: UID, transfer_syntax: UID,
                   implementation_uid: UID = PYNETDICOM_IMPLEMENTATION_UID,
                   implementation_version: str = PYNETDICOM_IMPLEMENTATION_VERSION) -> Any:
    """``pynetdicom.dsutils.create_file_meta`` (same signature) for :func:`write_file_meta`: the values
    as they are when pydicom would write them plainly, else pynetdicom's own ``FileMetaDataset``."""
    uids = (sop_class_uid, sop_instance_uid, transfer_syntax, implementation_uid)
    if (all(isinstance(uid, str) and _PLAIN_UID.fullmatch(uid) for uid in uids)
            and isinstance(implementation_version, str) and _PLAIN_VERSION.fullmatch(implementation_version)
            and "\\" not in implementation_version and implementation_version == implementation_version.strip()):
        return PlannedFileMeta(*uids, implementation_version)
    return create_file_meta(sop_class_uid=sop_class_uid, sop_instance_uid=sop_instance_uid,
                            transfer_syntax=transfer_syntax, implementation_uid=implementation_uid,
                            implementation_version=implementation_version)


def write_file_meta(fp: BinaryIO, file_meta: Any, enforce_standard: bool = True) -> None:
    """``pydicom.filewriter.write_file_meta_info`` (same signature) that writes a :class:`PlannedFileMeta`
    itself."""
    if isinstance(file_meta, PlannedFileMeta):
        fp.write(file_meta.encoded())
    else:
        write_file_meta_info(fp, file_meta, enforce_standard)  # type: ignore[arg-type]
