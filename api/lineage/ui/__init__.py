"""The dashboard: server-rendered pages under /ui of the lineage API, read-only, behind the API's tokens.

    flashops ui                                   # the local SQLite lineage, opened in a browser on 127.0.0.1
    flashops lineage serve --port 8080            # then open http://127.0.0.1:8080/ui (paste a read token once)
    curl -H "Authorization: Bearer $TOKEN" http://127.0.0.1:8080/ui/pipelines   # scripts: the header works too

Pages (each URL can be pasted into a chat): /ui/pipelines, /ui/pipelines/{name}, /ui/runs/{id},
/ui/nodes/{id}?direction=up|down&depth=N (the lineage graph), /ui/deployments, /ui/evaluations,
/ui/find?ref=... (any id, URI or name -> its page).

Auth: the token entered on /ui/login is kept in an HttpOnly cookie for the browser session (gone when the
browser closes; /ui/logout clears it). Without a valid one a browser is sent to the login form (which brings it
back to the pasted URL); a script's wrong `Authorization: Bearer` header gets 401. No page shows data without it.
Jinja2 templates, with uPlot (charts), dagre (graph layout) and htmx (live refresh) vendored under static/vendor.
"""
from __future__ import annotations

import inspect
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qs, quote, urlsplit

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, select_autoescape

from flashops.api.lineage import queries
from flashops.api.lineage.auth import Tokens, scopes_of
from flashops.api.lineage.errors import NotFound
from flashops.api.lineage.ui import pages

HERE = Path(__file__).parent
REFUSED = "That token is not accepted (unknown, or it lacks the read scope)."
COOKIE = "flashops_lineage_token"
# No inline scripts anywhere (page data travels as <script type="application/json">); styles set by uPlot/htmx
# are inline, hence 'unsafe-inline' for style only.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
       "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")


def templates() -> Environment:
    env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]),
                      trim_blocks=True, lstrip_blocks=True)
    env.filters["short_time"] = lambda v: (v or "")[:19].replace("T", " ")
    env.filters["num"] = _num
    return env


def _num(v) -> str:
    if isinstance(v, bool) or v is None:
        return "" if v is None else str(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _safe_next(target: str | None) -> str:
    """Only a path inside the dashboard: a login link can never send the user elsewhere."""
    if not target:
        return "/ui/pipelines"
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not parts.path.startswith("/ui/") or parts.path.startswith("/ui/login"):
        return "/ui/pipelines"
    return target


def _timestamp(value: str | None) -> datetime | None:
    """A page cursor (an ISO timestamp the previous page linked to); anything else starts at the newest."""
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def mount_ui(app: FastAPI, store, tokens: Tokens) -> None:
    """Add the dashboard to the lineage API app: /ui/... pages and /ui/static."""
    env = templates()
    router = APIRouter(prefix="/ui", include_in_schema=False)

    def presented(request: Request) -> str | None:
        header = request.headers.get("authorization", "")
        if header.lower().startswith("bearer "):
            return header[7:].strip() or None
        return request.cookies.get(COOKIE) or None

    def allowed(token: str | None) -> bool:
        scopes = scopes_of(tokens, token) if token else None
        return scopes is not None and "read" in scopes

    def html(name: str, status: int = 200, **context) -> HTMLResponse:
        body = env.get_template(name).render(**context)
        return HTMLResponse(body, status_code=status, headers={"Content-Security-Policy": CSP,
                                                               "Cache-Control": "no-store",
                                                               "X-Content-Type-Options": "nosniff"})

    def refuse(request: Request, token: str | None) -> Response:
        """No data without a read token. A browser goes to the login form, which brings it back to the
        pasted URL; a script (bearer header) or an htmx refresh gets 401 with the form and nothing else."""
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        scripted = request.headers.get("authorization") or request.headers.get("hx-request")
        if scripted:
            return html("login.html", 401, error=REFUSED if token else "", next=_safe_next(target), page="login")
        to = f"/ui/login?next={quote(_safe_next(target), safe='')}" + ("&rejected=1" if token else "")
        response = RedirectResponse(to, status_code=303)
        if token:
            response.delete_cookie(COOKIE, path="/ui")
        return response

    def page(fn: Callable[..., HTMLResponse]):
        """Every page: the token first (no data without it), then the page, NotFound as a 404 page."""
        def wrapped(**kwargs) -> Response:
            request = kwargs.pop("request")
            token = presented(request)
            if not allowed(token):
                return refuse(request, token)
            try:
                return store.read(lambda s: fn(request, s, **kwargs))
            except NotFound as e:
                return html("missing.html", 404, message=str(e), page="")

        wrapped.__name__ = fn.__name__
        sig = inspect.signature(fn)  # FastAPI reads the page's own parameters (path, query), less the session
        wrapped.__signature__ = sig.replace(parameters=[p for n, p in sig.parameters.items() if n != "s"])
        return wrapped

    @router.get("", response_class=HTMLResponse)
    @router.get("/", response_class=HTMLResponse)
    def home() -> Response:
        return RedirectResponse("/ui/pipelines", status_code=303)

    @router.get("/login", response_class=HTMLResponse)
    def login_page(request: Request, next: str | None = None, token: str | None = None,
                   rejected: bool = False) -> Response:
        """`?token=` logs in straight away (what `flashops ui` opens); the token leaves the URL at once."""
        if token is not None:
            return _log_in(request, token, next)
        return html("login.html", 200, error=REFUSED if rejected else "", next=_safe_next(next), page="login")

    @router.post("/login", response_class=HTMLResponse)
    async def login_submit(request: Request) -> Response:
        form = parse_qs((await request.body()).decode("utf-8", "replace"))
        return _log_in(request, (form.get("token") or [""])[0].strip(), (form.get("next") or [None])[0])

    def _log_in(request: Request, token: str, target: str | None) -> Response:
        if not allowed(token):  # the form again, with why (a page, not an error: the browser shows it as is)
            return html("login.html", 200, error=REFUSED, next=_safe_next(target), page="login")
        response = RedirectResponse(_safe_next(target), status_code=303)
        # a session cookie (no max-age: gone when the browser closes), never readable by scripts
        response.set_cookie(COOKIE, token, httponly=True, samesite="strict", path="/ui",
                            secure=request.url.scheme == "https")
        return response

    @router.get("/logout", response_class=HTMLResponse)
    def logout() -> Response:
        response = RedirectResponse("/ui/login", status_code=303)
        response.delete_cookie(COOKIE, path="/ui")
        return response

    @router.get("/pipelines", response_class=HTMLResponse)
    @page
    def pipelines_page(request: Request, s, fragment: bool = False, before: str | None = None) -> HTMLResponse:
        data = pages.pipelines(s, _timestamp(before))
        return html("pipelines_table.html" if fragment else "pipelines.html", page="pipelines", **data)

    @router.get("/pipelines/{name}", response_class=HTMLResponse)
    @page
    def pipeline_page(request: Request, s, name: str, fragment: bool = False) -> HTMLResponse:
        data = pages.pipeline(s, name)
        if data is None:
            raise NotFound(f"no run of a pipeline named {name!r} is recorded")
        return html("pipeline_stages.html" if fragment else "pipeline.html", page="pipelines", p=data)

    @router.get("/runs/{run_id}", response_class=HTMLResponse)
    @page
    def run_page(request: Request, s, run_id: int) -> HTMLResponse:
        data = pages.run(s, run_id)
        if data is None:
            raise NotFound(f"lineage:{run_id} is not a recorded run")
        return html("run.html", page="pipelines", r=data)

    @router.get("/nodes/{node_id}", response_class=HTMLResponse)
    @page
    def node_page(request: Request, s, node_id: int, direction: str = "up", depth: int = 10) -> HTMLResponse:
        direction = direction if direction in ("up", "down") else "up"
        depth = min(max(depth, 1), queries.MAX_DEPTH)
        near = queries.node_with_neighbours(s, node_id, 100)
        return html("node.html", page="graph", n=near, g=pages.graph(s, node_id, direction, depth),
                    direction=direction, depth=depth)

    @router.get("/find", response_class=HTMLResponse)
    @page
    def find_page(request: Request, s, ref: str = "") -> Response:
        if not ref.strip():
            return RedirectResponse("/ui/pipelines", status_code=303)
        nid = queries.find(s, ref.strip())
        kind = queries.node(s, nid)["type"]
        return RedirectResponse(f"/ui/runs/{nid}" if kind == "run" else f"/ui/nodes/{nid}", status_code=303)

    @router.get("/deployments", response_class=HTMLResponse)
    @page
    def deployments_page(request: Request, s) -> HTMLResponse:
        return html("deployments.html", page="deployments", **pages.deployments(s))

    @router.get("/evaluations", response_class=HTMLResponse)
    @page
    def evaluations_page(request: Request, s) -> HTMLResponse:
        return html("evaluations.html", page="evaluations", e=pages.evaluations(s))

    app.include_router(router)
    app.mount("/ui/static", StaticFiles(directory=HERE / "static"), name="ui-static")


__all__ = ["mount_ui", "COOKIE"]
