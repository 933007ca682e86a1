"""A small archive (SQLite + instance store) with two patients' chest radiographs and this node's
results for them, and a Q/R SCP serving it on loopback with the production handlers."""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydicom import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from sqlalchemy import Engine

from pacs_node.config import Peer
from pacs_node.dicom.qr import QueryRetrieveService
from pacs_node.work.instance_record import instance_record
from pacs_node.results import ResultOptions, build_result_objects
from pipelines.interface import FakePipeline
from storage.db import make_engine, make_sessionmaker, sqlite_url, upgrade
from storage.repository import add_instance
from storage.schema import Disposition, Origin
from storage.store import InstanceStore
from tests.pacs_node.results.synthetic import make_cr
from tests.support import free_port

QR_AET = "QRSCP"


@dataclass
class Archive:
    root: Path
    store: InstanceStore
    sessions: object
    studies: dict[str, list[Dataset]] = field(default_factory=dict)  # study UID -> all its objects

    @classmethod
    def open(cls, root: Path) -> tuple[Archive, Engine]:
        """An empty archive under ``root`` (a migrated SQLite database and a store), and its engine."""
        url = sqlite_url(root / "node.sqlite3")
        upgrade(url)
        engine = make_engine(url)
        return cls(root, InstanceStore(root / "store"), make_sessionmaker(engine)), engine

    def add(self, ds: Dataset, origin: Origin, source_uid: str | None = None) -> None:
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        record = instance_record(ds)
        relpath = self.store.relpath_for(record.study_instance_uid, record.series_instance_uid,
                                         record.sop_instance_uid)
        self.store.write_bytes(relpath, buffer.getvalue())
        with self.sessions() as session, session.begin():
            add_instance(session, record, path=relpath, size_bytes=len(buffer.getvalue()),
                         origin=origin,
                         disposition=Disposition.RESULT if origin is Origin.RESULT else Disposition.QUEUED,
                         source_sop_instance_uid=source_uid)
        self.studies.setdefault(str(ds.StudyInstanceUID), []).append(ds)


@pytest.fixture(scope="package")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    archive, engine = Archive.open(tmp_path_factory.mktemp("archive"))
    images = [
        make_cr(patient_id="P-001", patient_name="Doe^Jane", study_uid=generate_uid(),
                study_date="20240115", accession="ACC1"),
        make_cr(patient_id="P-002", patient_name="Roe^Richard", study_uid=generate_uid(),
                study_date="20240320", accession="ACC2"),
    ]
    pipeline = FakePipeline()
    for image, result in zip(images, pipeline.analyse(images), strict=True):
        archive.add(image, Origin.RECEIVED)
        for obj in build_result_objects(image, result, ResultOptions()):
            archive.add(obj, Origin.RESULT, source_uid=str(image.SOPInstanceUID))
    yield archive
    engine.dispose()


@dataclass
class Scp:
    port: int
    service: QueryRetrieveService
    peers: dict[str, Peer]


@pytest.fixture(scope="package")
def store_scp_port() -> int:
    """Port reserved for the C-MOVE destination (a storescp a test starts, AE title STORESCP)."""
    return free_port()


@pytest.fixture(scope="package")
def orthanc_ports() -> tuple[int, int]:
    """(DICOM, HTTP) ports reserved for the Orthanc the PACS-flow test starts (AE title ORTHANC)."""
    return free_port(), free_port()


@pytest.fixture(scope="package")
def qr_scp(archive: Archive, store_scp_port: int, orthanc_ports: tuple[int, int]) -> Iterator[Scp]:
    peers = {"storescp": Peer(ae_title="STORESCP", host="127.0.0.1", port=store_scp_port),
             "orthanc": Peer(ae_title="ORTHANC", host="127.0.0.1", port=orthanc_ports[0])}
    service = QueryRetrieveService(archive.sessions, archive.store, peers, ae_title=QR_AET)
    ae = AE(ae_title=QR_AET)
    service.add_contexts(ae)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=service.handlers())
    yield Scp(port, service, peers)
    server.shutdown()
