"""The changes to pynetdicom's process-wide behaviour that the association server needs.

pynetdicom keeps some choices in module globals (``pynetdicom._config``, the temp file class of
``pynetdicom.dimse_messages``). Importing this package changes none of them: the server applies them
when it starts (:func:`apply_pynetdicom_adjustments`) and the last server to stop puts pynetdicom back as
it was (:func:`undo_pynetdicom_adjustments`), so an SCU in a process without a running server (``pacs-node
send``, a test's requestor) sees stock pynetdicom.

**Reactors that wake when there is work.** Each association runs two polling loops: the DUL thread
(reads PDUs, sends what the DIMSE layer queued) and the association's reactor (takes decoded messages
and runs the handler). Both sleep a fixed millisecond whenever a pass found nothing to do, so every
C-STORE waits for up to three such sleeps (request read, request handed over, response sent) and on a
busy machine each sleep lasts a scheduler tick: on tiny instances that is most of the time a message
takes. :func:`wake_reactors_early` gives an association's two threads a wake-up each (the queues that
feed a loop set it on ``put``; the DUL's also wakes on data arriving on its socket), and while a server
runs, pynetdicom's ``association`` and ``dul`` modules sleep through :data:`reactor_time`, whose
``sleep`` of a polling interval (at most :data:`POLL_S`) returns as soon as the thread's wake-up is set.
A sleep never lasts longer than pynetdicom's: every loop still polls everything it polled before, so a
wake-up missed for any reason costs what it cost before, one interval. Longer sleeps (pynetdicom's
deliberate delays) and threads without a wake-up sleep as always. Worth proposing upstream as an
event-driven reactor.

An association the node accepted goes further (:func:`pacs_node.dicom.receiving.serve_inline`): its DUL
thread serves its C-STOREs and C-ECHOs itself, and both its threads poll every :data:`ACCEPTED_POLL_S`,
every change they wait for ringing their wake-ups. A requested association (the exporter's, C-MOVE's)
keeps the millisecond poll and the reactor.
"""

from __future__ import annotations

import logging
import queue
import select
import socket
import ssl
import threading
import time
import types
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pynetdicom import _config, association, dimse_messages, dul, service_class
from pynetdicom.association import Association

from pacs_node.dicom.command_sets import (
    decode_command_set,
    encode_command_set,
    reuse_pending_command_sets,
    store_response_init,
    store_response_to_message,
)
from pacs_node.dicom.file_meta import plan_file_meta, write_file_meta
from pacs_node.dicom.qr.find import encode_pre_encoded
from pacs_node.dicom.spooling import open_receive_file

#: The longest sleep that ends early on a wake-up: pynetdicom's polling intervals (its reactors' 1 ms and
#: the 0.1 ms of its pause loops), not its deliberate delays (10 ms and more).
POLL_S = 0.001


def _sleep(seconds: float) -> None:
    """``time.sleep`` for pynetdicom's reactors: a polling sleep of a thread with a wake-up ends early,
    and lasts the wake-up's ``parked_s`` instead while its association is parked."""
    wake = getattr(threading.current_thread(), "pacs_wake", None)
    if wake is None or seconds > POLL_S:
        time.sleep(seconds)
    else:
        wake.wait(wake.parked_s or seconds)


#: ``time`` as pynetdicom's ``association`` and ``dul`` modules see it while a server runs.
reactor_time = types.SimpleNamespace(**{name: getattr(time, name) for name in dir(time) if not name.startswith("__")})
reactor_time.sleep = _sleep


class _ReactorWake:
    """The association reactor's wake-up: set when a decoded message or a peer's release or abort is
    queued for it."""

    #: The polling sleep while the association is parked (:func:`park_reactors`; an accepted one always
    #: is, see :data:`ACCEPTED_POLL_S`); None: pynetdicom's.
    parked_s: float | None = None

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    def wait(self, seconds: float) -> None:
        # Cleared only after waking: a set() after the clear wakes the next wait, and one before it
        # concerns an item the caller's loop sees when it looks at its queues next, right after this.
        if self._event.wait(seconds):
            self._event.clear()


class _DulWake:
    """The DUL thread's wake-up: a primitive queued for sending (a byte on a socket pair), or data
    arriving from the peer (its socket, in the same ``select``)."""

    #: The polling sleep while the association is parked (:func:`park_reactors`; an accepted one always
    #: is, see :data:`ACCEPTED_POLL_S`); None: pynetdicom's.
    parked_s: float | None = None

    def __init__(self, provider: dul.DULServiceProvider) -> None:
        self._provider = weakref.ref(provider)
        self._read, self._write = socket.socketpair()
        self._read.setblocking(False)
        self._write.setblocking(False)

    def set(self) -> None:
        provider = self._provider()
        if provider is threading.current_thread() and getattr(provider, "serving_inline", False):
            return  # queued by the DUL thread serving a request, which looks at its queue next
        try:
            self._write.send(b"\0")
        except OSError:  # full (already rung many times) or closed (the association is over)
            pass

    def wait(self, seconds: float) -> None:
        provider = self._provider()
        peer = getattr(getattr(provider, "socket", None), "socket", None)
        if peer is not None and (getattr(peer, "pushback", b"")
                                 or (isinstance(peer, ssl.SSLSocket) and peer.pending())):
            return  # bytes already read from the kernel: the loop's own check finds them
        try:
            waiting = [self._read] if peer is None or peer.fileno() < 0 else [self._read, peer]
            ready, _, _ = select.select(waiting, [], [], seconds)
        except (OSError, ValueError):  # closed meanwhile: sleep as pynetdicom would
            time.sleep(seconds)
            return
        if self._read in ready:
            try:
                while self._read.recv(4096):
                    pass
            except OSError:
                pass

    def close(self) -> None:
        self._read.close()
        self._write.close()


class _WakingQueue(queue.Queue):  # type: ignore[type-arg]
    """A queue whose ``put`` also sets the wake-up of the thread that polls it."""

    wake: Callable[[], None]

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self.wake()


def _waking(q: queue.Queue, wake: Callable[[], None]) -> None:  # type: ignore[type-arg]
    assert type(q) is queue.Queue
    q.__class__ = _WakingQueue
    q.wake = wake  # type: ignore[attr-defined]


def wake_reactors_early(assoc: Association) -> None:
    """Give ``assoc``'s reactor and DUL threads their wake-ups (see the module docstring); call it before
    the association starts. Without a running server (:data:`reactor_time` not in place) it changes
    nothing but the queues' ``put``."""
    provider = assoc.dul
    reactor_wake, dul_wake = _ReactorWake(), _DulWake(provider)
    assoc.pacs_wake = reactor_wake  # type: ignore[attr-defined]
    provider.pacs_wake = dul_wake  # type: ignore[attr-defined]
    _waking(assoc.dimse.msg_queue, reactor_wake.set)
    _waking(provider.to_user_queue, reactor_wake.set)
    _waking(provider.to_provider_queue, dul_wake.set)
    weakref.finalize(provider, dul_wake.close)


#: The polling sleep of an accepted association's two threads (:func:`pacs_node.dicom.receiving.serve_inline`):
#: everything their loops wait for rings their wake-ups, so the poll only serves pynetdicom's timers (ARTIM,
#: the network timeout, both tens of seconds), which it lets fire up to this much later. Polling every
#: millisecond instead costs each C-STORE several wake-ups of a thread that then queues for the GIL behind
#: the one doing the work (on tiny instances, 40 of the ~70 futex calls per message).
ACCEPTED_POLL_S = 0.05


def wake_from_other_threads(q: queue.Queue,  # type: ignore[type-arg]
                            owner: threading.Thread, wake: Callable[[], None]) -> None:
    """Make ``q``'s ``put`` set ``wake`` when a thread other than ``owner`` (which polls ``q`` itself in
    its loop) puts something on it: a DUL's event queue, fed by its own thread and, for a closed socket
    or an error, by others."""

    def put_wakes_owner() -> None:
        if threading.current_thread() is not owner:
            wake()

    _waking(q, put_wakes_owner)


def park_reactors(assoc: Association, seconds: float | None) -> None:
    """Let the two threads of ``assoc`` (given wake-ups by :func:`wake_reactors_early`) poll every
    ``seconds`` instead of every millisecond while it has nothing to do, or (None) as before, at once.

    An association kept open for work to come (the exporter's, between batches) otherwise costs its two
    threads a thousand wake-ups a second each: on the 2-core machine 86 ms of CPU per second idle, more
    than opening a new association costs (4 ms). Parked, anything that concerns it still wakes its
    threads at once (data or a release or abort from the peer, a message queued); only pynetdicom's
    timer checks (ARTIM, the network timeout) look later, by at most ``seconds``. Without wake-ups or
    without a running server (:data:`reactor_time` not in place) it changes nothing."""
    wakes = [getattr(assoc, "pacs_wake", None), getattr(assoc.dul, "pacs_wake", None)]
    for wake in wakes:
        if wake is not None:
            wake.parked_s = seconds
            if seconds is None:
                wake.set()  # end a parked sleep now: work is coming


def _log_handler_level() -> str:
    """pynetdicom's ``LOG_HANDLER_LEVEL`` for associations made while a server runs: its standard handlers
    format a line for every PDU and DIMSE message sent or received, whether or not its logger will
    write it; when the node holds pynetdicom's logger above INFO (every level but DEBUG, see
    :func:`pacs_node.ops.logs.setup_logging`) they are not bound at all."""
    return "standard" if logging.getLogger("pynetdicom").isEnabledFor(logging.INFO) else "none"


@dataclass(frozen=True)
class _AtStart:
    """An adjustment whose value is decided when the first server starts."""

    value: Callable[[], Any]


#: The adjustments: (module, attribute, value while a server runs).
_ADJUSTMENTS: tuple[tuple[Any, str, Any], ...] = (
    # Receive C-STORE datasets straight to a file instead of into memory: a 30 MB radiograph never has
    # to fit in RAM, and the file is created inside the store (see pacs_node.dicom.spooling).
    (_config, "STORE_RECV_CHUNKED_DATASET", True),
    # pynetdicom logs C-FIND/C-MOVE identifiers, asked and answered (patient names and IDs), unless told not to.
    (_config, "LOG_REQUEST_IDENTIFIERS", False),
    (_config, "LOG_RESPONSE_IDENTIFIERS", False),
    # Nobody reads pynetdicom's per-message log lines below DEBUG: do not make them.
    (_config, "LOG_HANDLER_LEVEL", _AtStart(_log_handler_level)),
    # A write error while spooling (disk full) becomes a 0xA700 answer instead of a dead association.
    (dimse_messages, "NamedTemporaryFile", open_receive_file),
    # Polling sleeps of associations given wake-ups (wake_reactors_early) end when there is work.
    (association, "time", reactor_time),
    (dul, "time", reactor_time),
    # A C-STORE given a file's path (C-MOVE/C-GET sub-operations, pacs_node.dicom.qr.sending) streams
    # the stored data set from disk instead of decoding and re-encoding it.
    (_config, "STORE_SEND_CHUNKED_DATASET", True),
    # Command sets written with struct instead of pydicom's writer, byte for byte the same: a third of
    # the CPU of a C-FIND answer or a C-MOVE sub-operation (see pacs_node.dicom.command_sets).
    (dimse_messages, "encode", encode_command_set),
    # Received command sets read with struct into converted elements, the same as pydicom's reading
    # (pacs_node.dicom.command_sets).
    (dimse_messages, "decode", decode_command_set),
    # The File Meta Information at the head of each received dataset's spool file written with struct,
    # byte for byte pydicom's (pacs_node.dicom.file_meta); the two go together.
    (dimse_messages, "create_file_meta", plan_file_meta),
    (dimse_messages, "write_file_meta_info", write_file_meta),
    # C-FIND response identifiers the Q/R SCP encoded itself go out as they are (pacs_node.dicom.qr.find).
    (service_class, "encode", encode_pre_encoded),
    # The pending responses of a C-FIND, C-MOVE or C-GET reuse one command set (pacs_node.dicom.command_sets).
    (dimse_messages.C_FIND_RSP, "primitive_to_message", reuse_pending_command_sets),
    (dimse_messages.C_MOVE_RSP, "primitive_to_message", reuse_pending_command_sets),
    (dimse_messages.C_GET_RSP, "primitive_to_message", reuse_pending_command_sets),
    # A C-STORE-RSP's command set built directly, the same elements and values as pynetdicom's
    # (pacs_node.dicom.command_sets); the two go together.
    (dimse_messages.C_STORE_RSP, "__init__", store_response_init),
    (dimse_messages.C_STORE_RSP, "primitive_to_message", store_response_to_message),
)

_lock = threading.Lock()
_servers = 0
_saved: list[Any] = []


def apply_pynetdicom_adjustments() -> None:
    """Apply the adjustments for one more running server (counted; see :func:`undo_pynetdicom_adjustments`)."""
    global _servers
    with _lock:
        if _servers == 0:
            _saved[:] = [getattr(module, name) for module, name, _ in _ADJUSTMENTS]
            for module, name, value in _ADJUSTMENTS:
                setattr(module, name, value.value() if isinstance(value, _AtStart) else value)
        _servers += 1


def undo_pynetdicom_adjustments() -> None:
    """One server fewer; when none is left, pynetdicom's own values come back."""
    global _servers
    with _lock:
        if _servers == 0:
            return
        _servers -= 1
        if _servers == 0:
            for (module, name, _), value in zip(_ADJUSTMENTS, _saved, strict=True):
                setattr(module, name, value)
