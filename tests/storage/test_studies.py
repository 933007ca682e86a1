"""The worker's study queries, on SQLite and PostgreSQL: a study's images read in one statement, and a
batch's analyses recorded with one read and one write, the same as recording them one by one."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy.orm import Session, sessionmaker

from storage.repository import add_instance
from storage.schema import Disposition, Origin, StudyState, utcnow
from storage.studies import (
    analysed_state,
    get_study,
    instance_set_hash,
    record_analyses,
    record_analysis,
    set_pending,
    study_image_uids,
    study_images,
    touch_study,
)


def _receive(session: Session, study: str, uid: str, *, disposition: Disposition = Disposition.QUEUED,
             origin: Origin = Origin.RECEIVED) -> None:
    add_instance(session, sop_instance_uid=uid, sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
                 transfer_syntax_uid="1.2.840.10008.1.2.1", study_instance_uid=study, series_instance_uid=f"{study}.1",
                 path=f"{uid}.dcm", size_bytes=10, origin=origin, disposition=disposition, calling_ae="MODALITY")


def _open(session: Session, study: str) -> str:
    """The study touched and its pending set named, as the listener leaves it; that set's hash."""
    now = utcnow()
    touch_study(session, study, now, now + timedelta(seconds=1))
    set_hash = instance_set_hash(study_image_uids(session, study))
    set_pending(session, study, set_hash)
    return set_hash


def test_study_images_are_the_analysable_ones_with_their_paths_and_senders(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        _receive(session, "1.9", "1.9.1")
        _receive(session, "1.9", "1.9.2")
        _receive(session, "1.9", "1.9.3", disposition=Disposition.NOT_PROCESSED)
        _receive(session, "1.9", "1.9.4", origin=Origin.RESULT, disposition=Disposition.RESULT)
        _receive(session, "1.8", "1.8.1")
    with sessions() as session:
        images = study_images(session, "1.9")
        assert [image.sop_instance_uid for image in images] == study_image_uids(session, "1.9") == ["1.9.1", "1.9.2"]
        assert [(image.path, image.calling_ae, image.transfer_syntax_uid) for image in images] == [
            ("1.9.1.dcm", "MODALITY", "1.2.840.10008.1.2.1"), ("1.9.2.dcm", "MODALITY", "1.2.840.10008.1.2.1")]
        assert study_images(session, "1.7") == []


def test_a_batch_of_analyses_is_recorded_as_one_by_one(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        _receive(session, "2.1", "2.1.1")
        first = _open(session, "2.1")
        _receive(session, "2.2", "2.2.1")
        other = _open(session, "2.2")
    with sessions.begin() as session:  # a new study's first analysis, and a study never touched (legacy job)
        assert record_analyses(session, [("2.1", first, {"results": {"ai-sr": "r1"}}),
                                         ("2.3", "legacy", {"results": {}})]) == [1, 1]
    with sessions.begin() as session:
        _receive(session, "2.1", "2.1.2")
        second = _open(session, "2.1")
    with sessions.begin() as session:
        # 2.1's first set run again (a job retried after a crash) keeps its version and leaves the study
        # waiting for its pending set; then its new set makes version 2, analysed; 2.2 is analysed alone
        versions = record_analyses(session, [("2.1", first, {"run": "again"}), ("2.2", other, {}),
                                             ("2.1", second, {"run": "new set"})])
        assert versions == [1, 1, 2]
    with sessions() as session:
        study = get_study(session, "2.1")
        assert study is not None
        assert (study.version, study.analysed_set_hash, study.state) == (2, second, StudyState.ANALYSED.value)
        assert study.analysis == {"run": "new set", "version": 2}
        state = analysed_state(session, "2.1")
        assert state is not None and (state.version, state.analysed_set_hash) == (2, second)
        legacy = get_study(session, "2.3")
        assert legacy is not None and (legacy.version, legacy.state) == (1, StudyState.ANALYSED.value)
        assert analysed_state(session, "2.4") is None
    with sessions.begin() as session:  # the old set once more, after the new one: a version of its own
        assert record_analysis(session, "2.1", first, {}) == 3
    with sessions() as session:
        study = get_study(session, "2.1")
        assert study is not None and (study.version, study.state) == (3, StudyState.ANALYSED.value)
