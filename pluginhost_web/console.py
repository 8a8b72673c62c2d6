"""What the console shows and does, shared by the HTML pages and the JSON API.

Every change goes through the same PluginHost admin calls as the CLI, with the
authenticated user as actor, waiting for worker acknowledgements. Config leaves
this module masked (``mask_secrets``), and a masked value sent back keeps the
stored secret.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, Protocol, get_args

from pydantic import BaseModel
from pydantic_core import to_jsonable_python

import workflows
from pluginhost import (
    MASK,
    SORT_MAX,
    InvalidArgument,
    InvalidConfig,
    InvalidInput,
    Plugin,
    PluginHost,
    PluginNotFound,
    check_json_object,
    is_secret_key,
    mask_secrets,
    secret_fields,
)
from workflows import Workflow

from . import inputform, timeline
from .errors import RunAlreadyFinished, RunNotFound, WorkflowsNotConfigured
from .inputform import InputField
from .schemas import (
    AdminResult,
    AuditRow,
    ConfigField,
    ConfigView,
    NavItem,
    NavView,
    PlanRow,
    ResumeResult,
    RunDetail,
    RunSummary,
    SignalRow,
    StartResult,
    StepRow,
    UsageView,
    WaitingRow,
    WorkerStatus,
    WorkersView,
    WorkflowUse,
    WorkflowView,
)

#: The run states of the workflows package (the console lists and filters by them).
RUN_STATES = workflows.RUN_STATES
#: The states a run ends in (the workflows package's; not among its public names).
FINISHED_RUN_STATES = ("succeeded", "failed", "cancelled")
#: The states of a run stopped at a ``Sleep`` or ``WaitFor``.
WAITING_RUN_STATES = ("sleeping", "waiting")


class WaitsLike(Protocol):
    """The part of ``workflows``' wait store the console reads."""

    def waiting(self, limit: int = 100) -> Sequence[tuple[str, Any]]: ...
    def timeline(self, run_id: str) -> tuple[Sequence[Any], Sequence[Any]]: ...


class FlowsLike(Protocol):
    """The part of ``workflows.Workflows`` the console uses (pluginhost does not
    import the workflows package: it depends on pluginhost, not the reverse)."""

    def list(self) -> Sequence[Any]: ...
    def get(self, name: str, version: int | None = None) -> Any: ...
    def version(self, name: str) -> int | None: ...
    def plan(self, name: str) -> Sequence[Any]: ...
    def runs(self, name: str | None = None, status: str | None = None, limit: int = 50) -> Sequence[Any]: ...
    def run(self, run_id: str) -> Any: ...
    def resume(self, run_id: str) -> Any: ...
    def start(self, name: str, input: dict[str, Any] | None = None) -> Any: ...
    def cancel(self, run_id: str, *, actor: str | None = None, terminate: bool = False) -> Any: ...
    def signal(
        self, run_id: str, name: str, payload: dict[str, Any] | None = None, *, actor: str | None = None
    ) -> Any: ...
    @property
    def waits(self) -> WaitsLike: ...


class Console:
    """The console's operations over a PluginHost and (optionally) its Workflows."""

    def __init__(
        self,
        host: PluginHost,
        flows: FlowsLike | None = None,
        *,
        ack_timeout_s: float = 1.0,
        workers_timeout_s: float = 0.5,
    ) -> None:
        self.host = host
        self.flows = flows
        self.ack_timeout_s = ack_timeout_s
        self.workers_timeout_s = workers_timeout_s

    @property
    def has_workflows(self) -> bool:
        return self.flows is not None

    # -- plugins ---------------------------------------------------------------

    def plugins(self) -> list[Plugin]:
        """Every plugin in (sort, slug) order, config masked."""
        return [masked(p) for p in self.host.list()]

    def plugin(self, slug: str) -> Plugin:
        return masked(self._stored(slug))

    def config_view(self, slug: str) -> ConfigView:
        """The plugin's config model as fields (type, default, secret and whether it is set)."""
        plugin = self._stored(slug)
        try:
            live = self.host.config_for(plugin)  # the model instance, or a dict if none is declared
        except InvalidConfig as exc:  # only a model can refuse: it exists, but cannot be read
            return ConfigView(slug=slug, model="unknown", fields=[], problem=str(exc))
        if not isinstance(live, BaseModel):
            return ConfigView(slug=slug, model=None, fields=[])
        model = type(live)
        fields = config_fields(model, plugin.config)
        return ConfigView(slug=slug, model=model.__name__, fields=fields)

    def config_views(self) -> dict[str, ConfigView]:
        return {p.slug: self.config_view(p.slug) for p in self.host.list()}

    def usage(self, slug: str) -> UsageView:
        """What disabling the plugin affects: its capabilities and the workflow steps on them."""
        plugin = self._stored(slug)
        capabilities = [c for c in self.host.capabilities() if self.host.plugin_of(c) == slug]
        uses = []
        for definition in self.flows.list() if self.flows is not None else []:
            steps = {s.slug: s.on_disabled for s in definition.flat() if s.slug in capabilities}
            if steps:
                uses.append(WorkflowUse(name=definition.name, steps=steps))
        return UsageView(slug=slug, enabled=plugin.enabled, capabilities=capabilities, workflows=uses)

    def nav(self, lang: Literal["en", "ar"] = "en", kind: str | None = None) -> NavView:
        """The navigation menu in one language (a missing label falls back to English, then the slug)."""
        items = [
            NavItem(
                slug=p.slug,
                kind=p.kind,
                sort=p.sort,
                label=(p.label_ar if lang == "ar" else "") or p.label_en or p.slug,
            )
            for p in self.host.nav(kind)
        ]
        return NavView(lang=lang, dir="rtl" if lang == "ar" else "ltr", items=items)

    def workers(self) -> WorkersView:
        """Live workers and whether each has applied the store's current revision."""
        revision = self.host.revision
        rows = []
        for name, info in sorted(self.host.workers(timeout=self.workers_timeout_s).items()):
            applied = info.get("revision")
            rows.append(
                WorkerStatus(
                    hostname=name,
                    revision=applied if isinstance(applied, int) else None,
                    current=applied == revision,
                    pool=info.get("pool"),
                    processes=len(info.get("processes") or []),
                    error=info.get("error"),
                )
            )
        return WorkersView(revision=revision, workers=rows)

    def audit(self, slug: str | None = None, actor: str | None = None, limit: int = 100) -> list[AuditRow]:
        """Admin changes, newest first, secrets masked."""
        rows = []
        for entry in self.host.audit(slug or None, actor=actor or None, limit=limit):
            shown = entry.masked()
            rows.append(AuditRow(**shown.model_dump(), changes=shown.changes(), summary=shown.summary()))
        return rows

    # -- admin -----------------------------------------------------------------

    def set_enabled(self, slug: str, enabled: bool, *, actor: str, expected_version: int | None = None) -> AdminResult:
        call = self.host.enable if enabled else self.host.disable
        return self._admin(slug, lambda **wait: call(slug, actor=actor, expected_version=expected_version, **wait))

    def configure(self, slug: str, config: Any, *, actor: str, expected_version: int | None = None) -> AdminResult:
        """Replace a plugin's config (validated by ``host.configure``); ``********`` keeps a stored secret."""
        if not isinstance(config, dict):
            raise InvalidConfig(f"plugin '{slug}': expected a JSON object, got {type(config).__name__}")
        stored = self._stored(slug)
        restored = unmask(config, stored.config)
        if restored != config and expected_version is None:
            expected_version = stored.version  # the secrets kept must be the ones read
        return self._admin(
            slug,
            lambda **wait: self.host.configure(slug, restored, actor=actor, expected_version=expected_version, **wait),
        )

    def configure_text(self, slug: str, text: str, *, actor: str, expected_version: int | None = None) -> AdminResult:
        """``configure`` with the JSON text of the page's editor."""
        try:
            config = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidConfig(
                f"plugin '{slug}': config is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
            ) from None
        return self.configure(slug, config, actor=actor, expected_version=expected_version)

    def set_sort(self, slug: str, sort: int, *, actor: str, expected_version: int | None = None) -> AdminResult:
        return self._admin(
            slug, lambda **wait: self.host.set_sort(slug, sort, actor=actor, expected_version=expected_version, **wait)
        )

    def move(self, slug: str, direction: Literal["up", "down"], *, actor: str) -> AdminResult:
        """Swap a plugin with its neighbour in (sort, slug) order: exactly one row, no
        change at either end. The new weights come from ``sorts_for``; each changed
        weight is an ordinary audited sort change, guarded by the version read here."""
        plugins = self.host.list()
        order = [p.slug for p in plugins]
        if slug not in order:
            raise PluginNotFound(f"plugin '{slug}' not found")
        index = order.index(slug)
        other = index - 1 if direction == "up" else index + 1
        if not 0 <= other < len(order):
            return AdminResult(plugin=masked(plugins[index]), acknowledged_by=[], revision=self.host.revision)
        order[index], order[other] = order[other], order[index]
        sorts = sorts_for(plugins, order, moving=slug)
        changes = [(p, sorts[p.slug]) for p in plugins if sorts[p.slug] != p.sort]
        for plugin, sort in changes[:-1]:
            self.host.set_sort(plugin.slug, sort, actor=actor, expected_version=plugin.version)
        last, sort = changes[-1]
        return self._admin(
            slug, lambda **wait: self.host.set_sort(last.slug, sort, actor=actor, expected_version=last.version, **wait)
        )

    # -- workflows -------------------------------------------------------------

    def workflows(self) -> list[WorkflowView]:
        """Every workflow definition (newest version) with its dry-run plan."""
        return [self._view(wf) for wf in self._flows().list()]

    def workflow_names(self) -> list[str]:
        return [wf.name for wf in self._flows().list()]

    def workflow(self, name: str) -> WorkflowView:
        plan = self.plan(name)  # raises the workflows package's WorkflowNotFound
        return self._view(self._flows().get(name), plan)

    def plan(self, name: str) -> list[PlanRow]:
        """The dry run, with each step's ``on_disabled``, retries and timeout (as the CLI shows)."""
        planned = self._flows().plan(name)
        definition = self._flows().get(name)
        policies = {s.slug: s for s in definition.flat()} if definition is not None else {}
        rows = []
        for step in planned:
            row = PlanRow.model_validate(step, from_attributes=True)
            policy = policies.get(row.slug)
            if policy is not None:
                row = row.model_copy(
                    update={
                        "on_disabled": policy.on_disabled,
                        "retries": policy.retries,
                        "timeout": policy.timeout,
                    }
                )
            rows.append(row)
        return rows

    def runs(self, name: str | None = None, status: str | None = None, limit: int = 50) -> list[RunSummary]:
        """Runs, newest first; a sleeping or waiting one with the wait it is stopped at."""
        flows = self._flows()
        runs = flows.runs(name=name or None, status=status or None, limit=limit)
        stopped = [run for run in runs if run.status in WAITING_RUN_STATES]
        # One read for the usual case; a run the list of waits cuts off reads its own.
        open_waits = dict(flows.waits.waiting(max(limit, len(stopped)))) if stopped else {}
        definitions: dict[tuple[str, int], Workflow | None] = {}
        found = []
        for run in runs:
            summary = RunSummary.model_validate(run, from_attributes=True)
            if run.status in WAITING_RUN_STATES:
                reached = [open_waits[run.id]] if run.id in open_waits else flows.waits.timeline(run.id)[0]
                at = (run.name, run.version)
                if at not in definitions:
                    definitions[at] = self._definition(*at)
                waits = timeline.wait_rows(definitions[at], reached)
                summary.wait = timeline.current_wait(waits)
            found.append(summary)
        return found

    def run(self, run_id: str) -> RunDetail:
        """A run with its steps, waits, signals and their timeline."""
        run = self._flows().run(run_id)
        if run is None:
            raise RunNotFound(f"no workflow run {run_id!r}")
        context = run.context if run.status == "succeeded" else context_so_far(run.input, run.steps)
        steps = [step_row(step) for step in run.steps]
        waits = timeline.wait_rows(self._definition(run.name, run.version), run.waits)
        signals = [SignalRow.model_validate(s, from_attributes=True) for s in run.signals]
        return RunDetail(
            **RunSummary.model_validate(run, from_attributes=True).model_dump(exclude={"wait"}),
            wait=timeline.current_wait(waits),
            input=mask_secrets(run.input),
            context=mask_secrets(context),
            output=mask_secrets(run.output),
            steps=steps,
            waits=waits,
            signals=signals,
            timeline=timeline.entries(run, steps, waits, signals),
        )

    def waiting(self, limit: int = 100) -> list[WaitingRow]:
        """The runs that sleep or wait now, the soonest due first (no due time: last)."""
        flows = self._flows()
        found = flows.waits.waiting(limit)
        runs = {r.id: r for state in WAITING_RUN_STATES for r in flows.runs(status=state, limit=max(limit, 1))}
        rows = []
        for run_id, wait in found:
            run = runs.get(run_id) or flows.run(run_id)  # one just sent on is running, off both lists
            definition = self._definition(run.name, run.version) if run is not None else None
            (row,) = [w for w in timeline.wait_rows(definition, [wait]) if w.stage == wait.stage]
            rows.append(WaitingRow(run_id=run_id, name=run.name if run is not None else None, wait=row))
        return rows

    def resume(self, run_id: str) -> ResumeResult:
        """Continue a failed run from its failed step."""
        self._flows().resume(run_id)
        return ResumeResult(run_id=run_id)

    def input_model(self, name: str) -> type[BaseModel] | None:
        """The input model of a capability that runs workflow ``name`` (a
        ``WorkflowCapability`` declared with ``input_model``), or None."""
        for slug in self.host.capabilities():
            declared = self.host.declared(slug)
            fn = declared.fn
            if isinstance(fn, workflows.WorkflowCapability) and fn.name == name and declared.input_model is not None:
                return declared.input_model
        return None

    def start_fields(self, name: str) -> list[InputField] | None:
        """The start form's fields, or None: no input model, the form is one JSON box."""
        model = self.input_model(name)
        return None if model is None else inputform.fields_of(model)

    def start(self, name: str, input: Any) -> StartResult:
        """Start a run of ``name``; ``input`` must be a JSON object the workflow's
        input model (if any) accepts: otherwise ``InvalidInput`` and nothing starts."""
        flows = self._flows()
        if flows.version(name) is None:
            raise workflows.WorkflowNotFound(f"no workflow named {name!r}")
        owner = f"workflow '{name}' input"
        check_json_object(input, owner=owner, error=InvalidInput)
        model = self.input_model(name)
        if model is not None:
            inputform.validate(model, input, owner=owner)
        return StartResult(run_id=flows.start(name, input).id, name=name)

    def start_form(self, name: str, form: Mapping[str, Any]) -> StartResult:
        """``start`` with a submitted start form (``start_fields``)."""
        owner = f"workflow '{name}' input"
        fields = self.start_fields(name)
        if fields is None:
            text = form.get(inputform.JSON_FIELD)
            return self.start(name, inputform.parse_object(text if isinstance(text, str) else "", owner=owner))
        return self.start(name, inputform.parse(fields, form, owner=owner))

    def cancel(self, run_id: str, *, actor: str, terminate: bool = False) -> RunDetail:
        """Cancel a pending or running run (again: no change); a finished one is ``RunAlreadyFinished``."""
        try:
            self._flows().cancel(run_id, actor=actor, terminate=terminate)
        except workflows.InvalidRunState as exc:
            raise RunAlreadyFinished(str(exc)) from None
        return self.run(run_id)

    def signal(
        self, run_id: str, name: str, payload: dict[str, Any] | None = None, *, actor: str | None = None
    ) -> RunDetail:
        """Deliver signal ``name`` to a waiting run (recorded with ``actor``)."""
        self._flows().signal(run_id, name, payload, actor=actor)
        return self.run(run_id)

    def signal_text(self, run_id: str, name: str, text: str, *, actor: str | None = None) -> RunDetail:
        """``signal`` with the JSON text of the page's payload box (empty: no payload)."""
        owner = f"signal '{name}' payload"
        body = inputform.parse_object(text, owner=owner) if text.strip() else None
        return self.signal(run_id, name, body, actor=actor)

    # -- internals -------------------------------------------------------------

    def _stored(self, slug: str) -> Plugin:
        plugin = self.host.get(slug)
        if plugin is None:
            raise PluginNotFound(f"plugin '{slug}' not found")
        return plugin

    def _admin(self, slug: str, call: Callable[..., Any]) -> AdminResult:
        acks = call(wait=True, timeout=self.ack_timeout_s)
        return AdminResult(plugin=self.plugin(slug), acknowledged_by=list(acks), revision=self.host.revision)

    def _view(self, definition: Any, plan: list[PlanRow] | None = None) -> WorkflowView:
        return WorkflowView(
            name=definition.name,
            version=self._flows().version(definition.name),
            definition=definition.model_dump(mode="json"),
            plan=self.plan(definition.name) if plan is None else plan,
            waits=timeline.wait_rows(definition if isinstance(definition, Workflow) else None, []),
        )

    def _definition(self, name: str, version: int) -> Workflow | None:
        found = self._flows().get(name, version)
        return found if isinstance(found, Workflow) else None

    def _flows(self) -> FlowsLike:
        if self.flows is None:
            raise WorkflowsNotConfigured("this console was created without a Workflows service (create_app(flows=...))")
        return self.flows


def sorts_for(plugins: Sequence[Plugin], order: Sequence[str], *, moving: str) -> dict[str, int]:
    """Sort weights that list ``plugins`` in ``order``, which is their (sort, slug) order
    with two neighbours swapped.

    If the two weights differ and exchanging them gives ``order``, exchange them (two
    changes). Otherwise (a tie, or a third plugin sharing a weight) renumber the new
    order: each plugin keeps its weight unless it must be raised to one more than the
    plugin before it. Raises ``InvalidArgument`` (nothing written) past the 32-bit limit.
    """
    current = {p.slug: p.sort for p in plugins}
    first = next(i for i, (a, b) in enumerate(zip(order, [p.slug for p in plugins])) if a != b)
    a, b = order[first], order[first + 1]
    swapped = {**current, a: current[b], b: current[a]}
    if sorted(swapped, key=lambda s: (swapped[s], s)) == list(order):
        return swapped
    renumbered: dict[str, int] = {}
    previous: int | None = None
    for slug in order:
        previous = current[slug] if previous is None or current[slug] > previous else previous + 1
        renumbered[slug] = previous
    if previous is not None and previous > SORT_MAX:
        raise InvalidArgument(f"no room to move '{moving}': the sort weights would pass {SORT_MAX}; lower them first")
    return renumbered


def config_fields(model: type[BaseModel], stored: dict[str, Any]) -> list[ConfigField]:
    """The top-level fields of a config model; secrets say whether ``stored`` sets them."""
    secrets = secret_fields(model)
    rows = []
    for name, field in model.model_fields.items():
        secret = name in secrets
        default = None if field.is_required() else field.get_default(call_default_factory=True)
        default = to_jsonable_python(default, fallback=str)
        if secret and default not in (None, ""):
            default = MASK
        rows.append(
            ConfigField(
                name=name,
                type=type_name(field.annotation),
                required=field.is_required(),
                default=default,
                secret=secret,
                is_set=stored.get(name) not in (None, "") if secret else None,
            )
        )
    return rows


def type_name(annotation: Any) -> str:
    """A short name for a field's type: ``int``, ``str | None``, ``list[str]``, ``SecretStr``."""
    if not get_args(annotation) and hasattr(annotation, "__name__"):
        return str(annotation.__name__)
    return re.sub(r"\b(?:[A-Za-z_]\w*\.)+", "", repr(annotation))  # no module paths


def step_row(step: Any) -> StepRow:
    """A step for the page: a skipped step's reason is a note, not an error."""
    row = StepRow.model_validate(step, from_attributes=True)
    update: dict[str, Any] = {"output": mask_secrets(row.output)}
    if row.status == "skipped":
        update.update(note=row.error, error=None)
    return row.model_copy(update=update)


def context_so_far(input: dict[str, Any], steps: Sequence[Any]) -> dict[str, Any]:
    """The input merged with the output of every succeeded step in declaration order: what
    a resume starts from (the workflows package keeps a run's context only when it succeeds)."""
    context = dict(input)
    for step in sorted(steps, key=lambda s: s.position):
        if step.status == "succeeded" and step.output:
            context.update(step.output)
    return context


def masked(plugin: Plugin) -> Plugin:
    """A copy of ``plugin`` with secret-looking config values masked."""
    return plugin.model_copy(update={"config": mask_secrets(plugin.config)})


def unmask(submitted: Any, stored: Any) -> Any:
    """``submitted`` with every ``********`` under a secret-looking key replaced by
    the stored value at the same place (a masked secret sent back is kept)."""
    if isinstance(submitted, dict):
        old = stored if isinstance(stored, dict) else {}
        return {
            key: old[key] if value == MASK and is_secret_key(key) and key in old else unmask(value, old.get(key))
            for key, value in submitted.items()
        }
    if isinstance(submitted, list):
        old_items = stored if isinstance(stored, list) else []
        return [unmask(v, old_items[i] if i < len(old_items) else None) for i, v in enumerate(submitted)]
    return submitted
