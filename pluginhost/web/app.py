"""``create_app``: the console as a FastAPI (ASGI) app."""

from __future__ import annotations

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__
from ..host import PluginHost
from . import api, errors, metrics, pages
from .auth import WebAuth, require_identity
from .console import Console, FlowsLike
from .session import SignedSessionMiddleware
from .templating import HERE

SECURITY_HEADERS = [
    # no inline script or style anywhere: a label that smuggles markup past the
    # escaping still could not run
    (b"content-security-policy", b"default-src 'self'; img-src 'self' data:; script-src 'self'; "
     b"style-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"x-frame-options", b"DENY"),
]


def create_app(
    host: PluginHost,
    *,
    flows: FlowsLike | None = None,
    auth: WebAuth | None = None,
    ack_timeout_s: float = 1.0,
    workers_timeout_s: float = 0.5,
) -> FastAPI:
    """The web console for ``host`` (and ``flows``, a ``workflows.Workflows``), to
    serve with uvicorn or mount in an existing ASGI site (``site.mount("/console", app)``).

    ``auth`` defaults to ``WebAuth.from_app(host.app)``; without any credentials
    this raises ``NoCredentials`` unless ``auth=WebAuth.local()``. Admin changes
    wait ``ack_timeout_s`` for worker acknowledgements; the workers table waits
    ``workers_timeout_s`` for replies.
    """
    auth = (auth or WebAuth.from_app(host.app)).check()
    app = FastAPI(
        title="pluginhost console",
        version=__version__,
        description="Plugins, navigation, workflows and the audit log of a pluginhost app.",
        openapi_url=None,  # served below, behind authentication
        docs_url=None,
        redoc_url=None,
    )
    app.state.auth = auth
    app.state.console = Console(host, flows, ack_timeout_s=ack_timeout_s, workers_timeout_s=workers_timeout_s)

    @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(require_identity)])
    def openapi(request: Request) -> Response:
        return JSONResponse(request.app.openapi())

    app.include_router(pages.public)
    app.include_router(pages.router)
    app.include_router(api.router)
    if flows is not None:
        app.include_router(pages.flows_router)
        app.include_router(api.flows_router)
    app.include_router(metrics.router)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    errors.install(app)
    app.add_middleware(SignedSessionMiddleware, secret=auth.secret)
    app.add_middleware(SecurityHeaders)
    return app


class SecurityHeaders:
    """Adds ``SECURITY_HEADERS`` to every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        await self.app(scope, receive, send_with_headers if scope["type"] == "http" else send)
