"""``pacs-node serve``: the listener, the exporter threads, housekeeping, the HTTP application and the
supervised worker processes, in one long-running process; with ``node.listener_processes`` > 1, also
supervised ``pacs-node listen`` processes accepting on the same port (``SO_REUSEPORT``), so that several
cores receive. Each listener files what it receives on its own, with the same durability (fsync,
rename, its own database commit) before its success status.

Start-up order follows what depends on what (schema before listener, listener before anyone is told
the node is healthy); shutdown is the reverse, and the listener goes first so no new image is accepted
while the rest stops.
"""

from __future__ import annotations

import gc
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
from pacs_node.web.server import WebServer
from pacs_node.ops.supervisor import Supervisor, exit_with_parent
from pacs_node.work.export import Exporter

log = logging.getLogger(__name__)

def freeze_start_up_objects() -> None:
    """Take everything allocated while starting (modules, configuration, the database engine, the web
    application) out of the garbage collector's sight, for the life of the process.

    pynetdicom's server runs a full ``gc.collect()`` every 60 passes of its accept loop. Over the heap
    start-up leaves, one such pass held the GIL for 0.2-0.4 s (profiled during a 1,000-match C-FIND: 71%
    of the listener's time in that query), in the middle of whatever the associations were doing. Frozen
    objects are never collected, which is what these need anyway: they live as long as the process."""
    gc.freeze()


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
    listeners = settings.node.listener_process_count()
    listener = Listener(settings, runtime)
    try:
        listener.start(reuse_port=listeners > 1)
    except OSError as exc:
        log.error("node.port: cannot listen on %s:%d: %s", settings.node.bind, settings.node.port, exc)
        runtime.close()
        return 1
    http = None
    if settings.http.port:
        try:
            http = WebServer(settings, runtime, listener=listener)
            http.start()
        except OSError as exc:
            log.error("http.port: cannot serve on %s:%d: %s", settings.http.bind, settings.http.port, exc)
            listener.stop()
            runtime.close()
            return 1
    # Lease owners are host:pid[/thread]: the doctor can tell whose holder is gone.
    exporter = Exporter(settings, runtime, worker_id=f"{socket.gethostname()}:{os.getpid()}")
    exporter.start()
    scheduler = start_housekeeping(settings, runtime)
    extra_listeners = Supervisor(listeners - 1, config_path, command="listen")
    extra_listeners.start()
    supervisor = Supervisor(settings.worker.count, config_path, release_leases=runtime.queue.release_owner)
    supervisor.start()
    freeze_start_up_objects()
    log.info("pacs-node ready: %d listener process(es), %d worker process(es), %d exporter thread(s)",
             listeners, settings.worker.count, settings.export.concurrency)

    while not stop.wait(1.0):
        pass
    log.info("stopping")
    listener.stop()
    extra_listeners.stop()
    supervisor.stop()
    exporter.stop()
    scheduler.shutdown(wait=False)
    if http is not None:
        http.stop()
    runtime.close()
    return 0


def listen(settings: Settings, *, parent_pid: int | None = None) -> int:
    """``pacs-node listen``: one more listener process on ``serve``'s port (started by ``serve`` when
    ``node.listener_processes`` > 1; stops with it). Receiving only: exporting, housekeeping and the
    HTTP endpoints stay in ``serve``."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if parent_pid is not None:
        threading.Thread(target=exit_with_parent, args=(parent_pid, stop), daemon=True).start()
    runtime = ServerContext.open(settings, migrate=False)
    listener = Listener(settings, runtime)
    try:
        listener.start(reuse_port=True)
    except OSError as exc:
        log.error("node.port: cannot listen on %s:%d: %s", settings.node.bind, settings.node.port, exc)
        runtime.close()
        return 1
    freeze_start_up_objects()
    stop.wait()
    listener.stop()
    runtime.close()
    return 0
