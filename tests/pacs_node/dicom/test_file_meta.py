"""The File Meta Information written at the head of received datasets (pacs_node.dicom.file_meta) is
byte for byte what pynetdicom's create_file_meta + pydicom's write_file_meta_info write; values pydicom
might treat otherwise go to pydicom; a listener installs both while it runs, and a dataset received
from DCMTK's storescu starts with the File Meta Information pydicom would have written."""

from __future__ import annotations

import io
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID
from pynetdicom import AE, evt, dimse_messages
from pynetdicom.dsutils import create_file_meta
from pynetdicom.sop_class import ComputedRadiographyImageStorage

from pacs_node.dicom import adjustments
from pacs_node.dicom.file_meta import PlannedFileMeta, plan_file_meta, write_file_meta
from tests.support import free_port

CR = "1.2.840.10008.5.1.4.1.1.1"


def _written(create: Callable[..., Any], write: Callable[[Any, Any], None], **values: object) -> bytes | str:
    """What ``write(create(**values))`` writes, or the error it raises instead."""
    buffer = io.BytesIO()
    try:
        write(buffer, create(**values))
    except (AttributeError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return buffer.getvalue()


def _pydicoms(**values: object) -> bytes | str:
    return _written(create_file_meta, write_file_meta_info, **values)


def _ours(**values: object) -> bytes | str:
    return _written(plan_file_meta, write_file_meta, **values)


@pytest.mark.parametrize("values", [
    {"sop_class_uid": UID(CR), "sop_instance_uid": UID("1.2.3.4"), "transfer_syntax": UID("1.2.840.10008.1.2.1")},
    {"sop_class_uid": UID(CR + ".1"), "sop_instance_uid": UID("1.2.3"), "transfer_syntax": UID("1.2.840.10008.1.2")},
    {"sop_class_uid": UID(CR), "sop_instance_uid": UID("1." + "2" * 62), "transfer_syntax": UID("1.2.840.10008.1.2.4.90"),
     "implementation_uid": UID("1.2.826.0.1.3680043.9.1"), "implementation_version": "NODE_1"},
])
def test_plain_values_are_written_as_pydicom_writes_them(values: dict[str, object]) -> None:
    assert isinstance(plan_file_meta(**values), PlannedFileMeta)  # type: ignore[arg-type]
    assert _ours(**values) == _pydicoms(**values)


@pytest.mark.parametrize("values", [
    {"sop_class_uid": UID(CR), "sop_instance_uid": UID("1." + "2" * 63), "transfer_syntax": UID("1.2.840.10008.1.2")},
    {"sop_class_uid": UID(CR), "sop_instance_uid": UID("1.2.x"), "transfer_syntax": UID("1.2.840.10008.1.2")},
    {"sop_class_uid": UID(CR), "sop_instance_uid": UID(""), "transfer_syntax": UID("1.2.840.10008.1.2")},
    {"sop_class_uid": UID(CR), "sop_instance_uid": UID("1.2"), "transfer_syntax": UID("1.2.840.10008.1.2"),
     "implementation_version": "A\\B"},
])
def test_other_values_go_to_pydicom(values: dict[str, object]) -> None:
    assert not isinstance(plan_file_meta(**values), PlannedFileMeta)  # type: ignore[arg-type]
    assert _ours(**values) == _pydicoms(**values)


def test_a_received_dataset_starts_with_pydicoms_file_meta(tmp_path: Path) -> None:
    """pynetdicom's receive path, with the adjustments a listener applies, fed by DCMTK's storescu."""
    ds = pydicom.Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CR, "1.2.826.0.1.3680043.9.7.1.5"
    ds.PatientID, ds.Modality = "X", "CR"
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    sent = tmp_path / "sent.dcm"
    ds.save_as(sent, implicit_vr=False, little_endian=True, enforce_file_format=True)
    received: list[bytes] = []

    def on_store(event: evt.Event) -> int:
        received.append(Path(event.dataset_path).read_bytes())
        return 0

    adjustments.apply_pynetdicom_adjustments()
    try:
        assert dimse_messages.write_file_meta_info is write_file_meta
        ae = AE("FILEMETA")
        ae.add_supported_context(ComputedRadiographyImageStorage, ["1.2.840.10008.1.2.1"])
        port = free_port()
        server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
        try:
            subprocess.run(["/usr/bin/storescu", "-xe", "127.0.0.1", str(port), str(sent)], check=True,
                           env={"TCP_NODELAY": "1"}, timeout=30)
        finally:
            server.shutdown()
    finally:
        adjustments.undo_pynetdicom_adjustments()
    assert dimse_messages.write_file_meta_info is write_file_meta_info
    assert len(received) == 1
    head = _pydicoms(sop_class_uid=UID(CR), sop_instance_uid=UID(ds.SOPInstanceUID),
                     transfer_syntax=UID("1.2.840.10008.1.2.1"))
    assert received[0][:132] == b"\0" * 128 + b"DICM"
    assert isinstance(head, bytes)
    assert received[0][132:132 + len(head)] == head
    assert pydicom.dcmread(io.BytesIO(received[0])).PatientID == "X"
