"""Where the results of one received instance go.

Every rule whose fields all match contributes its destinations; ``routing.always`` peers get every
result. When no rule matches, ``routing.default = "sender"`` returns the results to the peer configured
with the calling AE's title (a modality or PACS that pushed the image usually wants the report back).
"""

from __future__ import annotations

from dataclasses import dataclass

from pacs_node.config import RoutingRule, Settings


@dataclass(frozen=True)
class RouteKey:
    """What rules match on, taken from the received instance and its association."""

    calling_ae: str | None
    modality: str | None
    station_name: str | None


def _same(expected: str | None, actual: str | None, *, fold: bool) -> bool:
    if expected is None:
        return True
    if actual is None:
        return False
    a, b = expected.strip(), actual.strip()
    return a.upper() == b.upper() if fold else a == b


def rule_matches(rule: RoutingRule, key: RouteKey) -> bool:
    return (
        _same(rule.calling_ae, key.calling_ae, fold=True)
        and _same(rule.modality, key.modality, fold=True)
        and _same(rule.station_name, key.station_name, fold=False)
    )


def destinations(settings: Settings, key: RouteKey) -> list[str]:
    """Peer names, each once, in the order configured (rules first, then ``always``)."""
    chosen: list[str] = []
    for rule in settings.routing.rules:
        if rule_matches(rule, key):
            chosen.extend(rule.destinations)
    if not chosen and settings.routing.default == "sender" and key.calling_ae:
        sender = settings.peer_for_ae(key.calling_ae)
        if sender is not None:
            chosen.append(sender[0])
    chosen.extend(settings.routing.always)
    return list(dict.fromkeys(chosen))


def settle_seconds(settings: Settings, key: RouteKey) -> float:
    """How long a study from this sender must be quiet before it is analysed: the longest ``settle_s``
    of the matching rules that set one, else ``studies.settle_s``."""
    own = [rule.settle_s for rule in settings.routing.rules if rule.settle_s is not None and rule_matches(rule, key)]
    return max(own) if own else settings.studies.settle_s
