"""The HTML console: server-rendered pages, plain POST forms, no JavaScript needed.

Every form posts the session's CSRF token; a successful change redirects back
(post/redirect/get) with a one-shot message naming the workers that acknowledged
it; a rejected one re-renders the page with the error next to the field.
Disabling goes through a confirmation page that says what uses the plugin.

Every page asked for with ``Accept: application/json`` answers the JSON of its
``/api`` counterpart instead (``templating.page``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Literal
from urllib.parse import quote

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import RedirectResponse, Response

from pluginhost import PluginHostError

from . import diagram
from .api import ConsoleDep, RunStatus, User
from .auth import (
    auth_of,
    authenticate,
    check_csrf,
    check_request_origin,
    log_in,
    log_out,
    require_identity,
)
from .console import FINISHED_RUN_STATES, RUN_STATES, Console
from .errors import status_for
from .schemas import SORT_END, SORT_MIN, AdminResult
from .templating import page, render, root, wants_json

public = APIRouter(include_in_schema=False)
router = APIRouter(dependencies=[Depends(require_identity)], include_in_schema=False)
flows_router = APIRouter(dependencies=[Depends(require_identity)], include_in_schema=False)

Version = Annotated[int | None, Form()]


def redirect(request: Request, path: str) -> RedirectResponse:
    return RedirectResponse(f"{root(request)}{path}", status_code=303)


def safe_next(target: str) -> str:
    """Only a path of this console: never another site (``//host``, ``/\\host``, ``http:``)."""
    if target.startswith("/") and not target.startswith(("//", "/\\")) and "://" not in target:
        return target
    return "/plugins"


# -- login ---------------------------------------------------------------------


@public.get("/login", name="login_form")
def login_form(request: Request, next: str = "/plugins") -> Response:
    if authenticate(request) is not None:
        return redirect(request, safe_next(next))
    return render(
        request, "login.html", {"next": safe_next(next), "error": None, "has_users": bool(auth_of(request).users)}
    )


@public.post("/login", name="login")
async def login(
    request: Request,
    username: Annotated[str, Form()] = "",
    password: Annotated[str, Form()] = "",
    next: Annotated[str, Form()] = "/plugins",
) -> Response:
    check_request_origin(request)
    await check_csrf(request)
    if not auth_of(request).check_password(username, password):
        await asyncio.sleep(0.25)  # slows password guessing a little; real limits belong to the proxy
        context = {"next": safe_next(next), "error": "Wrong user name or password.", "has_users": True}
        return render(request, "login.html", context, status_code=401)
    log_in(request, username)
    return redirect(request, safe_next(next))


@router.post("/logout")
def logout(request: Request) -> Response:
    log_out(request)
    return redirect(request, "/login")


@router.get("/")
def home(request: Request) -> Response:
    return redirect(request, "/plugins")


# -- plugins -------------------------------------------------------------------


def plugins_page(
    request: Request,
    console: ConsoleDep,
    *,
    errors: dict[str, str] | None = None,
    drafts: dict[str, str] | None = None,
    status_code: int = 200,
) -> Response:
    plugins = console.plugins()
    if wants_json(request):  # before workers(): JSON has no use for its wait on worker replies
        return page(request, "plugins.html", {}, plugins)
    context = {
        "plugins": plugins,
        "configs": console.config_views(),
        "workers": console.workers(),
        "errors": errors or {},
        "drafts": drafts or {},
    }
    return render(request, "plugins.html", context, status_code=status_code)


@dataclass(frozen=True)
class PluginChange:
    """What every form that changes one plugin comes with: the request, the console,
    the plugin's slug and the user making the change."""

    request: Request
    console: Console
    slug: str
    user: str

    def apply(self, what: str, change: Callable[[], AdminResult], draft: str | None = None) -> Response:
        """Run an admin change; redirect with its acknowledgements, or re-render with its error
        (a client asking for JSON gets the API's error body)."""
        request, slug = self.request, self.slug
        try:
            result = change()
        except PluginHostError as exc:
            if wants_json(request):
                raise
            drafts = {slug: draft} if draft is not None else None
            errors = {slug: f"{type(exc).__name__}: {exc}"}
            return plugins_page(request, self.console, errors=errors, drafts=drafts, status_code=status_for(exc))
        request.session["flash"] = {
            "text": f"{what} '{slug}' (version {result.plugin.version}, store revision {result.revision})",
            "acks": result.acknowledged_by,
        }
        return redirect(request, f"/plugins#plugin-{slug}")


def plugin_change(request: Request, slug: str, console: ConsoleDep, user: User) -> PluginChange:
    return PluginChange(request, console, slug, user)


ChangeForm = Annotated[PluginChange, Depends(plugin_change)]


@router.get("/plugins")
def plugins(request: Request, console: ConsoleDep) -> Response:
    return plugins_page(request, console)


@router.get("/plugins/{slug}/disable")
def confirm_disable(request: Request, slug: str, console: ConsoleDep) -> Response:
    """The switch of an enabled plugin leads here: what uses it, then the real POST."""
    usage = console.usage(slug)
    context = {"usage": usage, "plugin": console.plugin(slug)}
    return page(request, "disable.html", context, usage)


@router.post("/plugins/{slug}/enabled")
def set_enabled(form: ChangeForm, enabled: Annotated[bool, Form()], version: Version = None) -> Response:
    change = lambda: form.console.set_enabled(form.slug, enabled, actor=form.user, expected_version=version)  # noqa: E731
    return form.apply("Enabled" if enabled else "Disabled", change)


@router.post("/plugins/{slug}/config")
def configure(form: ChangeForm, config: Annotated[str, Form()], version: Version = None) -> Response:
    change = lambda: form.console.configure_text(form.slug, config, actor=form.user, expected_version=version)  # noqa: E731
    return form.apply("Configured", change, draft=config)


@router.post("/plugins/{slug}/sort")
def set_sort(
    form: ChangeForm, sort: Annotated[int, Form(ge=SORT_MIN, lt=SORT_END)], version: Version = None
) -> Response:
    change = lambda: form.console.set_sort(form.slug, sort, actor=form.user, expected_version=version)  # noqa: E731
    return form.apply(f"Sort {sort} for", change)


@router.post("/plugins/{slug}/move")
def move(form: ChangeForm, direction: Annotated[Literal["up", "down"], Form()]) -> Response:
    change = lambda: form.console.move(form.slug, direction, actor=form.user)  # noqa: E731
    return form.apply(f"Moved {direction}", change)


# -- navigation and audit ------------------------------------------------------


@router.get("/nav")
def nav(request: Request, console: ConsoleDep) -> Response:
    menus = [console.nav("en"), console.nav("ar")]
    return page(request, "nav.html", {"menus": menus}, menus)


@router.get("/audit")
def audit(
    request: Request,
    console: ConsoleDep,
    slug: str = "",
    actor: str = "",
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> Response:
    entries = console.audit(slug, actor, limit)
    context = {
        "entries": entries,
        "slugs": [p.slug for p in console.plugins()],
        "filters": {"slug": slug, "actor": actor, "limit": limit},
    }
    return page(request, "audit.html", context, entries)


# -- workflows -----------------------------------------------------------------


@flows_router.get("/workflows")
def workflows(request: Request, console: ConsoleDep) -> Response:
    views = console.workflows()
    diagrams = {
        w.name: diagram.render(diagram.plan_boxes(w.plan, w.waits), title=f"workflow {w.name}", ident=w.name)
        for w in views
    }
    return page(request, "workflows.html", {"workflows": views, "diagrams": diagrams}, views)


def workflow_page(
    request: Request,
    name: str,
    console: Console,
    *,
    error: str | None = None,
    drafts: dict[str, str] | None = None,
    status_code: int = 200,
) -> Response:
    """A workflow: its plan and diagram, and the form that starts a run."""
    view = console.workflow(name)
    if wants_json(request):
        return page(request, "workflow.html", {}, view)
    context = {
        "w": view,
        "diagram": diagram.render(diagram.plan_boxes(view.plan, view.waits), title=f"workflow {name}", ident=name),
        "fields": console.start_fields(name),
        "error": error,
        "drafts": drafts,
    }
    return render(request, "workflow.html", context, status_code=status_code)


@flows_router.get("/workflows/{name}")
def workflow(request: Request, name: str, console: ConsoleDep) -> Response:
    return workflow_page(request, name, console)


async def form_fields(request: Request) -> dict[str, str]:
    """A submitted form's text fields (its fields depend on the workflow's input model)."""
    return {key: value for key, value in (await request.form()).items() if isinstance(value, str)}


@flows_router.post("/workflows/{name}/runs")
def start(
    request: Request, name: str, console: ConsoleDep, form: Annotated[dict[str, str], Depends(form_fields)]
) -> Response:
    """The start form: a run and its page, or the form again with the error and what was typed."""
    try:
        started = console.start_form(name, form)
    except PluginHostError as exc:
        if wants_json(request) or status_for(exc) == 404:
            raise
        error = f"{type(exc).__name__}: {exc}"
        return workflow_page(request, name, console, error=error, drafts=form, status_code=status_for(exc))
    request.session["flash"] = {"text": f"Started run {started.run_id} of {name}", "acks": None}
    return redirect(request, f"/runs/{quote(started.run_id, safe='')}")


@flows_router.get("/runs")
def runs(request: Request, console: ConsoleDep, status: RunStatus | Literal[""] = "", name: str = "") -> Response:
    found = console.runs(name, status, 100)
    context = {
        "runs": found,
        "states": RUN_STATES,
        "filters": {"status": status, "name": name},
        "names": console.workflow_names(),
    }
    return page(request, "runs.html", context, found)


@flows_router.get("/waiting")
def waiting(request: Request, console: ConsoleDep, limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> Response:
    """The runs that sleep or wait now: what for, and when they are due."""
    rows = console.waiting(limit)
    return page(request, "waiting.html", {"rows": rows}, rows)


@flows_router.get("/runs/{run_id}")
def run(request: Request, run_id: str, console: ConsoleDep) -> Response:
    detail = console.run(run_id)
    svg = diagram.render(diagram.run_boxes(detail.steps, detail.waits), title=f"run {run_id}", ident="run")
    context = {"run": detail, "diagram": svg, "finished": detail.status in FINISHED_RUN_STATES}
    return page(request, "run.html", context, detail)


@flows_router.get("/runs/{run_id}/cancel")
def confirm_cancel(request: Request, run_id: str, console: ConsoleDep) -> Response:
    """The run page's Cancel leads here: what is still to run, then the real POST."""
    detail = console.run(run_id)
    context = {"run": detail, "finished": detail.status in FINISHED_RUN_STATES}
    return page(request, "cancel.html", context, detail)


@flows_router.post("/runs/{run_id}/cancel")
def cancel(
    request: Request, run_id: str, console: ConsoleDep, user: User, terminate: Annotated[bool, Form()] = False
) -> Response:
    console.cancel(run_id, actor=user, terminate=terminate)
    text = f"Cancelled run {run_id}" + (" (a running step is terminated)" if terminate else "")
    request.session["flash"] = {"text": text, "acks": None}
    return redirect(request, f"/runs/{quote(run_id, safe='')}")


@flows_router.post("/runs/{run_id}/signal")
def signal(
    request: Request,
    run_id: str,
    console: ConsoleDep,
    user: User,
    name: Annotated[str, Form()],
    payload: Annotated[str, Form()] = "",
) -> Response:
    console.signal_text(run_id, name, payload, actor=user)
    request.session["flash"] = {"text": f"Sent signal '{name}' to run {run_id}", "acks": None}
    return redirect(request, f"/runs/{quote(run_id, safe='')}")


@flows_router.post("/runs/{run_id}/resume")
def resume(request: Request, run_id: str, console: ConsoleDep) -> Response:
    console.resume(run_id)
    request.session["flash"] = {"text": f"Resumed run {run_id} from its failed step", "acks": None}
    return redirect(request, f"/runs/{quote(run_id, safe='')}")
