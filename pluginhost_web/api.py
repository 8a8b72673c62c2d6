"""The JSON API under ``/api``: every page's data and action, scriptable.

Authenticate with ``Authorization: Bearer <token>`` (no CSRF token needed), or
with the login session cookie plus ``X-CSRF-Token`` (from ``GET /api/session``)
and the console's ``Origin`` on POSTs (a token request may omit ``Origin``; a
foreign one is refused either way). Errors are ``{"error": "ClassName", "detail": "..."}``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

from fastapi import APIRouter, Body, Depends, Query, Request
from fastapi.responses import Response

from pluginhost import Kind, Plugin

from . import diagram
from .auth import Identity, csrf_token, current_user, require_identity
from .console import RUN_STATES, Console
from .schemas import (
    AdminResult,
    AuditRow,
    CancelBody,
    ConfigureBody,
    ConfigView,
    MoveBody,
    NavView,
    PlanRow,
    ResumeResult,
    RunDetail,
    RunSummary,
    SessionInfo,
    SignalBody,
    SortBody,
    StartBody,
    StartResult,
    UsageView,
    VersionBody,
    WaitingRow,
    WorkersView,
    WorkflowView,
)

SVG = "image/svg+xml"
if TYPE_CHECKING:
    RunStatus = str
else:  # the workflows package's run states, listed in the OpenAPI schema
    RunStatus = Literal[RUN_STATES]


def console_of(request: Request) -> Console:
    console: Console = request.app.state.console
    return console


ConsoleDep = Annotated[Console, Depends(console_of)]
User = Annotated[str, Depends(current_user)]
Version = Annotated[VersionBody | None, Body()]
Cancel = Annotated[CancelBody | None, Body()]

router = APIRouter(prefix="/api", dependencies=[Depends(require_identity)], tags=["plugins"])
flows_router = APIRouter(prefix="/api", dependencies=[Depends(require_identity)], tags=["workflows"])


@router.get("/session")
def session(request: Request, identity: Annotated[Identity, Depends(require_identity)]) -> SessionInfo:
    """Who you are, and the CSRF token cookie sessions send on POSTs."""
    token = csrf_token(request) if identity.via != "token" else None
    return SessionInfo(user=identity.user, via=identity.via, csrf_token=token)


@router.get("/plugins")
def plugins(console: ConsoleDep) -> list[Plugin]:
    """Every plugin in navigation order (secret-looking config values masked)."""
    return console.plugins()


@router.get("/plugins/{slug}")
def plugin(slug: str, console: ConsoleDep) -> Plugin:
    return console.plugin(slug)


@router.get("/plugins/{slug}/config-model")
def config_model(slug: str, console: ConsoleDep) -> ConfigView:
    """The plugin's config model: each field's type, default and, for secrets, whether set."""
    return console.config_view(slug)


@router.get("/plugins/{slug}/usage")
def usage(slug: str, console: ConsoleDep) -> UsageView:
    """What disabling the plugin affects: its capabilities and the workflow steps on them."""
    return console.usage(slug)


@router.post("/plugins/{slug}/enable")
def enable(slug: str, console: ConsoleDep, user: User, body: Version = None) -> AdminResult:
    """Enable a plugin; lists the workers that applied the change."""
    return console.set_enabled(slug, True, actor=user, expected_version=body.expected_version if body else None)


@router.post("/plugins/{slug}/disable")
def disable(slug: str, console: ConsoleDep, user: User, body: Version = None) -> AdminResult:
    """Disable a plugin; lists the workers that applied the change."""
    return console.set_enabled(slug, False, actor=user, expected_version=body.expected_version if body else None)


@router.post("/plugins/{slug}/configure")
def configure(slug: str, body: ConfigureBody, console: ConsoleDep, user: User) -> AdminResult:
    """Replace a plugin's config (validated; nothing is written if it is invalid)."""
    return console.configure(slug, body.config, actor=user, expected_version=body.expected_version)


@router.post("/plugins/{slug}/sort")
def sort(slug: str, body: SortBody, console: ConsoleDep, user: User) -> AdminResult:
    return console.set_sort(slug, body.sort, actor=user, expected_version=body.expected_version)


@router.post("/plugins/{slug}/move")
def move(slug: str, body: MoveBody, console: ConsoleDep, user: User) -> AdminResult:
    """Swap a plugin with its neighbour in navigation order."""
    return console.move(slug, body.direction, actor=user)


@router.get("/nav")
def nav(console: ConsoleDep, lang: Literal["en", "ar"] = "en", kind: Kind | None = None) -> NavView:
    """Enabled plugins as a menu in English or Arabic (right to left)."""
    return console.nav(lang, kind.value if kind else None)


@router.get("/workers")
def workers(console: ConsoleDep) -> WorkersView:
    """Live workers and the store revision each has applied."""
    return console.workers()


@router.get("/audit")
def audit(
    console: ConsoleDep,
    slug: str | None = None,
    actor: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[AuditRow]:
    """Admin changes, newest first, with before/after changes (secrets masked)."""
    return console.audit(slug, actor, limit)


@flows_router.get("/workflows")
def workflows(console: ConsoleDep) -> list[WorkflowView]:
    """Every workflow definition with its dry-run plan."""
    return console.workflows()


@flows_router.get("/workflows/{name}")
def workflow(name: str, console: ConsoleDep) -> WorkflowView:
    return console.workflow(name)


@flows_router.get("/workflows/{name}/plan")
def plan(name: str, console: ConsoleDep) -> list[PlanRow]:
    """What each step would do if the workflow started now."""
    return console.plan(name)


@flows_router.get("/workflows/{name}/diagram.svg", response_class=Response, responses={200: {"content": {SVG: {}}}})
def workflow_diagram(name: str, console: ConsoleDep) -> Response:
    view = console.workflow(name)
    svg = diagram.render(diagram.plan_boxes(view.plan, view.waits), title=f"workflow {name}", ident=name)
    return Response(str(svg), media_type=SVG)


@flows_router.get("/runs")
def runs(
    console: ConsoleDep,
    status: RunStatus | None = None,
    name: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
) -> list[RunSummary]:
    """Workflow runs, newest first; a sleeping or waiting one with its ``wait``
    (wake-up time, or the awaited signal and its timeout)."""
    return console.runs(name, status, limit)


@flows_router.get("/waiting")
def waiting(console: ConsoleDep, limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[WaitingRow]:
    """The runs that sleep or wait now, the soonest due first."""
    return console.waiting(limit)


@flows_router.get("/runs/{run_id}")
def run(run_id: str, console: ConsoleDep) -> RunDetail:
    """A run with its steps, waits, signals and their ``timeline`` (oldest first)."""
    return console.run(run_id)


@flows_router.get("/runs/{run_id}/diagram.svg", response_class=Response, responses={200: {"content": {SVG: {}}}})
def run_diagram(run_id: str, console: ConsoleDep) -> Response:
    detail = console.run(run_id)
    svg = diagram.render(diagram.run_boxes(detail.steps, detail.waits), title=f"run {run_id}", ident="run")
    return Response(str(svg), media_type=SVG)


@flows_router.post("/runs/{run_id}/resume")
def resume(run_id: str, console: ConsoleDep) -> ResumeResult:
    """Continue a failed run from its failed step."""
    return console.resume(run_id)


@flows_router.post("/workflows/{name}/runs")
def start(name: str, body: StartBody, console: ConsoleDep) -> StartResult:
    """Start a run; the input is checked against the workflow's input model first
    (422 and nothing started if it does not fit)."""
    return console.start(name, body.input)


@flows_router.post("/runs/{run_id}/cancel")
def cancel(run_id: str, console: ConsoleDep, user: User, body: Cancel = None) -> RunDetail:
    """Cancel a pending or running run before its next step (again: no change; finished: 409)."""
    return console.cancel(run_id, actor=user, terminate=body.terminate if body else False)


@flows_router.post("/runs/{run_id}/signal")
def signal(run_id: str, body: SignalBody, console: ConsoleDep, user: User) -> RunDetail:
    """Send a signal (with an optional JSON object) to a run waiting for it."""
    return console.signal(run_id, body.name, body.payload, actor=user)
