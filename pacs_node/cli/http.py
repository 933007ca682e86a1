"""``pacs-node http``: credentials of the HTTP interface (DICOMweb, admin API, console)."""

from __future__ import annotations

import getpass
import secrets
from typing import Annotated

import typer

from pacs_node.cli.common import out
from pacs_node.web.auth import hash_secret

app = typer.Typer(help="Credentials of the HTTP interface.", no_args_is_help=True)


@app.command("hash-secret")
def hash_secret_command(
    generate: Annotated[bool, typer.Option("--generate", help="Make up a random secret and print it too.")] = False,
) -> None:
    """Print the ``secret_hash`` of a token for ``[[http.tokens]]`` (the secret is read from the terminal,
    or generated; only its hash belongs in the configuration)."""
    if generate:
        secret = secrets.token_urlsafe(32)
        out.print(f"secret (give it to the client, it is not stored): {secret}", highlight=False)
    else:
        secret = getpass.getpass("secret: ")
        if len(secret) < 12:
            out.print("a secret needs at least 12 characters")
            raise typer.Exit(2)
    out.print(f'secret_hash = "{hash_secret(secret)}"', highlight=False)
