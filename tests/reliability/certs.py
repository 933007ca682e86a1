"""Throw-away X.509 material for the TLS tests, made with the ``openssl`` command line.

Two independent CAs: ``ca`` signs the node's and the good client's certificates, ``rogue`` signs a client
certificate the node must refuse. The node's key is encrypted with :data:`KEY_PASSWORD`, so the tests can
check that the password reaches OpenSSL and nothing else.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.support import require_tool

KEY_PASSWORD = "pw-7f3c-never-in-logs"


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Certs:
    ca: Path
    rogue_ca: Path
    server: Pair  # CN=localhost, SAN localhost + 127.0.0.1, key encrypted with KEY_PASSWORD
    pacs: Pair  # like server, key not encrypted (for a DCMTK storescp receiver)
    client: Pair  # signed by ca
    rogue_client: Pair  # signed by rogue_ca


def _run(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def _ca(directory: Path, name: str) -> Pair:
    pair = Pair(directory / f"{name}.pem", directory / f"{name}.key")
    _run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(pair.key), "-out", str(pair.cert), "-days", "2", "-subj", f"/CN={name} test CA",
         "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return pair


def _leaf(directory: Path, name: str, ca: Pair, *, server: bool, password: str | None = None) -> Pair:
    pair = Pair(directory / f"{name}.pem", directory / f"{name}.key")
    csr = directory / f"{name}.csr"
    key_args = ["-passout", f"pass:{password}"] if password else ["-nodes"]
    _run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", *key_args,
         "-keyout", str(pair.key), "-out", str(csr), "-subj", f"/CN={'localhost' if server else name}")
    ext = directory / f"{name}.ext"
    usage = "serverAuth" if server else "clientAuth"
    ext.write_text(f"extendedKeyUsage={usage}\n"
                   + ("subjectAltName=DNS:localhost,IP:127.0.0.1\n" if server else ""))
    _run("x509", "-req", "-in", str(csr), "-CA", str(ca.cert), "-CAkey", str(ca.key), "-CAcreateserial",
         "-out", str(pair.cert), "-days", "2", "-extfile", str(ext))
    return pair


def make_certs(directory: Path) -> Certs:
    require_tool("openssl")
    directory.mkdir(parents=True, exist_ok=True)
    ca, rogue = _ca(directory, "ca"), _ca(directory, "rogue")
    return Certs(
        ca=ca.cert,
        rogue_ca=rogue.cert,
        server=_leaf(directory, "node", ca, server=True, password=KEY_PASSWORD),
        pacs=_leaf(directory, "pacs", ca, server=True),
        client=_leaf(directory, "client", ca, server=False),
        rogue_client=_leaf(directory, "intruder", rogue, server=False),
    )
