"""``python -m pacs_node``: the same command line as ``pacs-node`` (used to start worker processes with
the interpreter ``serve`` runs under)."""

from pacs_node.cli.main import app

if __name__ == "__main__":  # not when a spawned process (a result builder) imports it
    app(prog_name="pacs-node")
