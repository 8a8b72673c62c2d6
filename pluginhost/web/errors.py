"""Errors to HTTP: ``{"error": "ClassName", "detail": message}`` for the API,
an error page (or the login page) for the HTML console."""

from __future__ import annotations

from http import HTTPStatus
from urllib.parse import urlencode

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from starlette.exceptions import HTTPException

from ..errors import (
    CapabilityDisabled,
    ConcurrentUpdate,
    PluginHostError,
    StoreUnavailable,
)
from .auth import CsrfFailed, NotAuthenticated
from .templating import is_api, local_path, render, root


class RunNotFound(PluginHostError):
    """No workflow run with that id."""


class WorkflowsNotConfigured(PluginHostError):
    """The console was created without a Workflows service."""


def status_for(exc: PluginHostError) -> int:
    """404 for ``*NotFound``, 422 for ``Invalid*``, 409 for conflicts, 503 when the store is down.

    Named by rule rather than by class so errors of extensions (the workflows
    package's ``WorkflowNotFound``, ``InvalidWorkflow``) map without this module
    importing them.
    """
    if isinstance(exc, StoreUnavailable):
        return 503
    if isinstance(exc, (ConcurrentUpdate, CapabilityDisabled)):
        return 409
    name = type(exc).__name__
    if name.endswith("NotFound") or isinstance(exc, WorkflowsNotConfigured):
        return 404
    if name.startswith("Invalid"):
        return 422
    return 400


def error_response(request: Request, status: int, error: str, detail: str) -> Response:
    if is_api(request):
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return JSONResponse({"error": error, "detail": detail}, status_code=status, headers=headers)
    return render(request, "error.html", {"status": status, "error": error, "detail": detail}, status_code=status)


def install(app: FastAPI) -> None:
    """Register the exception handlers on ``app``."""

    @app.exception_handler(PluginHostError)
    async def plugin_host_error(request: Request, exc: PluginHostError) -> Response:
        return error_response(request, status_for(exc), type(exc).__name__, str(exc))

    @app.exception_handler(NotAuthenticated)
    async def not_authenticated(request: Request, exc: NotAuthenticated) -> Response:
        if is_api(request):
            return error_response(request, 401, "NotAuthenticated", str(exc))
        target = local_path(request) + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"{root(request)}/login?{urlencode({'next': target})}", status_code=303)

    @app.exception_handler(CsrfFailed)
    async def csrf_failed(request: Request, exc: CsrfFailed) -> Response:
        return error_response(request, 403, "CsrfFailed", str(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        return error_response(request, exc.status_code, HTTPStatus(exc.status_code).phrase.replace(" ", ""), str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return error_response(request, 422, "InvalidInput", f"{where}: {first.get('msg', 'invalid')}")
