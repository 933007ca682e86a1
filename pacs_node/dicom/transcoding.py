"""Transcoding on the way out: an instance goes in a transfer syntax the receiving peer accepts.

Instances are stored as received (a JPEG 2000 radiograph stays JPEG 2000). A peer that accepts none of
a stored syntax gets the instance decoded (pydicom with the pylibjpeg/pyjpegls plugins) and sent
uncompressed, or re-encoded in a *lossless* syntax it accepts when it accepts no uncompressed one. The
node never encodes lossily: a lossless source arrives pixel-identical, a lossy source arrives with exactly
the pixels its own decoder would show. A peer's ``transfer_syntax`` is used first when it accepts it.

Proposals (:func:`proposed_syntaxes`) put each syntax in its own presentation context, so a peer that
could take the stored syntax is never made to choose an uncompressed one from a shared list.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Collection, Iterable
from typing import Any

from pydicom import Dataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

log = logging.getLogger(__name__)

#: Syntaxes any peer's pixel data can be sent in after decoding, in our order of preference.
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
_NATIVE = frozenset({*UNCOMPRESSED, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian})
#: Lossless syntaxes the installed encoders write (pyjpegls, pylibjpeg-openjpeg, pydicom's RLE).
LOSSLESS_ENCODABLE = (JPEGLSLossless, JPEG2000Lossless, RLELossless)


class TranscodeError(ValueError):
    """The instance cannot be put in any syntax the peer accepts (or decoding it failed)."""


def accepted_syntaxes(assoc: Any) -> dict[str, list[str]]:
    """SOP class -> transfer syntaxes accepted on a pynetdicom association (for the C-STOREs sent on it)."""
    accepted: dict[str, list[str]] = {}
    for cx in assoc.accepted_contexts:
        accepted.setdefault(str(cx.abstract_syntax), []).append(str(cx.transfer_syntax[0]))
    return accepted


def proposed_syntaxes(stored: Iterable[str], preferred: str | None = None) -> list[list[UID]]:
    """Presentation contexts' transfer syntaxes for one SOP class: each stored syntax alone, the
    peer's preferred one alone, then the uncompressed pair (always, so decoding is an option)."""
    contexts: list[list[UID]] = []
    for ts in [*stored, *([preferred] if preferred else [])]:
        if UID(ts) not in UNCOMPRESSED and [UID(ts)] not in contexts:
            contexts.append([UID(ts)])
    return [*contexts, list(UNCOMPRESSED)]


def _can_produce(target: UID, source: UID) -> bool:
    """Whether we can write ``target`` from ``source`` without losing anything the source has."""
    return target == source or target in UNCOMPRESSED or target in LOSSLESS_ENCODABLE


def choose_syntax(source: str, accepted: Collection[str], preferred: str | None = None) -> UID | None:
    """The syntax to send an instance stored in ``source`` to a peer that accepted ``accepted``."""
    source, accepted = UID(source), {UID(ts) for ts in accepted}
    if preferred and UID(preferred) in accepted and _can_produce(UID(preferred), source):
        return UID(preferred)
    if source in accepted:
        return source
    if source in _NATIVE:  # no pixels to decode: pynetdicom re-encodes between native syntaxes itself
        return next((ts for ts in UNCOMPRESSED if ts in accepted), None)
    for ts in (*UNCOMPRESSED, *LOSSLESS_ENCODABLE):
        if ts in accepted:
            return ts
    return None


def for_peer(ds: Dataset, accepted: Collection[str], preferred: str | None = None) -> Dataset:
    """``ds`` as it can be sent to a peer that accepted ``accepted`` for its SOP class: itself when no
    change is needed, else a transcoded copy (the stored dataset is left untouched)."""
    source = UID(ds.file_meta.TransferSyntaxUID)
    target = choose_syntax(source, accepted, preferred)
    if target is None:
        offered = ", ".join(sorted(UID(ts).name for ts in accepted)) or "nothing"
        raise TranscodeError(f"the peer accepts {offered} for this SOP class; the instance is {source.name} "
                             "and no lossless conversion reaches one of those")
    if target == source or (source in _NATIVE and target in _NATIVE):
        return ds
    out = copy.deepcopy(ds)
    try:
        # The same instance in another encoding: it keeps its SOP Instance UID (pydicom would mint a new one),
        # so the receiver's copy is recognisably ours and a second send is a duplicate, not a second image.
        if source.is_compressed:
            out.decompress(generate_instance_uid=False)
        if target in LOSSLESS_ENCODABLE:
            out.compress(target, generate_instance_uid=False)
        else:
            out.file_meta.TransferSyntaxUID = target
    except Exception as exc:  # decoder/encoder plugins raise their own types
        raise TranscodeError(f"cannot convert {source.name} to {target.name}: {type(exc).__name__}: {exc}") from exc
    log.debug("transcoded %s to %s", source.name, target.name)
    return out
