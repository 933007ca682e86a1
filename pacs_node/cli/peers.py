"""``pacs-node echo`` and ``pacs-node send``: talking to a configured (or ad-hoc) peer as an SCU."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import pydicom
import typer
from rich.table import Table

from pacs_node.cli.common import JsonOpt, fail, out, print_json, settings
from pacs_node.config import Peer, Settings
from pacs_node.dicom.scu import ScuError, send_datasets
from pacs_node.ops import admin

_AD_HOC_PEER = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>[^:]+):(?P<port>\d+)$")


def resolve_peer(s: Settings, name: str) -> Peer:
    """A configured peer by name, or an ad-hoc ``AE@host:port``."""
    if name in s.peers:
        return s.peers[name]
    match = _AD_HOC_PEER.match(name)
    if match:
        return Peer(ae_title=match["ae"], host=match["host"], port=int(match["port"]))
    known = ", ".join(sorted(s.peers)) or "none configured"
    fail(f"unknown peer {name!r} (configured: {known}; or give AE@host:port)", 2)


def echo(peer: Annotated[str, typer.Argument(help="Peer name from the config, or AE@host:port.")],
         as_json: JsonOpt = False) -> None:
    """C-ECHO a peer (a DICOMweb peer: a QIDO-RS request)."""
    s = settings()
    result = admin.echo_peer(s, peer, resolve_peer(s, peer))
    if as_json:
        print_json(result)
    elif "error" in result:
        fail(result["error"])
    else:
        out.print(f"C-ECHO {result['address']}: status 0x{result['status']:04X}")
    raise typer.Exit(0 if result["ok"] else 1)


def send(peer: Annotated[str, typer.Argument(help="Peer name from the config, or AE@host:port.")],
         files: Annotated[list[Path], typer.Argument(help="DICOM files to C-STORE.", exists=True, dir_okay=False)],
         as_json: JsonOpt = False) -> None:
    """C-STORE DICOM files to a peer (one association, each file as stored)."""
    s = settings()
    target = resolve_peer(s, peer)
    datasets = []
    for path in files:
        try:
            datasets.append(pydicom.dcmread(path))
        except Exception as exc:
            fail(f"{path}: not a readable DICOM file ({exc})", 2)
    try:
        outcomes = send_datasets(s, target, datasets)
    except ScuError as exc:
        fail(str(exc))
    rows = [{"file": str(path), "status": None if isinstance(outcome, ScuError) else outcome,
             "error": str(outcome) if isinstance(outcome, ScuError) else None}
            for path, outcome in zip(files, outcomes, strict=True)]
    if as_json:
        print_json(rows)
    else:
        table = Table("file", "status")
        for row in rows:
            table.add_row(row["file"], row["error"] or f"0x{row['status']:04X}")
        out.print(table)
    raise typer.Exit(0 if all(row["status"] == 0 for row in rows) else 1)
