"""Jinja2 rendering (autoescaped) and the paths of a console that may be mounted
under a prefix."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.requests import Request
from starlette.responses import HTMLResponse

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
    return (path[len(prefix):] or "/") if prefix and path.startswith(prefix) else path


def is_api(request: Request) -> bool:
    path = local_path(request)
    return path.startswith(MACHINE_PATHS[0]) or path in MACHINE_PATHS[1:]


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
    return HTMLResponse(env.get_template(name).render(page), status_code=status_code)
