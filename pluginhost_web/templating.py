"""Jinja2 rendering (autoescaped) and the paths of a console that may be mounted
under a prefix."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastapi.encoders import jsonable_encoder
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response

from .auth import csrf_token

HERE = Path(__file__).parent
#: Paths (relative to the mount point) answered with JSON rather than HTML.
MACHINE_PATHS = ("/api/", "/metrics", "/openapi.json")

env = Environment(
    loader=FileSystemLoader(HERE / "templates"),
    autoescape=select_autoescape(default=True, default_for_string=True),
    trim_blocks=True,
    lstrip_blocks=True,
)
env.filters["tojson_pretty"] = lambda value: json.dumps(value, ensure_ascii=False, indent=2, sort_keys=True)
env.filters["tojson_short"] = lambda value: json.dumps(value, ensure_ascii=False, sort_keys=True)


def root(request: Request) -> str:
    """The path prefix the console is mounted at ("" at the site root)."""
    return str(request.scope.get("root_path", "")).rstrip("/")


def local_path(request: Request) -> str:
    """The request path below the mount point."""
    path, prefix = request.url.path, root(request)
    return (path[len(prefix) :] or "/") if prefix and path.startswith(prefix) else path


def is_api(request: Request) -> bool:
    """Whether to answer JSON: a machine path, or a page asked for with
    ``Accept: application/json``."""
    path = local_path(request)
    return path.startswith(MACHINE_PATHS[0]) or path in MACHINE_PATHS[1:] or wants_json(request)


def wants_json(request: Request) -> bool:
    """Whether the Accept header ranks application/json above text/html (a browser's
    ``text/html,...,*/*;q=0.8`` does not; neither does a bare ``*/*``)."""
    ranges: dict[str, float] = {}
    for part in request.headers.get("accept", "").split(","):
        media, _, params = part.strip().partition(";")
        quality = 1.0
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        ranges[media.strip().lower()] = max(quality, ranges.get(media.strip().lower(), 0.0))

    def rank(kind: str, sub: str) -> float:
        for media in (f"{kind}/{sub}", f"{kind}/*", "*/*"):
            if media in ranges:
                return ranges[media]
        return 0.0

    return rank("application", "json") > rank("text", "html")


def render(request: Request, name: str, context: dict[str, Any], *, status_code: int = 200) -> HTMLResponse:
    """Render a template with what every page needs: root, user, CSRF token, flash."""
    identity = getattr(request.state, "identity", None)
    page = {
        "root": root(request),
        "path": local_path(request),
        "user": identity.user if identity else None,
        "via": identity.via if identity else None,
        "csrf_token": csrf_token(request),
        "flash": request.session.pop("flash", None),
        "has_workflows": request.app.state.console.has_workflows,
        **context,
    }
    html = env.get_template(name).render(page)
    return HTMLResponse(html, status_code=status_code, headers={"Vary": "Accept"})


def page(request: Request, name: str, context: dict[str, Any], data: Any) -> Response:
    """A page: ``data`` as JSON (the body of the page's /api counterpart) when the client
    asks for JSON, else the template rendered with ``context``."""
    if wants_json(request):
        return JSONResponse(jsonable_encoder(data), headers={"Vary": "Accept"})
    return render(request, name, context)
