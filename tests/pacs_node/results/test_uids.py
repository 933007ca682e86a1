"""Derived UIDs are the uuid5 ones they always were: a result re-built by a newer node must keep its SOP
Instance UID (a PACS then sees an update of the same object, not a duplicate)."""

from __future__ import annotations

import uuid

import pytest

from pacs_node.results.uids import _NAMESPACE, derived_uid


@pytest.mark.parametrize("parts", [
    ("instance", "1.2.826.0.1.3680043.8.498.1", "chexpert-demo", "0.1", "ai-sr"),
    ("tracking", "2.25.1", "fake", "0", "Enlarged Cardiomediastinum"),
    ("template-probe", "1", "Müller^Jürgen ≥"),
    ("",),
    ("a", "", "b"),
])
def test_a_derived_uid_is_uuid5_as_an_integer(parts: tuple[str, ...]) -> None:
    assert derived_uid(*parts) == f"2.25.{uuid.uuid5(_NAMESPACE, chr(0x1F).join(parts)).int}"


def test_derived_uids_are_valid_uids_for_many_names() -> None:
    for n in range(2000):
        parts = ("series", f"1.2.3.{n}", "é" * (n % 4), str(n * 7919))
        uid = derived_uid(*parts)
        assert uid == f"2.25.{uuid.uuid5(_NAMESPACE, chr(0x1F).join(parts)).int}"
        assert len(uid) <= 44 and uid.replace(".", "").isdigit()
