"""Deterministic UIDs for result objects.

A result object's UIDs depend only on what it is *about* (the source SOP Instance UID), *who* made it
(bundle name and version) and *what kind* of object it is. Re-running a job or re-sending a result
therefore reproduces the same SOP Instance UID, and a PACS sees an update of the same object instead
of a duplicate.
"""

from __future__ import annotations

import hashlib
import uuid

# A fixed namespace so that our UIDs cannot collide with another product's uuid5-derived ones.
_NAMESPACE = uuid.UUID("6f0d2c1e-4a59-5b7e-9c3d-2a8e5f1b7c40")
_NAMESPACE_BYTES = _NAMESPACE.bytes
#: RFC 4122 variant (10) and version (5) bits, as ``uuid.UUID(bytes=..., version=5)`` sets them
_VARIANT_VERSION_MASK = ~((0xC000 << 48) | (0xF000 << 64))
_VARIANT_VERSION = (0x8000 << 48) | (5 << 76)


def derived_uid(*parts: str) -> str:
    """``2.25.<uuid5 as integer>`` (PS3.5 B.2): at most 44 characters, always a valid UID.

    ``uuid.uuid5(_NAMESPACE, name).int`` computed without making a UUID object (a third of the cost;
    an image's result objects derive some 25 of these)."""
    digest = hashlib.sha1(_NAMESPACE_BYTES + "\x1f".join(parts).encode("utf-8")).digest()
    return f"2.25.{int.from_bytes(digest[:16], 'big') & _VARIANT_VERSION_MASK | _VARIANT_VERSION}"


def result_uid(source_sop_instance_uid: str, bundle_name: str, bundle_version: str, kind: str) -> str:
    """SOP Instance UID of one result object (``kind`` e.g. ``"ai-sr"``, ``"kos"``)."""
    return derived_uid("instance", source_sop_instance_uid, bundle_name, bundle_version, kind)


def result_series_uid(study_instance_uid: str, bundle_name: str, bundle_version: str, kind: str) -> str:
    """Series Instance UID: one series per (study, bundle, kind), so results of several images of
    one study by one model land in the same series."""
    return derived_uid("series", study_instance_uid, bundle_name, bundle_version, kind)
