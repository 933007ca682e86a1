"""Per-caller permissions of the listener (in this process), spoken to by DCMTK echoscu, storescu, findscu,
movescu and getscu: a modality may store and nothing else, a viewer may query and retrieve and move to
the one destination it names, an unknown caller (the first-run default) may echo and store only, and
the "needs a matching key" guard holds against wildcards that match everything."""

from __future__ import annotations

import contextlib
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pacs_node.config import Settings
from tests.pacs_node.helpers import StoreSCP, echoscu, make_cr, running_listener, storescu
from tests.support import dcmtk, free_port

Start = Callable[..., Settings]


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Start]:
    with contextlib.ExitStack() as running:
        yield lambda receiver_port, **sections: running.enter_context(
            _started(tmp_path, receiver_port, **sections))


@contextlib.contextmanager
def _started(tmp_path: Path, receiver_port: int, **sections: object) -> Iterator[Settings]:
    settings = Settings(
        node={"port": free_port(), "bind": "127.0.0.1", "data_dir": tmp_path / f"var{free_port()}"},
        store={"min_free_bytes": 0}, pipeline={"bundle": "fake"},
        peers={"receiver": {"ae_title": "RECEIVER", "host": "127.0.0.1", "port": receiver_port},
               "other": {"ae_title": "OTHERPACS", "host": "127.0.0.1", "port": free_port()}},
        **sections,
    )
    with running_listener(settings):
        yield settings


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[StoreSCP]:
    dcmtk("storescp")
    scp = StoreSCP(tmp_path / "received", free_port()).start()
    yield scp
    scp.stop()


def _dcmtk(tool: str, port: int, calling: str, *args: str, files: tuple[str, ...] = ()) -> str:
    model = [] if tool == "storescu" else ["-S"]  # Study Root for the Q/R tools
    done = subprocess.run([dcmtk(tool), "-v", *model, "-aet", calling, "-aec", "PACSNODE", *args, "127.0.0.1", str(port), *files],
                          capture_output=True, text=True, timeout=60)
    return done.stdout + done.stderr


def _not_authorised(output: str) -> bool:
    """DCMTK's words for status 0x0124 (a storage SCU calls it unknown: it is a general status)."""
    return re.search(r"0x0?124|not authori[sz]ed", output, re.IGNORECASE) is not None


def _find(port: int, calling: str, out: Path, *keys: str) -> tuple[str, int]:
    out.mkdir(exist_ok=True)
    before = len(list(out.iterdir()))
    text = _dcmtk("findscu", port, calling, "-X", "-od", str(out), "-k", "QueryRetrieveLevel=STUDY",
                  "-k", "StudyInstanceUID", *[a for k in keys for a in ("-k", k)])
    return text, len(list(out.iterdir())) - before


def test_each_caller_may_do_what_its_entry_says(start: Start, receiver: StoreSCP, tmp_path: Path) -> None:
    settings = start(receiver.port, allowed_callers=[
        {"ae_title": "MODALITY", "services": ["store"]},
        {"ae_title": "VIEWER", "services": ["find", "move", "get"], "move_destinations": ["receiver"]},
    ])
    port = settings.node.port
    image = make_cr(tmp_path / "image.dcm")
    assert storescu(port, [tmp_path / "image.dcm"]).returncode == 0
    refused = _dcmtk("storescu", port, "VIEWER", files=(str(tmp_path / "image.dcm"),))  # no store right
    assert _not_authorised(refused), refused

    text, answers = _find(port, "MODALITY", tmp_path / "m", "PatientID=SYN00000")
    assert answers == 0 and _not_authorised(text), text
    text, answers = _find(port, "VIEWER", tmp_path / "v", "PatientID=SYN00000")
    assert answers == 1, text

    study = f"StudyInstanceUID={image.StudyInstanceUID}"
    moved = _dcmtk("movescu", port, "VIEWER", "-aem", "RECEIVER", "-k", "QueryRetrieveLevel=STUDY", "-k", study)
    assert [str(ds.SOPInstanceUID) for ds in receiver.received()] == [str(image.SOPInstanceUID)], moved
    elsewhere = _dcmtk("movescu", port, "VIEWER", "-aem", "OTHERPACS", "-k", "QueryRetrieveLevel=STUDY", "-k", study)
    assert "MoveDestinationUnknown" in elsewhere, elsewhere
    by_modality = _dcmtk("movescu", port, "MODALITY", "-aem", "RECEIVER", "-k", "QueryRetrieveLevel=STUDY",
                         "-k", study)
    assert "MoveDestinationUnknown" in by_modality, by_modality
    assert len(receiver.received()) == 1

    # the guard against "retrieve everything" is not fooled by wildcards that match every value
    got = tmp_path / "got"
    got.mkdir()
    everything = _dcmtk("getscu", port, "VIEWER", "-od", str(got), "-k", "QueryRetrieveLevel=PATIENT",
                        "-k", "PatientID=?*")
    assert list(got.iterdir()) == [] and "DataSetDoesNotMatchSOPClass" in everything, everything  # 0xA900
    _dcmtk("getscu", port, "VIEWER", "-od", str(got), "-k", "QueryRetrieveLevel=STUDY", "-k", study)
    assert len(list(got.iterdir())) == 1


def test_by_default_anyone_may_echo_and_store_but_not_query(start: Start, receiver: StoreSCP,
                                                           tmp_path: Path) -> None:
    settings = start(receiver.port)
    port = settings.node.port
    assert echoscu(port, calling="ANYONE").returncode == 0
    image = make_cr(tmp_path / "image.dcm")
    assert storescu(port, [tmp_path / "image.dcm"], calling="ANYONE").returncode == 0
    text, answers = _find(port, "ANYONE", tmp_path / "f", "PatientID=*")
    assert answers == 0, text
    _dcmtk("movescu", port, "ANYONE", "-aem", "RECEIVER", "-k", "QueryRetrieveLevel=STUDY",
           "-k", f"StudyInstanceUID={image.StudyInstanceUID}")
    assert receiver.received() == []
    # the config can open query/retrieve to anyone, on purpose
    opened = start(receiver.port, any_caller_services=["store", "find"])
    assert storescu(opened.node.port, [tmp_path / "image.dcm"], calling="ANYONE").returncode == 0
    assert _find(opened.node.port, "ANYONE", tmp_path / "g", "PatientID=*")[1] == 1
