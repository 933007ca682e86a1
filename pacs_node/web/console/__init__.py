"""The console: server-rendered pages (Jinja2) for a PACS administrator — the queue with live counts,
failing destinations, a study with the analysed image, its region boxes, report and findings, and the
actions (retry, re-analyse, resend). Every asset is served by the node (no CDN). Studies are addressed
by StudyInstanceUID (not patient data); a search by accession number or patient ID is a POST, so those
never appear in a URL.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Form, HTTPException, Request
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.responses import HTMLResponse, RedirectResponse, Response

from pacs_node.ops import admin as ops
from pacs_node.web.auth import SESSION_COOKIE
from pacs_node.web.roles import admin
from pacs_node.web.console.findings import study_findings

_HERE = Path(__file__).resolve().parent

#: A function answering the login form with a status code and an optional error.
LoginPage = Callable[..., Response]


def mount(app: FastAPI) -> LoginPage:
    """Add the console's routes and static files to ``app``; returns the login page, with which the
    application answers any console page asked without a session."""
    templates = Jinja2Templates(directory=_HERE / "templates")

    def login_page(status_code: int = 401, error: str | None = None) -> Response:
        template = templates.env.get_template("login.html")
        return HTMLResponse(template.render(error=error), status_code=status_code)

    def _page(request: Request, name: str, **context: Any) -> Response:
        return templates.TemplateResponse(request, name, {"who": request.state.principal, **context})

    app.mount("/console/static", StaticFiles(directory=_HERE / "static"), name="console-static")

    @app.get("/", include_in_schema=False)
    def root() -> Response:
        return RedirectResponse("/console/", status_code=303)

    @app.post("/console/login", include_in_schema=False)
    def login(request: Request, name: str = Form(""), secret: str = Form("")) -> Response:
        principal = request.app.state.auth.verify(secret, name) if name and secret else None
        if principal is None:
            return login_page(401, "unknown name or secret")
        response = RedirectResponse("/console/", status_code=303)
        response.set_cookie(SESSION_COOKIE, request.app.state.auth.open_session(principal), httponly=True,
                            samesite="strict", secure=request.url.scheme == "https", path="/")
        return response

    @app.get("/console/login", include_in_schema=False)
    def login_form() -> Response:
        return login_page(200)

    @app.post("/console/logout", include_in_schema=False)
    def logout(request: Request) -> Response:
        request.app.state.auth.close_session(request.cookies.get(SESSION_COOKIE))
        response = RedirectResponse("/console/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    @app.get("/console/", include_in_schema=False)
    def home(request: Request) -> Response:
        rt = request.app.state.runtime
        return _page(request, "queue.html", counts=rt.queue.counts(), destinations=ops.destinations(rt),
                     jobs=[ops.job_dict(j) for j in ops.list_jobs(rt, limit=50)], studies=ops.find(rt, limit=20))

    @app.post("/console/search", include_in_schema=False)
    def search(request: Request, accession_number: str = Form(""), patient_id: str = Form("")) -> Response:
        rt = request.app.state.runtime
        found = ops.find(rt, accession_number=accession_number.strip() or None,
                         patient_id=patient_id.strip() or None, limit=50)
        if len(found) == 1:
            return RedirectResponse(f"/console/studies/{found[0]['study_instance_uid']}", status_code=303)
        return _page(request, "search.html", studies=found)

    @app.get("/console/studies/{study}", include_in_schema=False)
    def study(request: Request, study: str) -> Response:
        rt = request.app.state.runtime
        try:
            report = ops.study_report(rt, study)
        except ops.NotFound:
            raise HTTPException(404, "no such study") from None
        return _page(request, "study.html", study=study, report=report,
                     images=study_findings(rt, report), peers=sorted(rt.settings.peers))

    @app.post("/console/jobs/{job_id}/retry", include_in_schema=False, dependencies=[Depends(admin)])
    def retry(request: Request, job_id: int, back: str = Form("/console/")) -> Response:
        ops.retry_job(request.app.state.runtime, job_id)
        return RedirectResponse(_local(back), status_code=303)

    @app.post("/console/jobs/{job_id}/cancel", include_in_schema=False, dependencies=[Depends(admin)])
    def cancel(request: Request, job_id: int, back: str = Form("/console/")) -> Response:
        ops.cancel_job(request.app.state.runtime, job_id)
        return RedirectResponse(_local(back), status_code=303)

    @app.post("/console/studies/{study}/reanalyse", include_in_schema=False, dependencies=[Depends(admin)])
    def reanalyse(request: Request, study: str) -> Response:
        try:
            ops.reanalyse(request.app.state.runtime, study)
        except ops.AdminError as exc:
            raise HTTPException(409, str(exc)) from None
        return RedirectResponse(f"/console/studies/{study}", status_code=303)

    @app.post("/console/studies/{study}/resend", include_in_schema=False, dependencies=[Depends(admin)])
    def resend(request: Request, study: str, peer: str = Form(...)) -> Response:
        try:
            ops.resend(request.app.state.runtime, study, peer)
        except ops.AdminError as exc:
            raise HTTPException(409, str(exc)) from None
        return RedirectResponse(f"/console/studies/{study}", status_code=303)

    return login_page


def _local(path: str) -> str:
    """Only redirect within the console (no open redirect through ``back``)."""
    return path if path.startswith("/console/") and "//" not in path else "/console/"
