"""``pacs-node serve``: the listener, the exporter threads, housekeeping, the HTTP endpoints and the
supervised worker processes, in one long-running process.

Start-up order follows what depends on what (schema before listener, listener before anyone is told
the node is healthy); shutdown is the reverse, and the listener goes first so no new image is accepted
while the rest stops.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from pathlib import Path

from pacs_node.config import Settings
from pacs_node.dicom.server import Listener
from pacs_node.ops.context import ServerContext
from pacs_node.ops.housekeeping import remove_dead_temp_files, start_housekeeping
from pacs_node.ops.http import HttpServer
from pacs_node.ops.supervisor import Supervisor
from pacs_node.work.export import Exporter

log = logging.getLogger(__name__)

def serve(settings: Settings, config_path: Path | None) -> int:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    runtime = ServerContext.open(settings, migrate=True)
    # Partial datasets of associations cut off by a crash were never acknowledged: the sender sends again.
    remove_dead_temp_files(runtime)
    if not settings.allowed_callers and settings.allow_any_caller:
        log.warning("no allowed_callers configured: accepting associations from any AE")
    bundle = settings.bundle_path
    if bundle is not None and not (bundle / "manifest.json").is_file():
        # Receiving must not depend on the model: images are stored and queued, and analysed once a
        # bundle is in place (the workers keep retrying to load it).
        log.error("pipeline.bundle: %s is not a model bundle (no manifest.json); images will be stored "
                  "and queued but not analysed until it is", bundle)

    # The two ports first: if either is taken, stop before anything else has started.
    listener = Listener(settings, runtime)
    try:
        listener.start()
    except OSError as exc:
        log.error("node.port: cannot listen on %s:%d: %s", settings.node.bind, settings.node.port, exc)
        runtime.close()
        return 1
    http = None
    if settings.http.port:
        try:
            http = HttpServer(runtime, settings.http.bind, settings.http.port, listener=listener)
        except OSError as exc:
            log.error("http.port: cannot listen on %s:%d: %s", settings.http.bind, settings.http.port, exc)
            listener.stop()
            runtime.close()
            return 1
        http.start()
    # Lease owners are host:pid[/thread]: the doctor can tell whose holder is gone.
    exporter = Exporter(settings, runtime, worker_id=f"{socket.gethostname()}:{os.getpid()}")
    exporter.start()
    scheduler = start_housekeeping(settings, runtime)
    supervisor = Supervisor(settings.worker.count, config_path, release_leases=runtime.queue.release_owner)
    supervisor.start()
    log.info("pacs-node ready: %d worker process(es), %d exporter thread(s)",
             settings.worker.count, settings.export.concurrency)

    while not stop.wait(1.0):
        pass
    log.info("stopping")
    listener.stop()
    supervisor.stop()
    exporter.stop()
    scheduler.shutdown(wait=False)
    if http is not None:
        http.stop()
    runtime.close()
    return 0
