"""The ``pacs-node`` admin command line (typer + rich)."""
