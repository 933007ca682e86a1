"""``pacs-node db``: the database schema."""

from __future__ import annotations

import typer

from pacs_node.cli.common import fail, out, settings
from storage.db import current_revision, upgrade

app = typer.Typer(help="Database schema.", no_args_is_help=True)


@app.command("upgrade")
def db_upgrade() -> None:
    """Create or migrate the database schema to the version this release needs."""
    s = settings()
    s.data_dir.mkdir(parents=True, exist_ok=True)
    try:
        upgrade(s.database_url)
        out.print(f"database at revision {current_revision(s.database_url)}")
    except Exception as exc:
        fail(f"upgrade failed: {exc}")
