"""C-FIND matching rules on both databases the node supports: SQLite (GLOB/LIKE) and PostgreSQL
(LIKE with escapes) must agree on case and on characters that are special to SQL but not to DICOM."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import Dataset

from pacs_node.dicom.qr.find import entity_rows, matching_keys
from pacs_node.dicom.qr.matching import Level
from storage.db import make_engine, make_sessionmaker, sqlite_url, upgrade
from storage.repository import add_instance

PG_SERVER = os.environ.get("PACS_NODE_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")

ROWS = [  # patient id, name, study uid, date, modality, sop uid
    ("A_1", "Doe^Jane", "1.2.1", "20240115", "CR", "1.2.1.1"),
    ("A_1", "Doe^Jane", "1.2.1", "20240115", "SR", "1.2.1.2"),
    ("AB1", "DOE^JOHN", "1.2.2", "20240320", "CR", "1.2.2.1"),
    ("50%", "Roe^R", "1.2.3", "20231231", "CR", "1.2.3.1"),
]


@pytest.fixture(params=["sqlite", "postgresql"])
def sessions(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[object]:
    schema = None
    if request.param == "sqlite":
        url = sqlite_url(tmp_path / "q.sqlite3")
    else:
        import psycopg
        from sqlalchemy.engine import make_url

        parsed = make_url(PG_SERVER)
        conninfo = dict(host=parsed.host, port=parsed.port or 5432, user=parsed.username,
                        dbname=parsed.database, password=parsed.password, autocommit=True)
        try:
            with psycopg.connect(connect_timeout=3, **conninfo) as connection:
                schema = f"qr_{secrets.token_hex(6)}"
                connection.execute(f'CREATE SCHEMA "{schema}"')
        except psycopg.Error as exc:
            pytest.skip(f"PostgreSQL unreachable: {exc}")
        url = f"{PG_SERVER}?options=-csearch_path%3D{schema}"
    upgrade(url)
    engine = make_engine(url)
    factory = make_sessionmaker(engine)
    with factory() as session, session.begin():
        for patient_id, name, study, date, modality, sop in ROWS:
            add_instance(session, sop_instance_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
                         transfer_syntax_uid="1.2.840.10008.1.2.1", study_instance_uid=study,
                         series_instance_uid=f"{study}.{modality}", patient_id=patient_id, patient_name=name,
                         study_date=date, modality=modality, path=f"x/{sop}.dcm", size_bytes=1,
                         disposition="queued")
    yield factory
    engine.dispose()
    if schema is not None:
        with psycopg.connect(**conninfo) as connection:
            connection.execute(f'DROP SCHEMA "{schema}" CASCADE')


def keys(sessions, level: Level, **query: str) -> list[str]:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = level.value
    for keyword, value in query.items():
        setattr(identifier, keyword, value)
    with sessions() as session:
        return matching_keys(session, identifier, level, limit=100)


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({"PatientName": "doe*"}, ["1.2.1", "1.2.2"]),
        ({"PatientName": "DOE^J?NE"}, ["1.2.1"]),
        ({"PatientName": "doe^jane"}, ["1.2.1"]),
        ({"PatientID": "a_1"}, []),
        ({"PatientID": "A_*"}, ["1.2.1"]),  # "_" is literal, not SQL's any-character
        ({"PatientID": "A?1"}, ["1.2.1", "1.2.2"]),
        ({"PatientID": "5*%"}, ["1.2.3"]),
        ({"PatientID": "5%"}, []),
        ({"StudyDate": "20240101-"}, ["1.2.1", "1.2.2"]),
        ({"StudyDate": "-20231231"}, ["1.2.3"]),
        ({"ModalitiesInStudy": "SR"}, ["1.2.1"]),
        ({"ModalitiesInStudy": "MR\\SR"}, ["1.2.1"]),
        ({"StudyInstanceUID": "1.2.3\\1.2.2"}, ["1.2.2", "1.2.3"]),
    ],
)
def test_study_matching(sessions, query: dict[str, str], expected: list[str]) -> None:
    assert keys(sessions, Level.STUDY, **query) == expected


def test_counts_cover_the_whole_study(sessions) -> None:
    study_keys = keys(sessions, Level.STUDY, ModalitiesInStudy="SR")
    with sessions() as session:
        (row,) = entity_rows(session, Level.STUDY, study_keys)
    assert row["instances"] == 2 and row["series"] == 2
    assert row["ModalitiesInStudy"] == ["CR", "SR"]


def test_patient_level(sessions) -> None:
    assert set(keys(sessions, Level.PATIENT, PatientName="*o*")) == {"50%", "A_1", "AB1"}
    with sessions() as session:
        rows = list(entity_rows(session, Level.PATIENT, ["A_1"]))
    assert rows[0]["studies"] == 1 and rows[0]["instances"] == 2
