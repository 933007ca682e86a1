"""The acceptance policy and result routing, as pure functions."""

from __future__ import annotations

import tomllib

import pytest
from pydicom import Dataset

from pacs_node.config import Settings
from pacs_node.work.acceptance import decide
from pacs_node.work.routing import RouteKey, destinations

CR = "1.2.840.10008.5.1.4.1.1.1"
DX = "1.2.840.10008.5.1.4.1.1.1.1"
SC = "1.2.840.10008.5.1.4.1.1.7"
CT = "1.2.840.10008.5.1.4.1.1.2"
SR3D = "1.2.840.10008.5.1.4.1.1.88.34"


def header(sop_class: str, modality: str, body_part: str | None = None, description: str | None = None) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID, ds.Modality = sop_class, modality
    if body_part is not None:
        ds.BodyPartExamined = body_part
    if description is not None:
        ds.StudyDescription = description
    return ds


@pytest.mark.parametrize(
    ("ds", "analyse"),
    [
        (header(CR, "CR", "CHEST"), True),
        (header(DX, "DX"), True),  # chest rooms often leave the body part empty
        (header(CR, "CR", "HAND"), False),
        (header(DX, "DX", "SKULL", "XR CHEST PA"), True),  # description wins over a wrong body part
        (header(SC, "OT", "THORAX"), True),
        (header(SC, "OT", None, "Chest 2 views"), True),
        (header(SC, "OT"), False),
        (header(CT, "CT", "CHEST"), False),
        (header(SR3D, "SR"), False),
    ],
)
def test_only_chest_radiographs_are_analysed(ds: Dataset, analyse: bool) -> None:
    decision = decide(ds)
    assert decision.analyse is analyse
    assert (decision.reason is None) is analyse


def _settings(text: str) -> Settings:
    return Settings(**tomllib.loads(text))


PEERS = """
[peers.pacs]
ae_title = "MAINPACS"
host = "10.0.0.1"
port = 104
[peers.er]
ae_title = "ER_VIEW"
host = "10.0.0.2"
port = 104
[peers.room1]
ae_title = "CR_ROOM1"
host = "10.0.0.3"
port = 104
[peers.archive]
ae_title = "ARCHIVE"
host = "10.0.0.4"
port = 104
"""


def test_default_route_is_back_to_the_sender() -> None:
    s = _settings(PEERS)
    assert destinations(s, RouteKey("cr_room1", "CR", None)) == ["room1"]
    assert destinations(s, RouteKey("UNKNOWN", "CR", None)) == []


def test_rules_match_on_every_given_field_and_always_adds() -> None:
    s = _settings(PEERS + """
[routing]
always = ["archive"]
[[routing.rules]]
station_name = "ER-XRAY"
destinations = ["er", "pacs"]
[[routing.rules]]
calling_ae = "CR_ROOM1"
modality = "DX"
destinations = ["pacs"]
""")
    assert destinations(s, RouteKey("CR_ROOM1", "CR", "ER-XRAY")) == ["er", "pacs", "archive"]
    assert destinations(s, RouteKey("CR_ROOM1", "DX", None)) == ["pacs", "archive"]
    # no rule matched: back to the sender, plus the archive
    assert destinations(s, RouteKey("CR_ROOM1", "CR", "WARD")) == ["room1", "archive"]


def test_default_none_keeps_results_local() -> None:
    s = _settings(PEERS + "[routing]\ndefault = \"none\"\n")
    assert destinations(s, RouteKey("CR_ROOM1", "CR", None)) == []
