"""Access: every route needs a token but ``/healthz`` (and ``/metrics`` from the node's own machine);
a read-only token reads but cannot change anything."""

from __future__ import annotations

import base64
import re
import socket
from pathlib import Path

import pytest
import requests
from starlette.routing import Mount

from tests.pacs_node.web.conftest import ADMIN_SECRET, READER_SECRET, Web, serve_web

UID = "1.2.3.4"


def _routes(web: Web) -> list[tuple[str, str]]:
    """(method, concrete path) of every route the application serves."""
    from pacs_node.web.app import create_app

    app = create_app(web.settings, web.runtime)
    found = []
    routes = []
    for route in app.routes:
        nested = getattr(route, "original_router", None)  # an included APIRouter
        routes += nested.routes if nested is not None else [route]
    for route in routes:
        if isinstance(route, Mount):
            found.append(("GET", route.path + "/console.css"))
            continue
        path = re.sub(r"\{[a-z_]+\}", UID, re.sub(r"\{job_id\}", "1", route.path))
        for method in sorted(getattr(route, "methods", None) or {"GET"}):
            if method != "HEAD":
                found.append((method, path))
    return found


def test_every_route_but_healthz_needs_a_token(web: Web) -> None:
    routes = _routes(web)
    assert len(routes) > 30
    for method, path in routes:
        answer = requests.request(method, web.base + path, timeout=10, allow_redirects=False)
        if path == "/healthz":  # open on loopback; 503 here, as no worker runs beside this app
            assert answer.status_code in (200, 503) and "checks" in answer.json(), (method, path)
        elif path == "/metrics":
            assert answer.status_code == 200, (method, path)  # open on loopback
        elif path == "/console/login":
            assert "Sign in" in answer.text  # the login form: how one gets a session
        else:
            assert answer.status_code == 401, (method, path, answer.status_code)
            # a bad secret is no better than none
            bad = requests.request(method, web.base + path, headers={"Authorization": "Bearer nope"}, timeout=10,
                                   allow_redirects=False)
            assert bad.status_code == 401, (method, path)


def test_read_only_token_cannot_change_anything(web: Web) -> None:
    changing = [(m, p) for m, p in _routes(web)
                if m == "POST" and p not in ("/console/login", "/console/logout", "/console/search",
                                             "/api/studies/find") and not p.endswith("/echo")]
    assert {"/api/queue/1/retry", "/api/queue/1/cancel", f"/api/studies/{UID}/resend",
            "/dicom-web/studies"} <= {p for _, p in changing}
    for method, path in changing:
        answer = requests.request(method, web.base + path, headers=web.reader, json={"peer": "x"}, timeout=10,
                                  allow_redirects=False)
        assert answer.status_code == 403, (method, path, answer.status_code)
    assert requests.get(web.base + "/api/queue", headers=web.reader, timeout=10).status_code == 200


def test_basic_auth_and_console_session(web: Web) -> None:
    basic = base64.b64encode(f"admin:{ADMIN_SECRET}".encode()).decode()
    assert requests.get(web.base + "/api/stats", headers={"Authorization": f"Basic {basic}"}, timeout=10).ok
    wrong_user = base64.b64encode(f"reader:{ADMIN_SECRET}".encode()).decode()
    assert requests.get(web.base + "/api/stats", headers={"Authorization": f"Basic {wrong_user}"},
                        timeout=10).status_code == 401
    session = requests.Session()
    refused = session.post(web.base + "/console/login", data={"name": "reader", "secret": "wrong"}, timeout=10)
    assert refused.status_code == 401
    session.post(web.base + "/console/login", data={"name": "reader", "secret": READER_SECRET}, timeout=10)
    assert session.get(web.base + "/api/queue/counts", timeout=10).ok
    session.post(web.base + "/console/logout", timeout=10)
    assert session.get(web.base + "/api/queue/counts", timeout=10).status_code == 401


def _outside_address() -> str | None:
    """An address of this machine that is not loopback, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 1))
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_health_and_metrics_need_a_token_from_elsewhere(tmp_path: Path) -> None:
    address = _outside_address()
    if address is None:
        pytest.skip("this machine has no non-loopback address to call from")
    server, web = serve_web(tmp_path, bind="0.0.0.0")
    try:
        outside = f"http://{address}:{server.port}"
        assert requests.get(outside + "/metrics", timeout=10).status_code == 401
        assert requests.get(outside + "/healthz", timeout=10).status_code == 401
        assert requests.get(outside + "/metrics", headers=web.reader, timeout=10).status_code == 200
        assert requests.get(web.base + "/healthz", timeout=10).json()["checks"]["database"]["ok"] is True
    finally:
        server.stop()
        web.runtime.close()
