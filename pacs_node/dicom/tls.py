"""DICOM TLS (PS3.15 Annex B, BCP 195): ``ssl.SSLContext`` objects built from the configuration.

Two sides, two builders:

* :func:`server_context` for the listener (``[node.tls]``): our certificate and key, and, when ``ca_file``
  is given, *mutual* TLS — a caller must present a certificate signed by that CA or the handshake fails
  before any DICOM byte is read. The AE allow-list still applies on top.
* :func:`client_context` for associations we open (export, echo) to a peer with ``tls = {...}``: the CA
  that signed the peer's certificate, and our own certificate when the peer wants mutual TLS.

Both refuse anything older than TLS 1.2. Every failure raises :class:`TLSConfigError` naming the config key
and the file; a key password is passed to OpenSSL and never formatted into a message or a log line.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from pydantic import SecretStr

from pacs_node.config import ListenerTLSConfig, Peer, TLSConfig


class TLSConfigError(ValueError):
    """A TLS setting cannot be used; ``str()`` names the key (``node.tls.key_file: ...``)."""


def _password(secret: SecretStr | None) -> str | None:
    return secret.get_secret_value() if secret is not None else None


def _load_chain(context: ssl.SSLContext, key: str, cert_file: Path, key_file: Path | None,
                password: SecretStr | None) -> None:
    for name, path in ((f"{key}.cert_file", cert_file), (f"{key}.key_file", key_file)):
        if path is not None and not Path(path).is_file():
            raise TLSConfigError(f"{name}: {path} does not exist or is not a file")
    try:
        context.load_cert_chain(str(cert_file), str(key_file) if key_file else None, _password(password))
    except ssl.SSLError as exc:
        # OpenSSL's reason ("bad decrypt", "key values mismatch") is safe to show; the password is not in it.
        raise TLSConfigError(f"{key}.cert_file/{key}.key_file: cannot load {cert_file} with its key "
                             f"({exc.reason or exc.strerror or 'unreadable'}; wrong key_password?)") from None


def _load_ca(context: ssl.SSLContext, key: str, ca_file: Path) -> None:
    if not Path(ca_file).is_file():
        raise TLSConfigError(f"{key}.ca_file: {ca_file} does not exist or is not a file")
    try:
        context.load_verify_locations(cafile=str(ca_file))
    except ssl.SSLError as exc:
        raise TLSConfigError(f"{key}.ca_file: {ca_file} holds no usable PEM certificate "
                             f"({exc.reason or exc.strerror})") from None


def server_context(config: ListenerTLSConfig, key: str = "node.tls") -> ssl.SSLContext:
    """The listener's context: our certificate, and client certificates required when ``ca_file`` is set."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(context, key, config.cert_file, config.key_file, config.key_password)
    if config.ca_file is not None:
        _load_ca(context, key, config.ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(config: TLSConfig, key: str) -> ssl.SSLContext:
    """The context for associating with a peer: verify its certificate against ``ca_file`` (and its
    host name unless ``check_hostname`` is off), present ours when configured."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = config.check_hostname
    _load_ca(context, key, config.ca_file)
    if config.cert_file is not None:
        _load_chain(context, key, config.cert_file, config.key_file, config.key_password)
    elif config.key_file is not None:
        raise TLSConfigError(f"{key}.key_file: given without {key}.cert_file")
    return context


def peer_tls_args(peer: Peer, name: str | None = None) -> tuple[ssl.SSLContext, str] | None:
    """pynetdicom's ``tls_args`` for ``peer`` (``None`` when it is plain TCP); ``name`` is its key under
    ``[peers]`` (an ad-hoc peer has none)."""
    if peer.tls is None:
        return None
    key = f"peers.{name}.tls" if name else f"tls of peer {peer.ae_title}"
    return client_context(peer.tls, key), peer.host
