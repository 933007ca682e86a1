"""A PACS that forwards everything: an ultrasound sent by DCMTK storescu is acknowledged, kept or
discarded by policy and recorded as not processed; with ``policy.any_storage_class = false`` it is
refused at association time, as before."""

from __future__ import annotations

from pathlib import Path

import pytest
from pynetdicom.sop_class import UltrasoundImageStorage
from sqlalchemy import select

from pacs_node.config import Settings
from pacs_node.dicom.server import Listener
from pacs_node.ops.context import ServerContext
from storage.schema import Instance, Job
from tests.pacs_node.helpers import make_cr, storescu
from tests.support import free_port


def _listen(tmp_path: Path, **policy: object) -> tuple[Settings, ServerContext, Listener]:
    settings = Settings(node={"ae_title": "PACSNODE", "port": free_port(), "bind": "127.0.0.1",
                              "data_dir": tmp_path / "var"},
                        store={"min_free_bytes": 0}, pipeline={"bundle": "fake"}, policy=policy)
    runtime = ServerContext.open(settings)
    listener = Listener(settings, runtime)
    listener.start()
    return settings, runtime, listener


@pytest.mark.parametrize("non_chest", ["keep", "discard"])
def test_an_ultrasound_is_acknowledged_and_recorded_not_processed(tmp_path: Path, non_chest: str) -> None:
    settings, runtime, listener = _listen(tmp_path, non_chest=non_chest)
    try:
        ds = make_cr(tmp_path / "us.dcm", modality="US", body_part="ABDOMEN", sop_class=UltrasoundImageStorage)
        sent = storescu(settings.node.port, [tmp_path / "us.dcm"])
        assert sent.returncode == 0, sent.stderr
        with runtime.read_session() as session:
            row = session.scalars(select(Instance).where(Instance.sop_instance_uid == ds.SOPInstanceUID)).one()
            jobs = session.scalars(select(Job)).all()
        assert row.disposition == "not_processed" and UltrasoundImageStorage in row.reason
        assert jobs == []  # nothing to analyse
        assert bool(row.path) == (non_chest == "keep")
    finally:
        listener.stop()
        runtime.close()


def test_only_radiograph_and_result_classes_when_configured(tmp_path: Path) -> None:
    settings, runtime, listener = _listen(tmp_path, any_storage_class=False)
    try:
        make_cr(tmp_path / "us.dcm", modality="US", sop_class=UltrasoundImageStorage)
        sent = storescu(settings.node.port, [tmp_path / "us.dcm"])
        assert sent.returncode != 0 and "no presentation context" in (sent.stdout + sent.stderr).lower()
    finally:
        listener.stop()
        runtime.close()
