"""DICOM TLS on both sides, with real peers: DCMTK ``storescu +tls``/``echoscu`` and pynetdicom against the
listener (mutual TLS), and the exporter against a DCMTK ``storescp +tls``. Right certificates succeed, wrong
ones fail, and the key password never shows up in a log line or an error."""

from __future__ import annotations

import json
import logging
import ssl
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pynetdicom.sop_class import ComputedRadiographyImageStorage, Verification
from sqlalchemy import func, select

from pacs_node.config import Peer, Settings, load_settings
from pacs_node.dicom.scu import ScuError, send_datasets
from pacs_node.web.server import WebServer
from pacs_node.dicom.server import Listener
from pacs_node.ops.context import ServerContext
from pacs_node.dicom.tls import TLSConfigError, server_context
from storage.schema import Instance
from tests.pacs_node.helpers import StoreSCP, make_cr, requestor
from tests.reliability.certs import KEY_PASSWORD, Certs, make_certs
from tests.support import dcmtk, free_port


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def tls_node(tmp_path: Path, certs: Certs, caplog: pytest.LogCaptureFixture) -> Iterator[tuple[Settings, ServerContext]]:
    caplog.set_level(logging.DEBUG)
    settings = Settings(
        node={"port": free_port(), "bind": "127.0.0.1", "data_dir": tmp_path / "var",
              "tls": {"cert_file": certs.server.cert, "key_file": certs.server.key,
                      "key_password": KEY_PASSWORD, "ca_file": certs.ca}},
        store={"min_free_bytes": 0},
        pipeline={"bundle": "fake"},
    )
    runtime = ServerContext.open(settings)
    listener = Listener(settings, runtime)
    listener.start()
    yield settings, runtime
    listener.stop()
    runtime.close()
    assert KEY_PASSWORD not in caplog.text


def _stored(runtime: ServerContext) -> int:
    with runtime.read_session() as session:
        return int(session.scalar(select(func.count()).select_from(Instance)))


def _storescu_tls(port: int, key: Path, cert: Path, ca: Path, files: list[Path]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [dcmtk("storescu"), "-aet", "MODALITY", "-aec", "PACSNODE", "+tls", str(key), str(cert), "+cf", str(ca),
         "127.0.0.1", str(port), *map(str, files)],
        check=False, capture_output=True, text=True, timeout=60,
    )


def test_dcmtk_storescu_with_the_right_certificate_stores(tls_node: tuple[Settings, ServerContext], certs: Certs,
                                                         tmp_path: Path) -> None:
    settings, runtime = tls_node
    image = tmp_path / "cr.dcm"
    make_cr(image)
    done = _storescu_tls(settings.node.port, certs.client.key, certs.client.cert, certs.ca, [image])
    assert done.returncode == 0, done.stdout + done.stderr
    assert _stored(runtime) == 1


def test_dcmtk_refused_with_a_wrong_certificate_or_without_tls(tls_node: tuple[Settings, ServerContext], certs: Certs,
                                                               tmp_path: Path) -> None:
    settings, runtime = tls_node
    port = settings.node.port
    image = tmp_path / "cr.dcm"
    make_cr(image)
    # a client certificate from a CA the node does not trust
    rogue = _storescu_tls(port, certs.rogue_client.key, certs.rogue_client.cert, certs.ca, [image])
    assert rogue.returncode != 0
    # a node certificate the client cannot verify (client trusts only the rogue CA)
    distrust = _storescu_tls(port, certs.client.key, certs.client.cert, certs.rogue_ca, [image])
    assert distrust.returncode != 0
    # plain TCP to a TLS port
    plain = subprocess.run([dcmtk("storescu"), "-aet", "MODALITY", "-aec", "PACSNODE", "127.0.0.1", str(port),
                            str(image)], check=False, capture_output=True, text=True, timeout=60)
    assert plain.returncode != 0
    assert _stored(runtime) == 0
    # none of that hurt the listener
    echo = subprocess.run([dcmtk("echoscu"), "-aet", "MODALITY", "-aec", "PACSNODE", "+tls", str(certs.client.key),
                           str(certs.client.cert), "+cf", str(certs.ca), "127.0.0.1", str(port)],
                          check=False, capture_output=True, text=True, timeout=60)
    assert echo.returncode == 0, echo.stdout + echo.stderr


def _pynetdicom_store(port: int, client: tuple[Path, Path] | None, ca: Path, image: Path) -> int | None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=str(ca))
    if client is not None:
        context.load_cert_chain(str(client[0]), str(client[1]))
    ae = requestor("PYSCU")
    ae.acse_timeout = ae.network_timeout = 10
    ae.add_requested_context(ComputedRadiographyImageStorage)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSNODE", tls_args=(context, "localhost"))
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_store(image)
        return int(status.Status) if status else None
    finally:
        assoc.release()


def test_pynetdicom_right_and_wrong_certificates(tls_node: tuple[Settings, ServerContext], certs: Certs,
                                                 tmp_path: Path) -> None:
    settings, runtime = tls_node
    port = settings.node.port
    images = [tmp_path / f"{i}.dcm" for i in range(3)]
    for i, image in enumerate(images):
        make_cr(image, seed=i)
    assert _pynetdicom_store(port, (certs.client.cert, certs.client.key), certs.ca, images[0]) == 0
    assert _pynetdicom_store(port, (certs.rogue_client.cert, certs.rogue_client.key), certs.ca, images[1]) is None
    assert _pynetdicom_store(port, None, certs.ca, images[1]) is None  # mutual TLS: no certificate, no entry
    assert _pynetdicom_store(port, (certs.client.cert, certs.client.key), certs.rogue_ca, images[2]) is None
    assert _stored(runtime) == 1


def test_silent_tls_client_does_not_block_others(tls_node: tuple[Settings, ServerContext], certs: Certs,
                                                 tmp_path: Path) -> None:
    """The handshake happens in the doorman, without blocking: clients that connect and say nothing, or
    stop half-way through their ClientHello, hold up neither the accept loop nor an association slot,
    however many more of them there are than slots."""
    import contextlib
    import socket

    settings, _ = tls_node
    image = tmp_path / "cr.dcm"
    make_cr(image)
    hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"  # the first bytes of a ClientHello, no more
    with contextlib.ExitStack() as stack:
        for i in range(settings.node.max_associations + 4):
            sock = stack.enter_context(socket.create_connection(("127.0.0.1", settings.node.port)))
            if i % 2:
                sock.sendall(hello)
        assert _pynetdicom_store(settings.node.port, (certs.client.cert, certs.client.key), certs.ca, image) == 0
        done = _storescu_tls(settings.node.port, certs.client.key, certs.client.cert, certs.ca, [image])
        assert done.returncode == 0, done.stdout + done.stderr


def test_export_over_tls_to_dcmtk_storescp(tmp_path: Path, certs: Certs, caplog: pytest.LogCaptureFixture) -> None:
    dcmtk("storescp")
    port = free_port()
    scp = StoreSCP(tmp_path / "received", port).start(
        "+tls", str(certs.pacs.key), str(certs.pacs.cert), "+cf", str(certs.ca))
    try:
        image = tmp_path / "cr.dcm"
        make_cr(image)
        ds = pydicom.dcmread(image)
        settings = Settings(node={"data_dir": tmp_path / "var"}, export={"timeout_s": 10})
        good = Peer(ae_title="RECEIVER", host="localhost", port=port,
                    tls={"ca_file": certs.ca, "cert_file": certs.client.cert, "key_file": certs.client.key})
        assert send_datasets(settings, good, [ds]) == [0]
        assert [str(r.SOPInstanceUID) for r in scp.received()] == [str(ds.SOPInstanceUID)]
        # the receiver's certificate does not chain to the CA we were told to trust
        distrust = Peer(ae_title="RECEIVER", host="localhost", port=port, tls={"ca_file": certs.rogue_ca})
        with pytest.raises(ScuError):
            send_datasets(settings, distrust, [ds])
        # our certificate is not one the receiver trusts
        rogue = Peer(ae_title="RECEIVER", host="localhost", port=port,
                     tls={"ca_file": certs.ca, "cert_file": certs.rogue_client.cert,
                          "key_file": certs.rogue_client.key})
        with pytest.raises(ScuError):
            send_datasets(settings, rogue, [ds])
        assert len(scp.received()) == 1
    finally:
        scp.stop()


def test_bad_tls_settings_name_the_key_and_hide_the_password(tmp_path: Path, certs: Certs) -> None:
    settings = Settings(node={"tls": {"cert_file": certs.server.cert, "key_file": certs.server.key,
                                      "key_password": "wrong-" + KEY_PASSWORD}})
    assert settings.node.tls is not None
    with pytest.raises(TLSConfigError) as wrong:
        server_context(settings.node.tls)
    assert "node.tls" in str(wrong.value) and KEY_PASSWORD not in str(wrong.value)
    missing = Settings(node={"tls": {"cert_file": tmp_path / "nope.pem", "key_file": certs.server.key}})
    assert missing.node.tls is not None
    with pytest.raises(TLSConfigError, match=r"node\.tls\.cert_file"):
        server_context(missing.node.tls)
    # the effective configuration, as `config check --json` prints it, masks the password
    config = tmp_path / "pacs-node.toml"
    config.write_text(f'[node.tls]\ncert_file = "{certs.server.cert}"\nkey_file = "{certs.server.key}"\n'
                      f'key_password = "{KEY_PASSWORD}"\n')
    loaded = load_settings(config)
    assert KEY_PASSWORD not in loaded.model_dump_json() and KEY_PASSWORD not in repr(loaded)


def test_http_endpoint_binds_loopback_by_default(tmp_path: Path) -> None:
    settings = Settings(node={"data_dir": tmp_path / "var"}, store={"min_free_bytes": 0}, http={"port": free_port()})
    assert settings.http.bind == "127.0.0.1"
    runtime = ServerContext.open(settings)
    server = WebServer(settings, runtime)
    server.start()
    try:
        # it answers on loopback (503: no worker runs in this test, so nothing could be analysed)
        with pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=10)
        assert answer.value.code == 503 and "workers" in json.load(answer.value)["failing"]
        # listening on loopback only: the socket is bound to 127.0.0.1, not to every address
        local = [line.split()[1] for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
                 if line.split()[3] == "0A"]  # state LISTEN
        assert f"0100007F:{server.port:04X}" in local
        assert f"00000000:{server.port:04X}" not in local
    finally:
        server.stop()
        runtime.close()
