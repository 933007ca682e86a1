"""The node's ASGI application: ``/healthz``, ``/metrics``, ``/dicom-web`` (STOW/QIDO/WADO-RS), ``/api``
(the admin API, OpenAPI schema at ``/api/openapi.json``) and the console under ``/console``.

Every route needs a principal (:mod:`pacs_node.web.auth`) except ``/healthz`` and ``/metrics`` asked
from the node's own machine (the probes and the local Prometheus of today's deployments); a request
without one gets 401 — the console's pages answer it with their login form.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from pacs_node.config import Settings
from pacs_node.dicom.qr.matching import Level, QueryError
from pacs_node.ops import metrics
from pacs_node.ops.context import ServerContext
from pacs_node.ops.health import Listening, NodeStateCollector, node_health
from pacs_node.web import api, console
from pacs_node.web.auth import SESSION_COOKIE, Authenticator, Principal
from pacs_node.web.roles import admin
from pacs_node.web.dicomweb import qido, wado
from pacs_node.web.dicomweb.stow import DICOM_JSON, StowService
from pacs_node.work.ingest import Caller, Ingestor
from storage.repository import instances_for_study

log = logging.getLogger(__name__)

_LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")
_OPEN_ON_LOOPBACK = ("/healthz", "/metrics")
_OPEN = ("/console/login",)


class AuthMiddleware:
    """Puts the request's :class:`Principal` in ``scope["state"]["principal"]``, or answers 401."""

    def __init__(self, app: ASGIApp, auth: Authenticator, login_page: console.LoginPage) -> None:
        self.app = app
        self.auth = auth
        self.login_page = login_page

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        client = (scope.get("client") or ("",))[0]
        if path in _OPEN or (path in _OPEN_ON_LOOPBACK and client in _LOOPBACK):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        principal = self.auth.from_header(headers.get("authorization"))
        if principal is None:
            principal = self.auth.from_session(_cookie(headers.get("cookie", ""), SESSION_COOKIE))
        if principal is None:
            if path == "/" or path.startswith("/console"):
                response: Response = self.login_page(status_code=401)
            else:
                response = JSONResponse({"error": "authentication required"}, status_code=401,
                                        headers={"WWW-Authenticate": 'Bearer realm="pacs-node", Basic realm="pacs-node"'})
            await response(scope, receive, send)
            return
        scope.setdefault("state", {})["principal"] = principal
        await self.app(scope, receive, send)


def _cookie(header: str, name: str) -> str | None:
    for item in header.split(";"):
        key, sep, value = item.strip().partition("=")
        if sep and key == name:
            return value
    return None


def create_app(settings: Settings, runtime: ServerContext, listener: Listening | None = None) -> FastAPI:
    """The application for one process; nothing happens until it is served. ``listener``: the DICOM
    listener of this process, for ``/healthz``."""
    app = FastAPI(title="pacs-node", version="1", openapi_url="/api/openapi.json", docs_url=None,
                  redoc_url=None, description="Admin API of the chest-radiograph AI node.")
    auth = Authenticator(settings.http.tokens, settings.http.session_minutes * 60)
    app.state.settings = settings
    app.state.runtime = runtime
    app.state.auth = auth
    registry = metrics.scrape_registry(runtime.queue_depth, [NodeStateCollector(runtime)])

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> Response:
        report = node_health(runtime, listener=listener)
        return JSONResponse(report.to_json(), status_code=report.http_status)

    @app.get("/metrics", include_in_schema=False)
    def metrics_endpoint() -> Response:
        try:
            body = metrics.render(registry)
        except Exception as exc:
            log.exception("rendering metrics failed")
            return Response(f"{type(exc).__name__}: {exc}\n", status_code=500, media_type="text/plain")
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    _dicomweb_routes(app, settings, runtime)
    app.include_router(api.router)
    login_page = console.mount(app)
    app.add_middleware(AuthMiddleware, auth=auth, login_page=login_page)
    return app


def _dicomweb_routes(app: FastAPI, settings: Settings, runtime: ServerContext) -> None:
    stow = StowService(Ingestor(settings, runtime), settings.http.max_request_bytes, settings.http.read_timeout_s)
    base = "/dicom-web"

    def base_url(request: Request) -> str:
        return str(request.base_url).rstrip("/") + base

    @app.post(base + "/studies", include_in_schema=False)
    async def stow_studies(request: Request, who: Principal = Depends(admin)) -> Response:
        return await stow.handle(request, _caller(request, who), None)

    @app.post(base + "/studies/{study}", include_in_schema=False)
    async def stow_study(study: str, request: Request, who: Principal = Depends(admin)) -> Response:
        return await stow.handle(request, _caller(request, who), study)

    def query(request: Request, level: Level, scope: dict[str, str]) -> Response:
        try:
            identifier, limit, offset = qido.build_query(request.query_params.multi_items(), level, scope)
            with runtime.read_session() as session:
                found = qido.search(session, identifier, level, limit, offset, base_url(request))
        except QueryError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        if not found:
            return Response(status_code=204)
        return JSONResponse(found, media_type=DICOM_JSON)

    def qido_route(level: Level) -> Any:
        def search(request: Request) -> Response:
            scope = {keyword: request.path_params[name] for name, keyword in
                     (("study", "StudyInstanceUID"), ("series", "SeriesInstanceUID")) if name in request.path_params}
            return query(request, level, scope)
        return search

    for path, level in (("/studies", Level.STUDY), ("/series", Level.SERIES), ("/instances", Level.IMAGE),
                        ("/studies/{study}/series", Level.SERIES), ("/studies/{study}/instances", Level.IMAGE),
                        ("/studies/{study}/series/{series}/instances", Level.IMAGE)):
        app.add_api_route(base + path, qido_route(level), methods=["GET"], include_in_schema=False)

    def rows(study: str, series: str | None = None, sop: str | None = None) -> list[Any]:
        with runtime.read_session() as session:
            found = [row for row in instances_for_study(session, study, series, sop) if row.path]
        if not found:
            raise HTTPException(404, "no such study, series or instance here")
        return found

    def retrieve(study: str, series: str | None = None, sop: str | None = None) -> Response:
        content_type, body = wado.dicom_parts(runtime.store.path, rows(study, series, sop))
        return StreamingResponse(body, media_type=content_type)

    def metadata(study: str, series: str | None = None, sop: str | None = None) -> Response:
        paths = [runtime.store.path(row.path) for row in rows(study, series, sop)]
        return JSONResponse(wado.metadata(paths), media_type=DICOM_JSON)

    def entity(request: Request) -> tuple[str, str | None, str | None]:
        p = request.path_params
        return p["study"], p.get("series"), p.get("sop")

    def retrieve_route(request: Request) -> Response:
        return retrieve(*entity(request))

    def metadata_route(request: Request) -> Response:
        return metadata(*entity(request))

    for path in ("/studies/{study}", "/studies/{study}/series/{series}",
                 "/studies/{study}/series/{series}/instances/{sop}"):
        app.add_api_route(base + path, retrieve_route, methods=["GET"], include_in_schema=False)
        app.add_api_route(base + path + "/metadata", metadata_route, methods=["GET"], include_in_schema=False)

    @app.get(base + "/studies/{study}/series/{series}/instances/{sop}/rendered", include_in_schema=False)
    def wado_rendered(study: str, series: str, sop: str, request: Request) -> Response:
        media = "image/jpeg" if "image/jpeg" in request.headers.get("accept", "") else "image/png"
        row = rows(study, series, sop)[0]
        try:
            image = wado.rendered(runtime.store.path(row.path), media)
        except Exception as exc:  # a result object (SR) has no pixels; a codec may be missing
            raise HTTPException(406, f"this instance cannot be rendered: {type(exc).__name__}") from exc
        return Response(image, media_type=media)


def _caller(request: Request, who: Principal) -> Caller:
    """The STOW-RS client as the ingestor records it: the token's name stands for the calling AE (so
    ``routing`` rules and ``default = "sender"`` can name it), the client's address for the host."""
    return Caller(ae_title=who.name[:16], host=request.client.host if request.client else None)
