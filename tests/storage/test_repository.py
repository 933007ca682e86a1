"""Instance rows: idempotent by SOP Instance UID on both databases, strict about field names."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy.orm import Session, sessionmaker

from storage.repository import (
    add_instance,
    delete_instance,
    get_instance,
    instances_for_study,
    instances_older_than,
    results_for,
)
from storage.schema import Disposition, Origin, utcnow

STUDY = "1.2.826.0.1.3680043.8.498.10"


def _fields(sop: str, **overrides) -> dict:
    fields = dict(
        sop_instance_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
        transfer_syntax_uid="1.2.840.10008.1.2.1", study_instance_uid=STUDY,
        series_instance_uid=f"{STUDY}.1", path=f"x/{sop}.dcm", size_bytes=10, disposition=Disposition.QUEUED,
        modality="CR", instance_number=int(sop.rsplit(".", 1)[1]),
    )
    return fields | overrides


def test_add_instance_is_idempotent_without_poisoning_the_transaction(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        assert add_instance(session, **_fields(f"{STUDY}.1.1"))
        assert not add_instance(session, **_fields(f"{STUDY}.1.1", path="elsewhere.dcm"))
        assert add_instance(session, **_fields(f"{STUDY}.1.2"))
    with sessions.begin() as session:
        assert not add_instance(session, **_fields(f"{STUDY}.1.2"))
        row = get_instance(session, f"{STUDY}.1.1")
        assert (row.path, row.origin, row.disposition) == (f"x/{STUDY}.1.1.dcm", "received", "queued")
        assert row.received_at is not None
        assert get_instance(session, "9.9.9") is None


def test_add_instance_names_bad_fields(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        with pytest.raises(TypeError, match="unknown Instance field\\(s\\): patient_nmae"):
            add_instance(session, **_fields(f"{STUDY}.1.1"), patient_nmae="x")
        fields = _fields(f"{STUDY}.1.1")
        del fields["path"]
        with pytest.raises(TypeError, match="missing required Instance field\\(s\\): path"):
            add_instance(session, **fields)


def test_study_results_retention_and_delete(sessions: sessionmaker[Session]) -> None:
    old = utcnow() - timedelta(days=400)
    with sessions.begin() as session:
        add_instance(session, **_fields(f"{STUDY}.1.2"))
        add_instance(session, **_fields(f"{STUDY}.1.1", received_at=old))
        add_instance(session, **_fields(f"{STUDY}.2.1", series_instance_uid=f"{STUDY}.2", origin=Origin.RESULT,
                                        disposition=Disposition.RESULT, source_sop_instance_uid=f"{STUDY}.1.1"))
    with sessions.begin() as session:
        assert [i.sop_instance_uid for i in instances_for_study(session, STUDY)] == \
            [f"{STUDY}.1.1", f"{STUDY}.1.2", f"{STUDY}.2.1"]
        assert [i.sop_instance_uid for i in results_for(session, f"{STUDY}.1.1")] == [f"{STUDY}.2.1"]
        assert [i.sop_instance_uid for i in instances_older_than(session, timedelta(days=365))] == [f"{STUDY}.1.1"]
        assert instances_older_than(session, timedelta(days=365), origin="result") == []
        assert delete_instance(session, f"{STUDY}.1.1") == f"x/{STUDY}.1.1.dcm"
        assert delete_instance(session, f"{STUDY}.1.1") is None
    with sessions() as session:
        assert len(instances_for_study(session, STUDY)) == 2
