"""``pacs-node``: run the node and administer it.

Every command reads the same configuration (``--config``, else ``$PACS_NODE_CONFIG``, else
``./pacs-node.toml`` when present, else the built-in defaults; ``PACS_NODE__SECTION__KEY`` environment
variables override any of it). Output is a table for people and, with ``--json``, one JSON document for
scripts. Exit codes: 0 success, 1 the operation failed, 2 bad configuration or usage.

This module holds the typer app and says which command lives where; the commands are grouped beside it:
``serve.py`` (serve, worker), ``peers.py`` (echo, send), ``queue.py``, ``results.py`` (results, stats),
``config.py``, ``db.py``, ``models.py``, ``training.py`` (train, evaluate, phantoms), ``doctor.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pacs_node.cli import config, db, doctor, http, models, peers, queue, results, serve, training
from pacs_node.cli.common import CliState

app = typer.Typer(
    name="pacs-node",
    help="A DICOM node that reports chest radiographs and sends the results back to the PACS.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def main(
    config_file: Annotated[
        Path | None, typer.Option("--config", "-c", help="TOML configuration file.", envvar="PACS_NODE_CONFIG")
    ] = None,
) -> None:
    CliState.config_path = config_file


# running
app.command()(serve.serve)
app.command()(serve.worker)
app.command()(serve.listen)
# talking to peers
app.command()(peers.echo)
app.command()(peers.send)
# looking at what the node holds
app.command()(results.stats)
app.command()(results.results)
app.command()(results.reanalyse)
app.command()(results.resend)
app.add_typer(http.app, name="http")
# command groups
app.add_typer(queue.app, name="queue")
app.add_typer(config.app, name="config")
app.add_typer(db.app, name="db")
app.add_typer(models.app, name="models")
app.add_typer(training.train_app, name="train")
app.add_typer(training.evaluate_app, name="evaluate")
app.add_typer(training.phantoms_app, name="phantoms")
app.add_typer(doctor.app, name="doctor")
