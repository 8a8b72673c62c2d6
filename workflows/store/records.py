"""What the workflow store hands out: runs, steps, their states."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel

from pluginhost import PluginHostError

#: Step states. ``pending`` -> ``running`` -> ``succeeded`` | ``skipped`` | ``failed``;
#: steps after a failure become ``cancelled``.
STEP_STATES = ("pending", "running", "succeeded", "skipped", "failed", "cancelled")
#: Run states. ``pending`` -> ``running`` -> ``succeeded`` | ``failed`` | ``cancelled``;
#: a run stopped at a ``Sleep`` is ``sleeping``, at a ``WaitFor`` ``waiting``.
RUN_STATES = ("pending", "running", "sleeping", "waiting", "succeeded", "failed", "cancelled")
DONE = ("succeeded", "skipped")
#: A step of a run in another state (it failed or succeeded) is never claimed.
OPEN_RUN_STATES = ("pending", "running")
#: A run stopped at a wait: no step runs, no message is out (not stalled, not stale).
WAITING_RUN_STATES = ("sleeping", "waiting")
#: What ``cancel`` may stop.
CANCELLABLE_RUN_STATES = OPEN_RUN_STATES + WAITING_RUN_STATES
#: Wait states: ``waiting`` -> ``claimed`` (a worker sends the run on) -> ``done``; or ``cancelled``.
WAIT_STATES = ("waiting", "claimed", "done", "cancelled")
#: A run in one of these states has ended (``prune`` deletes them after a while).
FINISHED_RUN_STATES = ("succeeded", "failed", "cancelled")
#: How long a running step's claim holds while its owner looks alive (see ``WorkflowStore.begin_step``).
STEP_LEASE_S = 3600.0


class StepBusy(PluginHostError):
    """``begin_step``: the step is running under another owner that is alive and
    whose claim is not stale; this delivery must not run it."""


class StepRun(BaseModel):
    """One step of one run."""

    position: int
    stage: int
    slug: str
    status: str
    attempts: int
    error: str | None = None
    output: dict[str, Any] | None = None
    plugin_version: int | None = None
    worker: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    owner: str | None = None
    task_id: str | None = None

    @property
    def duration_s(self) -> float | None:
        if self.started_at and self.finished_at:
            return (self.finished_at - self.started_at).total_seconds()
        return None


class WaitRun(BaseModel):
    """A wait a run reached: a ``Sleep`` (``kind`` "sleep") or a ``WaitFor``
    (``kind`` "signal"). ``wake_at``: when it is due (a sleep's end, a signal's
    timeout; None: no timeout). ``outcome``: ``slept``, ``received`` or
    ``timed_out`` once known; ``woke_at``: when the run was sent on."""

    stage: int
    kind: str
    signal: str | None = None
    on_timeout: str | None = None
    status: str
    outcome: str | None = None
    wake_at: datetime | None = None
    created_at: datetime
    claimed_by: str | None = None
    woke_at: datetime | None = None


class SignalRun(BaseModel):
    """A signal delivered to a run (``Workflows.signal``): kept until the run's
    ``WaitFor`` takes it (``consumed_at``)."""

    name: str
    payload_keys: list[str]
    received_at: datetime
    actor: str | None = None
    consumed_at: datetime | None = None


class WorkflowRun(BaseModel):
    """A run of a workflow and its steps."""

    id: str
    name: str
    version: int
    status: str
    input: dict[str, Any]
    context: dict[str, Any]
    output: dict[str, Any] | None = None
    error: str | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    cancelled_by: str | None = None
    key: str | None = None  #: the value of the workflow's ``key`` input field
    steps: list[StepRun] = []
    waits: list[WaitRun] = []  #: ``Workflows.run`` fills these in (the run's timeline)
    signals: list[SignalRun] = []

    @property
    def duration_s(self) -> float | None:
        if self.started_at and self.finished_at:
            return (self.finished_at - self.started_at).total_seconds()
        return None
