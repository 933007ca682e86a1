"""``pacs-node config``: write an example configuration, or check one and print its effective values."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from pacs_node.cli.common import JsonOpt, config_path, err, fail, out, print_json, settings
from pacs_node.config import EXAMPLE_TOML

app = typer.Typer(help="Write or check the configuration file.", no_args_is_help=True)


@app.command("init")
def config_init(
    path: Annotated[Path, typer.Argument(help="Where to write the example.")] = Path("pacs-node.toml"),
    force: Annotated[bool, typer.Option(help="Overwrite an existing file.")] = False,
) -> None:
    """Write a commented example configuration (every key, with its default)."""
    if path.exists() and not force:
        fail(f"{path} exists (use --force to overwrite)", 2)
    path.write_text(EXAMPLE_TOML)
    out.print(f"wrote {path}")


@app.command("check")
def config_check(as_json: JsonOpt = False) -> None:
    """Validate the configuration, the bundle, TLS files, database URL and peers' addresses, and print the
    effective values (exit 2, naming each bad key, if anything would keep the node from working)."""
    from pacs_node.ops.preflight import check_settings

    s = settings()
    problems = check_settings(s)
    if problems:
        for problem in problems:
            err.print(str(problem), markup=False, highlight=False)
        raise typer.Exit(2)
    if as_json:
        print_json(json.loads(s.model_dump_json()))
        return
    out.print(f"configuration OK ({config_path() or 'defaults'})")
    out.print(f"  AE {s.node.ae_title} on {s.node.bind}:{s.node.port}")
    out.print(f"  database {s.database_url}")
    out.print(f"  store {s.store_path}")
    out.print(f"  pipeline {s.bundle_path or 'fake'} on {s.pipeline.device.value}, {s.worker.count} worker(s)")
    out.print(f"  peers: {', '.join(sorted(s.peers)) or 'none'}")
