"""What the console's JSON API takes and returns (also its OpenAPI schema)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from pluginhost import Kind, Plugin

# -- requests ------------------------------------------------------------------

#: A plugin's sort position: the store keeps it in 32 bits (``Plugin.sort``).
SORT_MIN, SORT_END = -(2**31), 2**31
Sort = Annotated[int, Field(ge=SORT_MIN, lt=SORT_END)]


class VersionBody(BaseModel):
    """Optional optimistic-concurrency guard: 409 if the plugin moved past this version."""

    expected_version: int | None = None


class ConfigureBody(VersionBody):
    """A plugin's new config; a secret value sent back as ``********`` keeps the stored one."""

    config: dict[str, Any]


class SortBody(VersionBody):
    sort: Sort


class MoveBody(BaseModel):
    direction: Literal["up", "down"]


class StartBody(BaseModel):
    """A run's input: validated against the workflow's input model, if it has one."""

    input: dict[str, Any]


class CancelBody(BaseModel):
    terminate: bool = Field(default=False, description="Also stop a step whose body is running (SIGTERM).")


class SignalBody(BaseModel):
    name: str
    payload: dict[str, Any] | None = None


# -- responses -----------------------------------------------------------------


class SessionInfo(BaseModel):
    user: str
    via: str
    csrf_token: str | None = Field(None, description="Send as X-CSRF-Token on POSTs (cookie sessions only).")


class AdminResult(BaseModel):
    """An admin change: the plugin after it, the workers that applied it, the store revision."""

    plugin: Plugin
    acknowledged_by: list[str]
    revision: int


class WorkerStatus(BaseModel):
    hostname: str
    revision: int | None
    current: bool = Field(description="Whether the worker has applied the store's current revision.")
    pool: str | None = None
    processes: int = 0
    error: str | None = None


class WorkersView(BaseModel):
    revision: int = Field(description="The store's current revision.")
    workers: list[WorkerStatus]


class NavItem(BaseModel):
    slug: str
    kind: Kind
    sort: int
    label: str


class NavView(BaseModel):
    lang: Literal["en", "ar"]
    dir: Literal["ltr", "rtl"]
    items: list[NavItem]


class AuditRow(BaseModel):
    """An audit entry with secret-looking config values masked."""

    id: int
    at: datetime
    actor: str | None
    slug: str
    action: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    changes: dict[str, tuple[Any, Any]]
    summary: str


class ConfigField(BaseModel):
    """One field of a plugin's config model; a secret's default is masked like its value."""

    name: str
    type: str
    required: bool
    default: Any = None
    secret: bool = False
    is_set: bool | None = Field(default=None, description="Secrets only: whether the stored config holds a value.")


class ConfigView(BaseModel):
    """A plugin's config model. ``model`` None: none is declared, any JSON object is
    stored; "unknown" with ``problem``: the stored config does not validate, so the
    model cannot be read through ``PluginHost.config_for``."""

    slug: str
    model: str | None
    fields: list[ConfigField]
    problem: str | None = Field(default=None, description="Why the stored config does not fit the model.")


class WorkflowUse(BaseModel):
    """The steps of one workflow that run capabilities of a plugin, by their ``on_disabled``."""

    name: str
    steps: dict[str, str]


class UsageView(BaseModel):
    """What uses a plugin: its declared capabilities and the workflows with steps on them."""

    slug: str
    enabled: bool
    capabilities: list[str]
    workflows: list[WorkflowUse]


class PlanRow(BaseModel):
    position: int
    stage: int
    slug: str
    plugin: str
    enabled: bool
    outcome: str = Field(description='"run", "skip", "fail" or "depends" (on what earlier steps return)')
    when: str | None = Field(default=None, description="The step's condition (CEL), if it has one.")
    reason: str | None = Field(default=None, description="Why the step would not run, or why that cannot be told.")
    on_disabled: str | None = Field(default=None, description='The step\'s policy: "skip" or "fail".')
    retries: int | None = None
    timeout: float | None = Field(default=None, description="Seconds per attempt (None: no limit).")


class WaitRow(BaseModel):
    """A ``Sleep`` or ``WaitFor`` stage of a run: ``pending`` until the run reaches it,
    then the store's row (``waiting`` -> ``claimed`` -> ``done``, or ``cancelled``)."""

    stage: int
    kind: Literal["sleep", "signal"]
    label: str = Field(description='"sleep 2m" or "wait for approved".')
    signal: str | None = None
    duration_s: float | None = Field(default=None, description="A sleep's length or a wait's timeout (None: none).")
    on_timeout: str | None = None
    status: str
    outcome: str | None = Field(default=None, description='"slept", "received" or "timed_out" once known.')
    wake_at: datetime | None = Field(default=None, description="When it is due: a sleep's end, a wait's timeout.")
    created_at: datetime | None = Field(default=None, description="When the run reached it.")
    claimed_by: str | None = None
    woke_at: datetime | None = Field(default=None, description="When the run was sent on.")


class SignalRow(BaseModel):
    """A signal delivered to a run (its payload's keys only: the values may be secret)."""

    name: str
    payload_keys: list[str]
    received_at: datetime
    actor: str | None = None
    consumed_at: datetime | None = None


class TimelineEntry(BaseModel):
    """One moment of a run's history."""

    at: datetime
    kind: Literal["created", "step", "sleep", "wait", "signal", "timed_out", "succeeded", "failed", "cancelled"]
    text: str


class WorkflowView(BaseModel):
    name: str
    version: int | None
    definition: dict[str, Any]
    plan: list[PlanRow]
    waits: list[WaitRow] = Field(default=[], description="The workflow's Sleep and WaitFor stages.")


class StepRow(BaseModel):
    position: int
    stage: int
    slug: str
    status: str
    attempts: int
    error: str | None = None
    note: str | None = Field(default=None, description="Why a skipped step was skipped (not an error).")
    output: dict[str, Any] | None = Field(default=None, description="What the step added to the context.")
    plugin_version: int | None = None
    worker: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    duration_s: float | None = None


class RunSummary(BaseModel):
    id: str
    name: str
    version: int
    status: str
    error: str | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    duration_s: float | None = None
    cancelled_by: str | None = None
    wait: WaitRow | None = Field(default=None, description="What a sleeping or waiting run is stopped at.")


class RunDetail(RunSummary):
    """A run with its steps, waits, signals and their timeline; input, context and
    output with secret-looking keys masked."""

    input: dict[str, Any]
    context: dict[str, Any] = Field(
        description="A succeeded run's final context; otherwise the input merged with the "
        "outputs of the steps that succeeded so far, in declaration order."
    )
    output: dict[str, Any] | None = None
    steps: list[StepRow]
    waits: list[WaitRow] = Field(default=[], description="Every wait stage of the run's version, in stage order.")
    signals: list[SignalRow] = []
    timeline: list[TimelineEntry] = Field(default=[], description="Steps, waits and signals in time order.")


class WaitingRow(BaseModel):
    """A run that sleeps or waits now (``GET /api/waiting``)."""

    run_id: str
    name: str | None = Field(description="The run's workflow.")
    wait: WaitRow


class ResumeResult(BaseModel):
    run_id: str
    status: Literal["resumed"] = "resumed"


class StartResult(BaseModel):
    run_id: str
    name: str
