"""Logging setup shared by ``serve``, ``worker`` and the CLI.

Node code never puts patient names or IDs in messages at INFO or above. pynetdicom is noisier: at INFO
it narrates every association and DIMSE message (and highdicom every module it copies), so both are
held at WARNING unless the node runs at DEBUG.
"""

from __future__ import annotations

import logging
import sys


def setup_logging(level: str, *, process: str) -> None:
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s {process}[%(process)d] %(name)s: %(message)s",
        force=True,
    )
    if level != "DEBUG":
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
        logging.getLogger("apscheduler").setLevel(logging.WARNING)
        logging.getLogger("highdicom").setLevel(logging.WARNING)  # narrates every attribute it copies
