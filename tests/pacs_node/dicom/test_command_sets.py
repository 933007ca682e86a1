"""DIMSE command sets written by pacs_node.dicom.command_sets are byte for byte pydicom's (through
pynetdicom's own encoder), for every message type pynetdicom builds, including those it hands back to
pynetdicom (an Error Comment, an Offending Element list, any other syntax); and a listener installs it
(and the Q/R SCP's pre-encoded identifiers' encoder, pacs_node.dicom.qr.find.encode_pre_encoded). A
C-FIND's pending responses share one command set, a C-MOVE's and C-GET's reuse one with their own
counters, and all encode exactly as pynetdicom's own."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import pytest
from pynetdicom import dimse_messages, service_class
from pynetdicom.dimse_primitives import (
    C_ECHO,
    C_FIND,
    C_GET,
    C_MOVE,
    C_STORE,
    N_ACTION,
    N_EVENT_REPORT,
    N_GET,
)
from pynetdicom.dsutils import decode, encode

from pacs_node.config import Settings
from pacs_node.dicom.command_sets import (
    decode_command_set,
    encode_command_set,
    reuse_pending_command_sets,
    store_response_init,
    store_response_to_message,
)
from pacs_node.dicom.qr.find import encode_pre_encoded
from pacs_node.dicom.server import Listener
from pacs_node.ops.context import ServerContext
from tests.support import free_port

CR = "1.2.840.10008.5.1.4.1.1.1"
FIND = "1.2.840.10008.5.1.4.1.2.2.1"


def _primitive(cls: type, **values: object) -> object:
    primitive = cls()
    for name, value in values.items():
        setattr(primitive, name, value)
    return primitive


MESSAGES = {
    "C-ECHO-RQ": (dimse_messages.C_ECHO_RQ, _primitive(C_ECHO, MessageID=1, AffectedSOPClassUID="1.2.840.10008.1.1")),
    "C-ECHO-RSP": (dimse_messages.C_ECHO_RSP, _primitive(C_ECHO, MessageIDBeingRespondedTo=1, Status=0,
                                                         AffectedSOPClassUID="1.2.840.10008.1.1")),
    "C-STORE-RQ (C-MOVE sub-operation)": (dimse_messages.C_STORE_RQ, _primitive(
        C_STORE, MessageID=65535, AffectedSOPClassUID=CR, AffectedSOPInstanceUID="1.2.3.44", Priority=2,
        MoveOriginatorApplicationEntityTitle="MOVESCU", MoveOriginatorMessageID=7, DataSet=BytesIO(b"\0\0"))),
    "C-STORE-RSP": (dimse_messages.C_STORE_RSP, _primitive(
        C_STORE, MessageIDBeingRespondedTo=3, AffectedSOPClassUID=CR, AffectedSOPInstanceUID="1.2.3", Status=0)),
    "C-STORE-RSP with Error Comment": (dimse_messages.C_STORE_RSP, _primitive(
        C_STORE, MessageIDBeingRespondedTo=3, AffectedSOPClassUID=CR, AffectedSOPInstanceUID="1.2.3",
        Status=0xA700, ErrorComment="store full")),
    "C-STORE-RSP with Offending Element": (dimse_messages.C_STORE_RSP, _primitive(
        C_STORE, MessageIDBeingRespondedTo=3, AffectedSOPClassUID=CR, AffectedSOPInstanceUID="1.2.3",
        Status=0xC000, OffendingElement=[0x00100010, 0x00100020])),
    "C-FIND-RQ": (dimse_messages.C_FIND_RQ, _primitive(C_FIND, MessageID=2, AffectedSOPClassUID=FIND, Priority=0,
                                                       Identifier=BytesIO(b"\0\0"))),
    "C-FIND-RSP pending": (dimse_messages.C_FIND_RSP, _primitive(
        C_FIND, MessageIDBeingRespondedTo=2, AffectedSOPClassUID=FIND, Status=0xFF00, Identifier=BytesIO(b"\0\0"))),
    "C-FIND-RSP final": (dimse_messages.C_FIND_RSP, _primitive(
        C_FIND, MessageIDBeingRespondedTo=2, AffectedSOPClassUID=FIND, Status=0)),
    "C-MOVE-RQ": (dimse_messages.C_MOVE_RQ, _primitive(
        C_MOVE, MessageID=9, AffectedSOPClassUID="1.2.840.10008.5.1.4.1.2.2.2", Priority=2, MoveDestination="DEST",
        Identifier=BytesIO(b"\0\0"))),
    "C-MOVE-RSP pending": (dimse_messages.C_MOVE_RSP, _primitive(
        C_MOVE, MessageIDBeingRespondedTo=9, AffectedSOPClassUID="1.2.840.10008.5.1.4.1.2.2.2", Status=0xFF00,
        NumberOfRemainingSuboperations=999, NumberOfCompletedSuboperations=1, NumberOfFailedSuboperations=0,
        NumberOfWarningSuboperations=0)),
    "C-GET-RSP final with failures": (dimse_messages.C_GET_RSP, _primitive(
        C_GET, MessageIDBeingRespondedTo=4, AffectedSOPClassUID="1.2.840.10008.5.1.4.1.2.2.3", Status=0xB000,
        NumberOfCompletedSuboperations=998, NumberOfFailedSuboperations=2, NumberOfWarningSuboperations=0,
        Identifier=BytesIO(b"\0\0"))),
    "N-EVENT-REPORT-RQ": (dimse_messages.N_EVENT_REPORT_RQ, _primitive(
        N_EVENT_REPORT, MessageID=5, AffectedSOPClassUID="1.2.840.10008.1.20.1",
        AffectedSOPInstanceUID="1.2.840.10008.1.20.1.1", EventTypeID=1, EventInformation=BytesIO(b"\0\0"))),
    "N-ACTION-RQ": (dimse_messages.N_ACTION_RQ, _primitive(
        N_ACTION, MessageID=6, RequestedSOPClassUID="1.2.840.10008.1.20.1",
        RequestedSOPInstanceUID="1.2.840.10008.1.20.1.1", ActionTypeID=1, ActionInformation=BytesIO(b"\0\0"))),
    "N-GET-RQ with attribute list": (dimse_messages.N_GET_RQ, _primitive(
        N_GET, MessageID=8, RequestedSOPClassUID="1.2.840.10008.5.1.1.9", RequestedSOPInstanceUID="1.2.3.4",
        AttributeIdentifierList=[0x00100010])),
}


@pytest.mark.parametrize("name", list(MESSAGES))
def test_command_sets_are_pydicoms_bytes(name: str) -> None:
    message_class, primitive = MESSAGES[name]
    message = message_class()
    message.primitive_to_message(primitive)  # pynetdicom's own encoder sets Command Group Length here
    expected = encode(message.command_set, True, True)
    assert expected
    assert encode_command_set(message.command_set, True, True) == expected


def test_other_syntaxes_go_to_pynetdicom() -> None:
    message_class, primitive = MESSAGES["C-MOVE-RSP pending"]
    message = message_class()
    message.primitive_to_message(primitive)
    for implicit_vr, little_endian, deflated in ((False, True, False), (False, False, False), (False, True, True)):
        assert (encode_command_set(message.command_set, implicit_vr, little_endian, deflated)
                == encode(message.command_set, implicit_vr, little_endian, deflated))


def test_a_listener_encodes_command_sets_and_identifiers_so_while_it_runs(tmp_path: Path) -> None:
    stock = dimse_messages.encode, service_class.encode, dimse_messages.decode
    settings = Settings(node={"port": free_port(), "bind": "127.0.0.1", "data_dir": tmp_path / "var"},
                        store={"min_free_bytes": 0}, pipeline={"bundle": "fake"})
    runtime = ServerContext.open(settings)
    listener = Listener(settings, runtime)
    listener.start()
    try:
        assert dimse_messages.encode is encode_command_set
        assert dimse_messages.decode is decode_command_set
        assert service_class.encode is encode_pre_encoded
        assert all(cls.primitive_to_message is reuse_pending_command_sets
                   for cls in (dimse_messages.C_FIND_RSP, dimse_messages.C_MOVE_RSP, dimse_messages.C_GET_RSP))
        assert dimse_messages.C_STORE_RSP.__init__ is store_response_init
        assert dimse_messages.C_STORE_RSP.primitive_to_message is store_response_to_message
    finally:
        listener.stop()
        runtime.close()
    assert (dimse_messages.encode, service_class.encode, dimse_messages.decode) == stock
    assert all(cls.primitive_to_message is dimse_messages.DIMSEMessage.primitive_to_message
               for cls in (dimse_messages.C_FIND_RSP, dimse_messages.C_MOVE_RSP, dimse_messages.C_GET_RSP))
    assert dimse_messages.C_STORE_RSP.__init__ is dimse_messages.DIMSEMessage.__init__
    assert dimse_messages.C_STORE_RSP.primitive_to_message is dimse_messages.DIMSEMessage.primitive_to_message


def _find_response(message_id: int, status: int, identifier: bytes | None, **extra: object) -> C_FIND:
    return _primitive(C_FIND, MessageIDBeingRespondedTo=message_id, AffectedSOPClassUID=FIND, Status=status,
                      Identifier=BytesIO(identifier) if identifier is not None else None, **extra)


def _encoded(message: object) -> list[list[tuple[int, bytes]]]:
    return [pdata.presentation_data_value_list for pdata in message.encode_msg(1, 16382)]


def test_pending_find_responses_share_a_command_set_and_encode_as_pynetdicoms() -> None:
    responses = [_find_response(11, 0xFF00, b"\x08\x00\x18\x00\x02\x00\x00\x001\x00"),
                 _find_response(11, 0xFF00, b"\x08\x00\x18\x00\x02\x00\x00\x002\x00"),
                 _find_response(12, 0xFF00, b"\x08\x00\x18\x00\x02\x00\x00\x003\x00"),  # another C-FIND
                 _find_response(11, 0xFF01, b"\x08\x00\x18\x00\x02\x00\x00\x004\x00"),
                 _find_response(11, 0xC311, None, ErrorComment="cannot"),
                 _find_response(11, 0x0000, None)]
    reused, stock = [], []
    for primitive in responses:
        message = dimse_messages.C_FIND_RSP()
        reuse_pending_command_sets(message, primitive)
        reused.append(message)
        message = dimse_messages.C_FIND_RSP()
        dimse_messages.DIMSEMessage.primitive_to_message(message, primitive)
        stock.append(message)
    assert [_encoded(m) for m in reused] == [_encoded(m) for m in stock]
    assert reused[0].command_set is reused[1].command_set  # built once for the C-FIND's pending responses
    assert reused[2].command_set is not reused[0].command_set


@pytest.mark.parametrize("primitive_class, message_class", [(C_MOVE, dimse_messages.C_MOVE_RSP),
                                                            (C_GET, dimse_messages.C_GET_RSP)])
def test_pending_retrieve_responses_reuse_a_command_set_with_their_own_counters(primitive_class: type,
                                                                                message_class: type) -> None:
    def response(message_id: int, status: int, remaining: int | None, completed: int, failed: int,
                 **extra: object) -> object:
        return _primitive(primitive_class, MessageIDBeingRespondedTo=message_id,
                          AffectedSOPClassUID="1.2.840.10008.5.1.4.1.2.2.2", Status=status,
                          NumberOfRemainingSuboperations=remaining, NumberOfCompletedSuboperations=completed,
                          NumberOfFailedSuboperations=failed, NumberOfWarningSuboperations=0, **extra)

    responses = [response(21, 0xFF00, 999, 1, 0), response(21, 0xFF00, 998, 1, 1), response(21, 0xFF00, 0, 999, 1),
                 response(22, 0xFF00, 5, 0, 0),  # another request
                 response(21, 0xB000, None, 999, 1, Identifier=BytesIO(b"\x08\x00\x58\x00\x00\x00\x00\x00")),
                 response(21, 0x0000, None, 1000, 0)]
    reused, stock = [], []
    for primitive in responses:
        message = message_class()
        reuse_pending_command_sets(message, primitive)
        reused.append(message)
        message = message_class()
        dimse_messages.DIMSEMessage.primitive_to_message(message, primitive)
        stock.append(message)
    assert [_encoded(m) for m in reused] == [_encoded(m) for m in stock]
    assert [m.command_set.NumberOfRemainingSuboperations for m in reused[:3]] == [999, 998, 0]


def _decoded(ds: object) -> list[tuple[int, str, object, type]] | str:
    """The elements as pynetdicom reads them, or the error reading them raises."""
    try:
        return [(int(elem.tag), elem.VR, elem.value, type(elem.value)) for elem in ds]  # type: ignore[attr-defined]
    except Exception as exc:  # noqa: BLE001 (compared, whatever it is)
        return type(exc).__name__


@pytest.mark.parametrize("name", list(MESSAGES))
def test_received_command_sets_decode_as_pydicoms(name: str) -> None:
    message_class, primitive = MESSAGES[name]
    message = message_class()
    message.primitive_to_message(primitive)
    encoded = encode(message.command_set, True, True)
    ours, stock = decode_command_set(BytesIO(encoded), True, True), decode(BytesIO(encoded), True, True)
    assert _decoded(ours) == _decoded(stock)
    assert ours.original_encoding == stock.original_encoding
    assert ours.original_character_set == stock.original_character_set


@pytest.mark.parametrize("encoded", [
    # an odd UID padded with a null, an AE with leading and trailing spaces
    b"\0\0\x02\0\x06\0\0\x001.2.3\0" + b"\0\0\0\x06\x08\0\0\0  MOVE  ",
    b"\0\0\x02\0\x06\0\0\x001.2.3 ",
    b"\0\0\x02\0\x06\0\0\x001.2.x ",  # not a valid UID: pydicom reads it unvalidated
    # multi-valued, empty, unknown, non-command and truncated elements: pydicom's decoding, whole
    b"\0\0\x02\0\x06\0\0\x001.2\\34",
    b"\0\0\x02\0\0\0\0\0",
    b"\0\0\x11\x11\x02\0\0\0\x01\0",
    b"\x08\0\x16\0\x06\0\0\x001.2.3\0",
    b"\0\0\x00\x01\x02\0\0\0\x01",
    b"\0\0\x00\x01\x04\0\0\0\x01\0\0\0",
    b"\0\0\x02\0",
])
def test_received_command_sets_beyond_the_common_case_decode_as_pydicoms(encoded: bytes) -> None:
    ours, stock = decode_command_set(BytesIO(encoded), True, True), decode(BytesIO(encoded), True, True)
    assert _decoded(ours) == _decoded(stock)


def test_received_command_sets_of_other_syntaxes_go_to_pynetdicom() -> None:
    encoded = b"\0\0\x02\0UI\x06\x001.2.3\0"
    assert _decoded(decode_command_set(BytesIO(encoded), False, True)) == _decoded(decode(BytesIO(encoded), False, True))


STORE_RESPONSES = {
    "success": dict(MessageIDBeingRespondedTo=3, AffectedSOPClassUID=CR, AffectedSOPInstanceUID="1.2.3", Status=0),
    "warning": dict(MessageIDBeingRespondedTo=65535, AffectedSOPClassUID=CR, AffectedSOPInstanceUID="1.2.3.4",
                    Status=0xB000),
    "no instance UID": dict(MessageIDBeingRespondedTo=3, AffectedSOPClassUID=CR, Status=0xC210),
    "error comment": dict(MessageIDBeingRespondedTo=3, AffectedSOPClassUID=CR, AffectedSOPInstanceUID="1.2.3",
                          Status=0xA700, ErrorComment="store full"),
    "offending element": dict(MessageIDBeingRespondedTo=3, AffectedSOPClassUID=CR, AffectedSOPInstanceUID="1.2.3",
                              Status=0xC000, OffendingElement=[0x00100010]),
}


@pytest.mark.parametrize("name", list(STORE_RESPONSES))
def test_store_responses_are_pynetdicoms(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    primitive = _primitive(C_STORE, **STORE_RESPONSES[name])
    stock = dimse_messages.C_STORE_RSP()
    stock.primitive_to_message(primitive)
    monkeypatch.setattr(dimse_messages.C_STORE_RSP, "__init__", store_response_init)
    monkeypatch.setattr(dimse_messages.C_STORE_RSP, "primitive_to_message", store_response_to_message)
    ours = dimse_messages.C_STORE_RSP()
    assert set(vars(ours)) == set(vars(stock))
    ours.primitive_to_message(primitive)
    assert _decoded(ours.command_set) == _decoded(stock.command_set)
    assert _encoded(ours) == _encoded(stock)
    assert ((ours.context_id, ours.data_set.getvalue(), ours._data_set_path)
            == (stock.context_id, stock.data_set.getvalue(), stock._data_set_path))


def test_a_store_response_made_by_pynetdicoms_init_is_built_by_pynetdicom(monkeypatch: pytest.MonkeyPatch) -> None:
    primitive = _primitive(C_STORE, **STORE_RESPONSES["success"])
    stock = dimse_messages.C_STORE_RSP()
    stock.primitive_to_message(primitive)
    monkeypatch.setattr(dimse_messages.C_STORE_RSP, "primitive_to_message", store_response_to_message)
    ours = dimse_messages.C_STORE_RSP()
    ours.primitive_to_message(primitive)
    assert _encoded(ours) == _encoded(stock)
