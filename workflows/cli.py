"""``pluginhost workflows ...``: define, inspect, start and resume workflows.

Each command is a thin call into :class:`Workflows`; errors become one stderr
line through the ``pluginhost`` group.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from typing import Any, ClassVar, TextIO, TypeVar

import click
from celery.exceptions import TimeoutError as ResultTimeout
from celery.result import AsyncResult
from rich.table import Table
from rich.text import Text

from pluginhost import InvalidInput, PluginHost

from .definition import Parallel, Sleep, WaitFor, Workflow
from .errors import WorkflowNotFound
from .service import Workflows
from .store import RUN_STATES, StepRun, WorkflowRun

F = TypeVar("F", bound=Callable[..., Any])

# pluginhost.cli loads this module while it is itself being imported (entry point
# ``pluginhost.commands``), so its helpers are imported where they are used: a
# module-level import would fail whenever this module is imported first.


def migrate(host: PluginHost) -> None:
    """The ``pluginhost.migrations`` hook of ``pluginhost db upgrade``."""
    Workflows(host).store.migrate()


class Duration(click.ParamType):
    """``30d``, ``12h``, ``15m``, ``90s`` or plain seconds, as seconds."""

    name = "duration"
    _UNITS: ClassVar[dict[str, float]] = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "": 1.0}
    _PATTERN = re.compile(r"(\d+(?:\.\d+)?)\s*([dhms]?)")

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, (int, float)):
            return float(value)
        found = self._PATTERN.fullmatch(str(value).strip().lower())
        if found is None:
            self.fail(f"expected a duration like 30d, 12h, 15m, 90s or seconds, got {value!r}", param, ctx)
        return float(found.group(1)) * self._UNITS[found.group(2)]


def _wait_options(fn: F) -> F:
    wait = click.option("--wait", is_flag=True, help="Wait, then print the context and steps.")
    seconds = click.FloatRange(min=0)
    timeout = click.option("--timeout", default=30.0, show_default=True, type=seconds, help="Seconds.")
    return wait(timeout(fn))


def _older_than(what: str, **kwargs: Any) -> Callable[[F], F]:
    help = f"{what} (30d, 12h, 15m, 90s or seconds)."
    return click.option("--older-than", "older_than_s", type=Duration(), help=help, **kwargs)


def _flows(ctx: click.Context) -> Workflows:
    from pluginhost.cli import host_from_context

    return Workflows(host_from_context(ctx))


def _print(table: Table) -> None:
    from pluginhost.cli import console

    console().print(table)


def _fail(message: str) -> click.ClickException:
    from pluginhost.cli import CLIError

    return CLIError(message)


def _actor(actor: str | None) -> str:
    return actor or os.environ.get("USER") or "cli"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}s"


def _steps_line(wf: Workflow) -> str:
    """``a -> [b | c] -> d``."""

    def one(stage: Any) -> str:
        if isinstance(stage, Parallel):
            return "[" + " | ".join(s.slug for s in stage.steps) + "]"
        if isinstance(stage, Sleep):
            return f"sleep {stage.duration:g}s"
        if isinstance(stage, WaitFor):
            return f"wait for {stage.signal}"
        return str(stage.slug)

    return " -> ".join(one(stage) for stage in wf.steps)


def _table(columns: tuple[str, ...], rows: list[tuple[Any, ...]]) -> Table:
    """A table whose cells are plain text (``[a | b]`` or an error is not rich markup)."""
    table = Table()
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*(Text(str(cell)) for cell in row))
    return table


def _step_runs_table(steps: list[StepRun]) -> Table:
    rows = []
    for s in steps:
        ms = "-" if s.duration_s is None else f"{s.duration_s * 1000:.0f}"
        version = "-" if s.plugin_version is None else s.plugin_version
        rows.append((s.position, s.slug, s.status, s.attempts, ms, version, s.error or ""))
    columns = ("position", "slug", "status", "attempts", "duration (ms)", "plugin version", "error")
    return _table(columns, rows)


def _timeline_table(run: WorkflowRun) -> Table:
    """A run's waits and signals, in time order."""

    def at(when: Any) -> str:
        return "-" if when is None else f"{when:%Y-%m-%d %H:%M:%S}"

    rows: list[tuple[Any, ...]] = []
    for w in run.waits:
        what = "sleep" if w.kind == "sleep" else f"wait for {w.signal}"
        rows.append((at(w.created_at), f"stage {w.stage}: {what}", f"until {at(w.wake_at)}" if w.wake_at else ""))
        if w.woke_at is not None:
            rows.append((at(w.woke_at), f"stage {w.stage}: {w.outcome or w.status}", w.claimed_by or ""))
    for sig in run.signals:
        keys = ", ".join(sig.payload_keys) or "no payload"
        rows.append((at(sig.received_at), f"signal {sig.name} ({keys})", f"by {sig.actor or '-'}"))
    if run.cancelled_by is not None:
        rows.append((at(run.finished_at), "cancelled", f"by {run.cancelled_by}"))
    rows.sort(key=lambda r: str(r[0]))
    return _table(("at", "event", ""), rows)


def _wait(flows: Workflows, run_id: str, result: AsyncResult, timeout: float) -> None:
    """Wait for a run's result; print its context and steps, or fail with its error."""
    try:
        result.get(timeout=timeout, propagate=False)
    except ResultTimeout:
        hint = f"see: pluginhost workflows run {run_id}"
        raise _fail(f"run {run_id} did not finish within {timeout:g}s ({hint})") from None
    run = flows.run(run_id)
    if run is None:
        raise WorkflowNotFound(f"no workflow run {run_id!r}")
    if run.status == "succeeded":
        click.echo(json.dumps(run.output, ensure_ascii=False, default=str))
    _print(_step_runs_table(run.steps))
    if run.status != "succeeded":
        raise _fail(f"run {run_id} {run.status}: {run.error or repr(result.result)}")


@click.group()
def workflows() -> None:
    """Multi-step workflows of capabilities."""


@workflows.command()
@click.argument("file", type=click.File("r", encoding="utf-8"))
@click.option("--actor", default=None, help="Recorded with the definition (default: $USER).")
@click.pass_context
def define(ctx: click.Context, file: TextIO, actor: str | None) -> None:
    """Store a definition from a JSON file (- for stdin); prints its version."""
    wf = Workflow.parse(file.read())
    version = _flows(ctx).define(wf, actor=_actor(actor))
    click.echo(f"defined {wf.name} version {version}")


@workflows.command("list")
@click.pass_context
def list_(ctx: click.Context) -> None:
    """The newest version of every definition."""
    flows = _flows(ctx)
    _print(
        _table(
            ("name", "version", "steps"),
            [(wf.name, flows.version(wf.name), _steps_line(wf)) for wf in flows.list()],
        )
    )


@workflows.command()
@click.argument("name")
@click.option("--version", "version", type=click.IntRange(min=1), default=None, help="An older version.")
@click.option("--json", "as_json", is_flag=True, help="Print the definition as JSON.")
@click.pass_context
def show(ctx: click.Context, name: str, version: int | None, as_json: bool) -> None:
    """A definition, with what each step would do now."""
    flows = _flows(ctx)
    wf = flows.get(name, version)
    if wf is None:
        if version is None or flows.version(name) is None:
            raise flows.not_found(name)
        raise WorkflowNotFound(f"workflow {name!r} has no version {version}")
    if as_json:
        click.echo(json.dumps(wf.model_dump(mode="json"), ensure_ascii=False, indent=2))
        return
    click.echo(f"{wf.name} version {version or flows.version(name)}: {_steps_line(wf)}")
    # plan() describes the newest version; steps an older version alone has show "-"
    planned = {p.slug: p for p in flows.plan(name)}
    rows = []
    for position, step in enumerate(wf.flat()):
        p = planned.get(step.slug)
        plugin, enabled, now = (p.plugin, "yes" if p.enabled else "no", p.outcome) if p else ("-",) * 3
        timeout = "-" if step.timeout is None else f"{step.timeout:g}s"
        policy = (step.on_disabled, step.retries, timeout)
        rows.append((position, step.slug, plugin, enabled, *policy, now))
    columns = ("position", "step", "plugin", "enabled", "on_disabled", "retries", "timeout", "now")
    _print(_table(columns, rows))


@workflows.command()
@click.argument("name")
@click.pass_context
def history(ctx: click.Context, name: str) -> None:
    """Who defined which version when, newest first."""
    rows = [(d.version, d.defined_at.strftime("%Y-%m-%d %H:%M:%S"), d.actor or "-") for d in _flows(ctx).history(name)]
    _print(_table(("version", "defined at", "actor"), rows))


@workflows.command()
@click.argument("name")
@click.option("--input", "input_text", default="{}", show_default=True, help="The input as a JSON object.")
@_wait_options
@click.pass_context
def start(ctx: click.Context, name: str, input_text: str, wait: bool, timeout: float) -> None:
    """Start a run of the newest version; prints the run id."""
    try:
        payload = json.loads(input_text)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"--input is not valid JSON: {exc.msg} at position {exc.pos}") from None
    flows = _flows(ctx)
    result = flows.start(name, payload)
    click.echo(result.id)
    if wait:
        _wait(flows, result.id, result, timeout)


@workflows.command()
@click.option("--name", default=None, help="Only runs of this workflow.")
@click.option("--status", type=click.Choice(RUN_STATES), default=None, help="Only runs in this state.")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 10_000))
@click.pass_context
def runs(ctx: click.Context, name: str | None, status: str | None, limit: int) -> None:
    """Runs, newest first."""
    rows = []
    for r in _flows(ctx).runs(name=name, status=status, limit=limit):
        created = f"{r.created_at:%Y-%m-%d %H:%M:%S}"
        rows.append((r.id, r.name, r.version, r.status, created, _seconds(r.duration_s)))
    _print(_table(("id", "name", "version", "status", "created", "duration"), rows))


@workflows.command()
@click.argument("run_id")
@click.pass_context
def run(ctx: click.Context, run_id: str) -> None:
    """One run and its steps."""
    found = _flows(ctx).run(run_id)
    if found is None:
        raise WorkflowNotFound(f"no workflow run {run_id!r}")
    header = Table.grid(padding=(0, 2))
    for key, value in (
        ("run", found.id),
        ("workflow", f"{found.name} version {found.version}"),
        ("status", found.status),
        ("duration", _seconds(found.duration_s)),
        ("error", found.error or "-"),
    ):
        header.add_row(key, Text(value))
    _print(header)
    _print(_step_runs_table(found.steps))
    if found.waits or found.signals:
        _print(_timeline_table(found))


@workflows.command()
@click.argument("run_id")
@_wait_options
@click.pass_context
def resume(ctx: click.Context, run_id: str, wait: bool, timeout: float) -> None:
    """Continue a failed run from its failed step."""
    flows = _flows(ctx)
    result = flows.resume(run_id)
    click.echo(run_id)
    if wait:
        _wait(flows, run_id, result, timeout)


@workflows.command()
@click.argument("run_id")
@click.option("--terminate", is_flag=True, help="Also revoke a running step (its process gets SIGTERM).")
@click.option("--actor", default=None, help="Who cancels (default: $USER).")
@click.pass_context
def cancel(ctx: click.Context, run_id: str, terminate: bool, actor: str | None) -> None:
    """Cancel a pending or running run before its next step."""
    run = _flows(ctx).cancel(run_id, actor=_actor(actor), terminate=terminate)
    click.echo(f"{run.id} {run.status} by {run.cancelled_by} at {run.finished_at}")


@workflows.command()
@click.argument("target", nargs=-1, metavar="[RUN_ID] NAME")
@click.option("--payload", "payload_text", default="{}", show_default=True, help="The payload as a JSON object.")
@click.option("--workflow", default=None, help="With --key: the workflow whose run to signal.")
@click.option("--key", default=None, help="Signal the newest unfinished run with this key (needs --workflow).")
@click.option("--actor", default=None, help="Recorded with the signal (default: $USER).")
@click.pass_context
def signal(
    ctx: click.Context,
    target: tuple[str, ...],
    payload_text: str,
    workflow: str | None,
    key: str | None,
    actor: str | None,
) -> None:
    """Deliver signal NAME to a run: RUN_ID NAME, or NAME --workflow W --key K."""
    from .errors import InvalidSignal

    try:
        payload = json.loads(payload_text)
    except json.JSONDecodeError as exc:
        raise InvalidSignal(f"--payload is not valid JSON: {exc.msg} at position {exc.pos}") from None
    by_key = key is not None or workflow is not None
    if len(target) != (1 if by_key else 2) or (key is None) != (workflow is None):
        raise _fail("give RUN_ID NAME, or NAME with --workflow and --key")
    run_id, name = (None, target[0]) if by_key else target
    flows = _flows(ctx)
    if key is not None and workflow is not None:
        found = flows.signal_by_key(workflow, key, name, payload, actor=_actor(actor))
    else:
        assert run_id is not None
        found = flows.signal(run_id, name, payload, actor=_actor(actor))
    click.echo(f"{found.id} {found.status}")


@workflows.command()
@_older_than("Steps running longer than this", default=3600.0, show_default=True)
@click.pass_context
def sweep(ctx: click.Context, older_than_s: float) -> None:
    """Fail runs whose step has been running too long (worker died); prints their ids."""
    for run_id in _flows(ctx).sweep(older_than_s):
        click.echo(run_id)


@workflows.command()
@_older_than("Finished runs older than this", required=True)
@click.pass_context
def prune(ctx: click.Context, older_than_s: float) -> None:
    """Delete finished runs older than a duration; prints how many."""
    click.echo(f"deleted {_flows(ctx).prune(older_than_s)} run(s)")
