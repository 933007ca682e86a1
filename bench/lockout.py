"""Lock-out attack on a running listener, over loopback only: connections that trickle an A-ASSOCIATE-RQ
one byte at a time, and idle connections reopened as soon as they are closed, while a legitimate DCMTK
``storescu`` sends an image every few seconds. Reports how long each legitimate send took.

    python -m bench.lockout                       # the attack as it was reported: 50 tricklers at one
                                                  # byte per 20 s, 20 idle sockets reopened every 8 s, 95 s
    python -m bench.lockout --trickle-s 1 --reopen-s 1 --duration-s 10 --deadline-s 3   # a quick look

It starts its own ``pacs-node serve`` (fake pipeline, no worker) with ``node.request_deadline_s`` =
``--deadline-s``. The tests use :class:`Attack` against a listener of their own.
"""

from __future__ import annotations

import argparse
import os
import socket
import struct
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import BenchError, Node, chest_image_files, device_words, emit, machine, storescu_command


def associate_rq(called: str = "PACSNODE", calling: str = "ATTACKER") -> bytes:
    """A well-formed A-ASSOCIATE-RQ proposing Verification (what a trickler sends, slowly)."""
    def item(kind: int, body: bytes) -> bytes:
        return struct.pack(">BBH", kind, 0, len(body)) + body

    context = item(0x20, bytes([1, 0, 0, 0]) + item(0x30, b"1.2.840.10008.1.1") + item(0x40, b"1.2.840.10008.1.2"))
    user = item(0x50, item(0x51, struct.pack(">L", 16384)) + item(0x52, b"1.2.3.4"))
    body = (struct.pack(">HH", 1, 0) + called.ljust(16).encode() + calling.ljust(16).encode() + bytes(32)
            + item(0x10, b"1.2.840.10008.3.1.1.1") + context + user)
    return struct.pack(">BBL", 0x01, 0, len(body)) + body


@dataclass
class Attack:
    """``tricklers`` connections sending an A-ASSOCIATE-RQ one byte per ``trickle_s``, and ``idlers``
    connections that send nothing, each reopened ``reopen_s`` after it was closed (or at once when the
    listener closed it). Threads, all daemons; ``stop()`` ends them."""

    port: int
    tricklers: int = 50
    trickle_s: float = 20.0
    idlers: int = 20
    reopen_s: float = 8.0
    connections: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> Attack:
        for i in range(self.tricklers):
            self._spawn(self._trickle, f"trickler-{i}")
        for i in range(self.idlers):
            self._spawn(self._idle, f"idler-{i}")
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(5)

    def _spawn(self, target, name: str) -> None:  # noqa: ANN001
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _connect(self) -> socket.socket | None:
        try:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        except OSError:
            self._stop.wait(0.2)
            return None
        with self._lock:
            self.connections += 1
        return sock

    def _trickle(self) -> None:
        request = associate_rq()
        while not self._stop.is_set():
            sock = self._connect()
            if sock is None:
                continue
            with sock:
                for byte in request:
                    try:
                        sock.sendall(bytes([byte]))
                    except OSError:
                        break  # closed by the listener: reconnect
                    if self._stop.wait(self.trickle_s):
                        return

    def _idle(self) -> None:
        while not self._stop.is_set():
            sock = self._connect()
            if sock is None:
                continue
            with sock:
                sock.settimeout(self.reopen_s)
                try:
                    sock.recv(1)  # returns when the listener closes us, or times out
                except OSError:
                    pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tricklers", type=int, default=50)
    parser.add_argument("--trickle-s", type=float, default=20.0)
    parser.add_argument("--idlers", type=int, default=20)
    parser.add_argument("--reopen-s", type=float, default=8.0)
    parser.add_argument("--duration-s", type=float, default=95.0)
    parser.add_argument("--deadline-s", type=float, default=10.0, help="node.request_deadline_s")
    parser.add_argument("--every-s", type=float, default=3.0, help="a legitimate send this often")
    args = parser.parse_args(argv)
    image = chest_image_files(1, 64, 64)
    env = {**os.environ, "TCP_NODELAY": "1"}
    sends: list[tuple[float, int]] = []
    with tempfile.TemporaryDirectory(prefix="lockout-") as tmp:
        # [node] keys through the environment (Node's TOML appends its extra after [http])
        os.environ["PACS_NODE__NODE__MAX_ASSOCIATIONS"] = "4"
        os.environ["PACS_NODE__NODE__REQUEST_DEADLINE_S"] = str(args.deadline_s)
        node = Node(Path(tmp), extra_toml='[pipeline]\nbundle = "fake"\n[worker]\ncount = 0\n')
        with node:
            # The first association of a fresh process pays for imports and first connections: not measured.
            subprocess.run(storescu_command(node.port, image, node.ae_title, "MODALITY"), capture_output=True,
                           env=env, timeout=120, check=False)
            attack = Attack(node.port, args.tricklers, args.trickle_s, args.idlers, args.reopen_s).start()
            end = time.monotonic() + args.duration_s
            while time.monotonic() < end:
                started = time.monotonic()
                done = subprocess.run(storescu_command(node.port, image, node.ae_title, "MODALITY"),
                                      capture_output=True, env=env, timeout=120, check=False)
                sends.append((time.monotonic() - started, done.returncode))
                time.sleep(max(0.0, args.every_s - (time.monotonic() - started)))
            attack.stop()
    if not sends:
        raise BenchError("no legitimate send was made")
    seconds = sorted(s for s, _ in sends)
    failed = sum(rc != 0 for _, rc in sends)
    emit({"bench": "lockout", "sends": len(sends), "failed": failed, "send_s_max": round(seconds[-1], 3),
          "send_s_p50": round(seconds[len(seconds) // 2], 3), "attack_connections": attack.connections,
          "deadline_s": args.deadline_s, "send_s": [round(s, 3) for s, _ in sends], "machine": machine()},
         ["legitimate sends", "failed", "p50 s", "max s", "hostile connections", "request deadline s"],
         [[len(sends), failed, f"{seconds[len(seconds) // 2]:.3f}", f"{seconds[-1]:.3f}", attack.connections,
           f"{args.deadline_s:g}"]],
         title=f"DCMTK storescu under a lock-out attack ({args.tricklers} tricklers, {args.idlers} idlers), "
               f"{device_words(machine())}")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
