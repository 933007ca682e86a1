"""C-MOVE and C-GET sub-operations that send a stored file as it is, instead of decoding it into a
pydicom dataset and encoding it again.

pynetdicom's C-MOVE/C-GET service takes a :class:`~pydicom.dataset.Dataset` per sub-operation from the
handler and gives it to ``send_c_store``. Reading a stored instance with ``dcmread`` and encoding it
again costs more CPU than all of pynetdicom's messaging for a small instance, and buys nothing when the
receiver accepted the syntax the file is stored in: the bytes it gets are the stored ones either way.
``send_c_store`` also takes a *path* and, with ``pynetdicom._config.STORE_SEND_CHUNKED_DATASET`` on
(:mod:`pacs_node.dicom.adjustments` turns it on while a listener runs), streams the file's data set from
disk without decoding it; with it off it reads the file with ``dcmread``, which is still correct.

So the handler yields a :class:`StoredFile` (a dataset that holds only the SOP Class and Instance UIDs,
which pynetdicom needs to list a failed sub-operation) and :func:`send_stored_files_as_they_are` makes
the sending association hand its path to pynetdicom.

:func:`skip_unlogged_narration` takes pynetdicom's narrating handlers off an association whose lines
nobody would see: they describe every message and PDU, a tenth of a C-MOVE sub-operation's CPU.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pydicom import Dataset
from pynetdicom import evt
from pynetdicom._handlers import (
    standard_dimse_recv_handler,
    standard_dimse_sent_handler,
    standard_pdu_recv_handler,
    standard_pdu_sent_handler,
)
from pynetdicom.association import Association

log = logging.getLogger(__name__)


class StoredFile(Dataset):
    """One sub-operation's instance, sent as the stored file at ``path``: only an association prepared by
    :func:`send_stored_files_as_they_are` can send it (on any other its two elements are all there is)."""

    def __init__(self, sop_class_uid: str, sop_instance_uid: str, path: Path) -> None:
        super().__init__()
        self.SOPClassUID = sop_class_uid
        self.SOPInstanceUID = sop_instance_uid
        self.__dict__["stored_path"] = path  # not a data element


def send_stored_files_as_they_are(assoc: Association) -> None:
    """Make ``assoc.send_c_store`` send a :class:`StoredFile` by its path (see the module docstring);
    everything else goes to pynetdicom's ``send_c_store`` unchanged. Only this association is changed;
    calling it twice changes nothing more. A file that cannot be sent (gone, unreadable) is logged here
    and raises, which pynetdicom counts as a failed sub-operation (its UID in the Failed SOP Instance UID
    List)."""
    if "send_c_store" in vars(assoc):
        return
    send = assoc.send_c_store

    def send_c_store(dataset: Any, *args: Any, **kwargs: Any) -> Dataset:
        if not isinstance(dataset, StoredFile):
            return send(dataset, *args, **kwargs)
        try:
            return send(dataset.stored_path, *args, **kwargs)
        except Exception as exc:
            if assoc.is_established:  # else the association is gone, which pynetdicom reports itself
                log.error("cannot send stored instance %s (%s): %s", dataset.SOPInstanceUID,
                          dataset.stored_path, exc)
            raise

    assoc.send_c_store = send_c_store  # type: ignore[method-assign]


_NARRATION = ((evt.EVT_DIMSE_RECV, standard_dimse_recv_handler), (evt.EVT_DIMSE_SENT, standard_dimse_sent_handler),
              (evt.EVT_PDU_RECV, standard_pdu_recv_handler), (evt.EVT_PDU_SENT, standard_pdu_sent_handler))


def skip_unlogged_narration(assoc: Association) -> None:
    """Unbind pynetdicom's standard message and PDU handlers from ``assoc`` when their INFO and DEBUG
    lines would be dropped anyway (the node holds pynetdicom at WARNING unless ``logging.level`` is
    DEBUG, :mod:`pacs_node.ops.logs`): each formats its lines for every message and PDU first, a tenth
    of the CPU of a C-MOVE sub-operation. With DEBUG logging everything stays as pynetdicom has it."""
    if logging.getLogger(standard_dimse_sent_handler.__module__).isEnabledFor(logging.INFO):
        return
    for event, handler in _NARRATION:
        assoc.unbind(event, handler)
