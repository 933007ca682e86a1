"""``pacs-node serve``, ``pacs-node worker`` and ``pacs-node listen``: the long-running processes of the node."""

from __future__ import annotations

from typing import Annotated

import typer

from pacs_node.cli.common import config_path, fail, settings
from pacs_node.ops.context import prepare_metrics_dir
from pacs_node.ops.logs import setup_logging
from pacs_node.ops.serve import listen as run_listen
from pacs_node.ops.serve import serve as run_serve
from pacs_node.work.worker import PipelineUnavailable, run_worker


def serve() -> None:
    """Run the node: DICOM listener, worker processes, exporter, housekeeping, /healthz and /metrics."""
    s = settings()
    setup_logging(s.logging.level, process="serve")
    prepare_metrics_dir(s, fresh=True)
    path = config_path()
    raise typer.Exit(run_serve(s, path.resolve() if path else None))


def worker(
    parent_pid: Annotated[int | None, typer.Option(hidden=True, help="Set by `serve`.")] = None,
) -> None:
    """Run one analysis worker process (``serve`` starts ``worker.count`` of these itself)."""
    s = settings()
    setup_logging(s.logging.level, process="worker")
    if parent_pid is not None:
        prepare_metrics_dir(s, fresh=False)
    try:
        code = run_worker(s, parent_pid=parent_pid)
    except PipelineUnavailable as exc:
        fail(str(exc))
    raise typer.Exit(code)


def listen(
    parent_pid: Annotated[int | None, typer.Option(hidden=True, help="Set by `serve`.")] = None,
) -> None:
    """Run one more DICOM listener on the node's port (``serve`` starts these for
    ``node.listener_processes`` > 1)."""
    s = settings()
    setup_logging(s.logging.level, process="listen")
    if parent_pid is not None:
        prepare_metrics_dir(s, fresh=False)
    raise typer.Exit(run_listen(s, parent_pid=parent_pid))
