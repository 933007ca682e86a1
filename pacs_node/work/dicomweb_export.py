"""Results to a DICOMweb peer by STOW-RS: the batch of one destination in one request, each job settled
on its own entry in the response (ReferencedSOPSequence: stored; FailedSOPSequence: its failure
reason; neither: failed, retried), so a partially failed request retries only what failed. Everything
else — claiming, batching, retries with backoff, dead letters — is the exporter's, shared with DIMSE.
"""

from __future__ import annotations

import secrets
from io import BytesIO

import requests
from pydicom import Dataset

from pacs_node.config import Peer, Settings
from pacs_node.dicom.scu import ScuError

#: Statuses after which sending the same request again may work (the rest are refusals of the request).
_RETRYABLE_HTTP = frozenset({401, 403, 404, 408, 429})
_REFERENCED, _FAILED, _SOP_UID, _REASON = "00081199", "00081198", "00081155", "00081197"


def _session(peer: Peer) -> requests.Session:
    session = requests.Session()
    session.verify = str(peer.ca_file) if peer.ca_file is not None else True
    auth = peer.auth
    if auth is not None and auth.bearer_token is not None:
        session.headers["Authorization"] = f"Bearer {auth.bearer_token.get_secret_value()}"
    elif auth is not None and auth.username is not None and auth.password is not None:
        session.auth = (auth.username, auth.password.get_secret_value())
    return session


def _request(peer: Peer, settings: Settings, method: str, path: str, **kwargs: object) -> requests.Response:
    where = peer.describe()
    try:
        with _session(peer) as session:
            return session.request(method, peer.url.rstrip("/") + path, timeout=settings.export.timeout_s,
                                   **kwargs)  # type: ignore[arg-type, union-attr]
    except requests.exceptions.SSLError as exc:
        raise ScuError(f"TLS with {where} failed (peers.*.ca_file?): {type(exc).__name__}") from None
    except requests.RequestException as exc:
        raise ScuError(f"no answer from {where}: {type(exc).__name__}") from None


def ping(settings: Settings, peer: Peer) -> int:
    """The DICOMweb counterpart of C-ECHO: a QIDO-RS asking for one study; 0 when the peer answers."""
    response = _request(peer, settings, "GET", "/studies", params={"limit": "1"},
                        headers={"Accept": "application/dicom+json"})
    if response.status_code in (200, 204):
        return 0
    raise ScuError(f"{peer.describe()} answered QIDO-RS with HTTP {response.status_code}")


def _body(datasets: list[Dataset], boundary: str) -> bytes:
    """Result objects are kilobytes: the body of a batch is built in memory."""
    out = BytesIO()
    for ds in datasets:
        out.write(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode())
        ds.save_as(out, enforce_file_format=True)
        out.write(b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue()


def stow_datasets(settings: Settings, peer: Peer, datasets: list[Dataset]) -> list[int | ScuError]:
    """STOW-RS ``datasets`` to ``peer`` in one request; per dataset, in order: 0 when the peer stored
    it, its failure reason when the peer refused it, or a :class:`ScuError`."""
    boundary = f"pacsnode-{secrets.token_hex(12)}"
    response = _request(
        peer, settings, "POST", "/studies", data=_body(datasets, boundary),
        headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                 "Accept": "application/dicom+json"},
    )
    where = peer.describe()
    if response.status_code not in (200, 202, 409):
        error = ScuError(f"{where} answered STOW-RS with HTTP {response.status_code}",
                         retryable=response.status_code >= 500 or response.status_code in _RETRYABLE_HTTP)
        return [error] * len(datasets)
    try:
        answer = response.json() if response.content else {}
    except ValueError:
        answer = {}
    stored = {item.get(_SOP_UID, {}).get("Value", [None])[0]
              for item in answer.get(_REFERENCED, {}).get("Value", [])}
    failed = {item.get(_SOP_UID, {}).get("Value", [None])[0]: item.get(_REASON, {}).get("Value", [0xC000])[0]
              for item in answer.get(_FAILED, {}).get("Value", [])}
    if response.status_code == 200 and not stored and not failed:
        return [0] * len(datasets)  # a server that answers success without the (optional) details
    outcomes: list[int | ScuError] = []
    for ds in datasets:
        uid = str(ds.SOPInstanceUID)
        if uid in stored:
            outcomes.append(0)
        elif uid in failed:
            outcomes.append(int(failed[uid]) or 0xC000)
        else:
            outcomes.append(ScuError(f"{where} did not say whether it stored this instance"))
    return outcomes
