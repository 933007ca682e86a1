"""The listener's transport: what each accepted association gets of the server's state."""

from __future__ import annotations

import copy

from pynetdicom import AE

from pacs_node.dicom.presentation_contexts import add_scp_contexts, storage_sop_classes
from pacs_node.dicom.transport import AcceptorContexts


def _fields(context: object) -> dict[str, object]:
    return dict(vars(context))


def test_an_association_gets_contexts_equal_to_a_deep_copy_and_independent_of_the_server() -> None:
    ae = AE()
    add_scp_contexts(ae, storage_sop_classes(True))
    server_contexts = AcceptorContexts(ae.supported_contexts)

    cheap, deep = copy.deepcopy(server_contexts), copy.deepcopy(list(server_contexts))
    assert type(cheap) is list
    assert [_fields(c) for c in cheap] == [_fields(c) for c in deep]

    # Negotiation writes results and roles into the association's copy and may change its syntaxes:
    # none of it may reach the server's contexts, which the next association copies.
    first = cheap[0]
    first.result, first.scp_role = 0, True
    first.transfer_syntax.append("1.2.840.10008.1.2.4.50")
    original = server_contexts[0]
    assert original.result is None and original.scp_role is None
    assert "1.2.840.10008.1.2.4.50" not in original.transfer_syntax
    assert all(c is not o for c, o in zip(cheap, server_contexts, strict=True))
