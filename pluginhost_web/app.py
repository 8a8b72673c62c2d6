"""``create_app``: the console as a FastAPI (ASGI) app."""

from __future__ import annotations

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pluginhost import PluginHost, __version__

from . import api, errors, metrics, pages
from .auth import WebAuth, require_identity
from .console import Console, FlowsLike
from .origin import LOOPBACK_NAMES, is_loopback_host
from .session import SignedSessionMiddleware
from .templating import HERE, is_api

SECURITY_HEADERS = [
    # no inline script or style anywhere: a label that smuggles markup past the
    # escaping still could not run
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' data:; script-src 'self'; "
        b"style-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    ),
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
    this raises ``NoCredentials`` unless ``auth=WebAuth.local()``, which answers only
    requests to a loopback Host name (anything else: 421). Admin changes
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
    if auth.insecure_local:
        app.add_middleware(LoopbackHostOnly)  # outside the session: a refusal sets no cookie
    app.add_middleware(SecurityHeaders)
    return app


class LoopbackHostOnly:
    """Local mode: 421 for any request whose Host header is not a loopback name.

    Local mode trusts the client address, and a DNS-rebinding page's requests come
    from 127.0.0.1 too; only their ``Host: attacker.example`` gives them away.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        connection = HTTPConnection(scope)
        host = connection.headers.get("host", "")
        if is_loopback_host(host):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        shown = host if len(host) <= 100 else host[:100] + "..."
        detail = (
            f"this console runs in local mode (--insecure-local) and answers only loopback "
            f"host names ({LOOPBACK_NAMES}, any port), not {shown!r}"
        )
        response: Response = (
            JSONResponse({"error": "HostNotAllowed", "detail": detail}, status_code=421)
            if is_api(Request(scope))
            else PlainTextResponse(f"421 Misdirected Request: {detail}\n", status_code=421)
        )
        await response(scope, receive, send)


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
