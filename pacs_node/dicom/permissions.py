"""Who may do what: the calling AEs that may associate, and for each the services it may use and the
C-MOVE destinations it may name (``allowed_callers`` and ``any_caller_services`` in the config).

Secure by default: a caller that is not listed, let in by ``allow_any_caller`` for a first run or a
modality nobody configured, may echo and send images, never query or retrieve the patient data of
others; a listed caller has every service unless its entry says otherwise (a modality should be given
``services = ["store"]``).
"""

from __future__ import annotations

from dataclasses import dataclass

from pacs_node.config import AllowedCaller, Service, Settings


@dataclass(frozen=True)
class Grant:
    """What one caller may do."""

    services: frozenset[Service]
    #: Peer names its C-MOVEs may name; ``None``: any configured peer.
    move_destinations: frozenset[str] | None = None

    def may_move_to(self, peer_name: str) -> bool:
        return Service.MOVE in self.services and (
            self.move_destinations is None or peer_name in self.move_destinations)


class CallerPolicy:
    """The grants of the config, looked up by calling AE title and address."""

    def __init__(self, settings: Settings) -> None:
        self._callers: list[AllowedCaller] = list(settings.allowed_callers)
        self._anyone: Grant | None = (
            Grant(frozenset(settings.any_caller_services), frozenset())
            if settings.allow_any_caller and not self._callers else None)

    def grant(self, ae_title: str, host: str | None) -> Grant | None:
        """What ``ae_title`` calling from ``host`` may do; ``None``: it may not associate at all."""
        title = ae_title.strip()
        for entry in self._callers:
            if entry.ae_title == title and (entry.host is None or entry.host == host):
                return Grant(frozenset(entry.services),
                             frozenset(entry.move_destinations) if entry.move_destinations else None)
        return self._anyone

    def allows(self, ae_title: str, host: str | None, service: Service) -> bool:
        grant = self.grant(ae_title, host)
        return grant is not None and service in grant.services


#: General DIMSE status "Refused: Not authorized" (PS3.7 C.5.23).
NOT_AUTHORISED = 0x0124
