"""The storage commitment question, asked of the database: which of these instances does the node hold?"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import select
from sqlalchemy.orm import Session

from storage.schema import Instance


def held_instances(session: Session, sop_instance_uids: Iterable[str]) -> dict[str, str]:
    """SOP Instance UID -> SOP Class UID of those among ``sop_instance_uids`` whose file the store keeps
    (a row of an instance discarded by policy, with no file, is not held)."""
    uids = list(dict.fromkeys(sop_instance_uids))
    if not uids:
        return {}
    rows = session.execute(select(Instance.sop_instance_uid, Instance.sop_class_uid)
                           .where(Instance.sop_instance_uid.in_(uids), Instance.path != ""))
    return {uid: sop_class for uid, sop_class in rows}
