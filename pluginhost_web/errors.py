"""Errors to HTTP: ``{"error": "ClassName", "detail": message}`` for the API,
an error page (or the login page) for the HTML console."""

from __future__ import annotations

from http import HTTPStatus
from urllib.parse import urlencode, urlsplit

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from starlette.exceptions import HTTPException

from pluginhost import (
    CapabilityDisabled,
    CapabilityNotFound,
    ConcurrentUpdate,
    InvalidConfig,
    InvalidInput,
    InvalidPlugin,
    PluginHostError,
    PluginNotFound,
    StoreUnavailable,
)

from .auth import CsrfFailed, NotAuthenticated
from .origin import OriginRefused
from .templating import is_api, local_path, render, root


class RunNotFound(PluginHostError):
    """No workflow run with that id."""


class WorkflowsNotConfigured(PluginHostError):
    """The console was created without a Workflows service."""


class RunAlreadyFinished(PluginHostError):
    """A cancel of a run that succeeded or failed (a cancelled one cancels again,
    changing nothing): a conflict with the run's state, not bad input."""


#: The HTTP status of each error class. An error takes the status of the nearest
#: class of its MRO listed here, so a subclass answers like its parent and any other
#: ``PluginHostError`` (bad input nobody mapped yet) answers 400: never a 500.
STATUS: dict[type, int] = {
    PluginHostError: 400,
    PluginNotFound: 404,
    CapabilityNotFound: 404,
    RunNotFound: 404,
    WorkflowsNotConfigured: 404,
    RunAlreadyFinished: 409,
    InvalidPlugin: 422,
    InvalidConfig: 422,
    InvalidInput: 422,
    ConcurrentUpdate: 409,
    CapabilityDisabled: 409,
    StoreUnavailable: 503,
}
#: The same for the workflows package's errors, by qualified name: pluginhost does not
#: import workflows (it depends on pluginhost, not the reverse).
STATUS_BY_NAME: dict[str, int] = {
    "workflows.errors.WorkflowNotFound": 404,
    "workflows.errors.InvalidWorkflow": 422,
    "workflows.errors.InvalidRunState": 422,
    "workflows.errors.InvalidSignal": 422,
}


def status_for(exc: PluginHostError) -> int:
    """The HTTP status for ``exc``, from ``STATUS`` / ``STATUS_BY_NAME``."""
    for cls in type(exc).__mro__:
        status = STATUS.get(cls) or STATUS_BY_NAME.get(f"{cls.__module__}.{cls.__qualname__}")
        if status:
            return status
    return STATUS[PluginHostError]


#: The console's sections (first path segment) and how a Back link names them.
SECTIONS = {
    "plugins": "the plugins",
    "nav": "the navigation",
    "workflows": "the workflows",
    "runs": "the runs",
    "audit": "the audit log",
}


def error_response(request: Request, status: int, error: str, detail: str) -> Response:
    if is_api(request):
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return JSONResponse({"error": error, "detail": detail}, status_code=status, headers=headers)
    href, label = back_link(request)
    context = {"status": status, "error": error, "detail": detail, "back": href, "back_label": label}
    return render(request, "error.html", context, status_code=status)


def back_link(request: Request) -> tuple[str, str]:
    """Where an error page's Back link goes (a path below the mount point) and its text:
    the console page the browser came from (a same-origin ``Referer``) if it is another
    page, else the list page of the section asked for (an unknown run: ``/runs``)."""
    here = local_path(request)
    came_from = referer_path(request)
    if came_from is not None and came_from.partition("?")[0] != here:
        target = came_from
    else:
        section = here.strip("/").partition("/")[0]
        target = f"/{section}" if section in SECTIONS else "/plugins"
    path = target.partition("?")[0]
    section = path.strip("/")
    return target, f"Back to {SECTIONS[section]}" if section in SECTIONS else "Back"


def referer_path(request: Request) -> str | None:
    """The ``Referer`` as a path (and query) below this console's mount point, or None if
    it is missing or another site's."""
    referer = urlsplit(request.headers.get("referer", ""))
    if (referer.scheme, referer.netloc) != (request.url.scheme, request.url.netloc):
        return None
    prefix = root(request)
    if not referer.path.startswith(prefix + "/") or "//" in referer.path or "\\" in referer.path:
        return None
    path = referer.path[len(prefix) :]
    return f"{path}?{referer.query}" if referer.query else path


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

    @app.exception_handler(OriginRefused)
    async def origin_refused(request: Request, exc: OriginRefused) -> Response:
        return error_response(request, 403, "OriginRefused", str(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        return error_response(
            request, exc.status_code, HTTPStatus(exc.status_code).phrase.replace(" ", ""), str(exc.detail)
        )

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return error_response(request, 422, "InvalidInput", f"{where}: {first.get('msg', 'invalid')}")
