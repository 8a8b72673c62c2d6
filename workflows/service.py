"""Workflows: define, start, inspect and resume multi-step workflows."""

from __future__ import annotations

import builtins
import re
import uuid
from datetime import datetime
from typing import Any

from celery.result import AsyncResult
from pydantic import BaseModel

from pluginhost import InvalidInput, PluginHost, check_json_object, did_you_mean

from . import conditions
from .compile import build, layout
from .definition import NAME_PATTERN, WaitFor, Workflow
from .errors import ConditionFailed, InvalidRunState, InvalidSignal, InvalidWorkflow, RunNotFound, WorkflowNotFound
from .runtime import Runtime
from .store import RUN_STATES, WorkflowRun, WorkflowStore
from .store.waits import WaitStore
from .waiting import Waiting, owner


class PlannedStep(BaseModel):
    """What a step would do if it ran now (``Workflows.plan``)."""

    position: int
    stage: int
    slug: str
    plugin: str
    enabled: bool
    outcome: str  # "run", "skip", "fail", or "depends" (a condition on what earlier steps return)
    when: str | None = None  #: the step's condition, if it has one
    reason: str | None = None  #: why it would not run, or why that cannot be told yet


class NeedsCapabilityTask(Exception):  # noqa: N818 - a decision, not an error
    """``prepare(gate=...)`` for a workflow whose first stage is a wait: no step of
    it can take over the capability task's worker-side check, so the capability
    task must run first (``WorkflowCapability.dispatch`` sends it instead)."""


class DefinitionVersion(BaseModel):
    """One stored version of a definition (``Workflows.history``)."""

    name: str
    version: int
    defined_at: datetime
    actor: str | None


class Workflows:
    """The workflow service of a PluginHost; create it in the app module so
    workers register the workflow tasks."""

    def __init__(self, host: PluginHost) -> None:
        self.host = host
        self.runtime = Runtime.for_host(host)
        self.waiting = Waiting.for_runtime(self.runtime)
        self._migrated_for: Any = None
        self._parsed: dict[tuple[str, int, Any], Workflow] = {}
        self._newest: dict[str, tuple[int, Any, Workflow]] = {}  # name -> the last version a start used

    @property
    def store(self) -> WorkflowStore:
        """The workflow tables (in the host store's database)."""
        return self.runtime.store

    @property
    def waits(self) -> WaitStore:
        """The waits and signals (in the same database)."""
        return self.runtime.waits

    # -- definitions -----------------------------------------------------------

    def define(self, workflow: Workflow | dict[str, Any] | str, *, actor: str | None = None) -> int:
        """Validate and store a definition; returns its version (a new one if it changed)."""
        wf = self._checked(Workflow.parse(workflow))
        self._ready()
        return self.store.define(wf.name, wf.model_dump(mode="json"), actor)

    def declare(self, workflow: Workflow | dict[str, Any] | str, *, actor: str | None = "declare") -> Workflow:
        """Record a definition to be stored on first use (the first call that reads
        or writes workflows in this process), like a capability declaration: for the
        app module, which must import without a database. Validated now (its shape;
        its steps' capabilities when it is stored, so they may be declared later)."""
        wf = Workflow.parse(workflow)
        self.runtime.declared[wf.name] = (wf, actor)
        if self._migrated_for is not None:  # already in use: store it now
            self._store_declared()
        return wf

    def _checked(self, wf: Workflow) -> Workflow:
        known = set(self.host.capabilities())
        for step in wf.flat():
            if step.slug not in known:
                raise InvalidWorkflow(
                    f"workflow '{wf.name}': step '{step.slug}' is not a declared capability"
                    f" (declared: {', '.join(sorted(known)) or 'none'})"
                )
        return wf

    def _store_declared(self) -> None:
        for name, (wf, actor) in list(self.runtime.declared.items()):
            self.store.define(name, self._checked(wf).model_dump(mode="json"), actor)
            self.runtime.declared.pop(name, None)

    def get(self, name: str, version: int | None = None) -> Workflow | None:
        """The newest (or a given) version of a definition, or None."""
        self._ready()
        found = self.store.definition(name, version)
        return Workflow.model_validate(found[1]) if found else None

    def version(self, name: str) -> int | None:
        """The newest version number of a definition, or None."""
        self._ready()
        newest = self.store.newest(name)
        return newest[0] if newest else None

    def list(self) -> list[Workflow]:
        """The newest version of every definition, by name."""
        self._ready()
        return [Workflow.model_validate(d) for _, d in self.store.latest_definitions()]

    def plan(self, name: str, input: dict[str, Any] | None = None) -> builtins.list[PlannedStep]:
        """A dry run: what each step would do under the current toggles, and with
        ``input``, under its conditions: a condition false for the input is a
        skip; one that needs what an earlier step returns is ``depends``."""
        wf = self._definition(name)[2]
        if input is not None:
            check_json_object(input, owner=f"workflow '{name}' input", error=InvalidInput)
        planned = []
        flat = wf.flat()
        for position, stage, slug in layout(wf):
            step = flat[position]
            plugin = self.host.plugin_of(slug) if slug in self.host.capabilities() else slug
            enabled = self.host.is_enabled(plugin)
            outcome: str = "run" if enabled else step.on_disabled
            reason = None if enabled else f"plugin '{plugin}' is disabled"
            if step.when is not None and input is not None:
                try:
                    if not conditions.holds(step.when, input):
                        outcome, reason = "skip", conditions.CONDITION_FALSE
                except ConditionFailed as exc:
                    outcome, reason = "depends", f"{exc} (on the input alone)"
            planned.append(
                PlannedStep(
                    position=position,
                    stage=stage,
                    slug=slug,
                    plugin=plugin,
                    enabled=enabled,
                    outcome=outcome,
                    when=step.when,
                    reason=reason,
                )
            )
        return planned

    # -- runs ------------------------------------------------------------------

    def start(self, name: str, input: dict[str, Any] | None = None, **apply_async_options: Any) -> AsyncResult:
        """Start a run of the newest version; the AsyncResult's id is the run id and
        it resolves to the final context."""
        run_id, canvas = self.prepare(name, input, run_id=apply_async_options.pop("task_id", None))
        return self.send(canvas, run_id, **apply_async_options)

    def send(self, canvas: Any, run_id: str, **apply_async_options: Any) -> AsyncResult:
        """Send a run's canvas with the run id as its result id. A canvas that
        ends at a wait sends a task that keeps no result (the run's result comes
        later, from the stages after the wait): the handle returned still waits
        for the run's result."""
        result = canvas.apply_async(task_id=run_id, **apply_async_options)
        if getattr(result, "ignored", False):
            return self.host.app.AsyncResult(run_id)
        return result  # type: ignore[no-any-return]

    def prepare(
        self,
        name: str,
        input: dict[str, Any] | None,
        *,
        run_id: str | None = None,
        gate: tuple[str, str] | None = None,
    ) -> tuple[str, Any]:
        """Record a new run (idempotent for a given ``run_id``) and build its canvas.

        A ``run_id`` that exists already (a repeated start: a redelivered
        ``WorkflowCapability`` task, ``start(task_id=...)``) gets the canvas of the
        version and input that run recorded, whatever was defined since and
        whatever ``input`` is now; its finished steps then send nothing again.
        ``gate``: (capability, plugin) whose enablement the first stage's steps
        check before they run (``WorkflowCapability.dispatch``)."""
        payload = check_json_object(
            {} if input is None else input, owner=f"workflow '{name}' input", error=InvalidInput
        )
        run_id = run_id or str(uuid.uuid4())
        self._ready()
        known = self._newest.get(name) if isinstance(name, str) else None
        while True:
            if known is None:
                known = self._definition(name)
            version, stored_at, wf = known
            if gate is not None and 0 in wf.waits():
                # a first stage with no step to take over the capability's check
                raise NeedsCapabilityTask(f"workflow '{wf.name}' starts with a wait")
            key = _key_of(wf, payload)
            # One statement: the run is inserted only if this is still the newest version.
            newest, inserted = self.store.create_newest_run(
                run_id, wf.name, version, stored_at, payload, layout(wf), key
            )
            if newest == (version, stored_at):
                if inserted:
                    return run_id, build(self.runtime, wf, run_id, payload, gate=gate)
                return run_id, self._recorded_canvas(name, run_id, gate)
            if newest is None:
                self._newest.pop(name, None)
                raise self.not_found(name)
            known = None  # defined again since: read the newest version

    def run(self, run_id: str) -> WorkflowRun | None:
        """A run with its steps, waits and signals (its timeline), or None."""
        self._ready()
        found = self.store.get_run(run_id)
        if found is None:
            return None
        waits, signals = self.waits.timeline(run_id)
        return found.model_copy(update={"waits": waits, "signals": signals})

    # -- signals ---------------------------------------------------------------

    def signal(
        self, run_id: str, name: str, payload: dict[str, Any] | None = None, *, actor: str | None = None
    ) -> WorkflowRun:
        """Deliver signal ``name`` to a run's ``WaitFor(name)``: its payload merges
        into the context and ``signals.<name>`` becomes ``"received"``. A run
        that waits for it goes on at once; one that has not reached the wait
        keeps the signal and takes it when it gets there. One signal per name
        and run. ``RunNotFound`` for an unknown run; ``InvalidSignal`` (nothing
        stored) for a run that ended or passed that wait, a name its workflow
        does not wait for, a second signal, or a payload that is not a JSON
        object."""
        if not isinstance(run_id, str) or not run_id:
            raise InvalidSignal(f"a run id is a non-empty string, got {run_id!r}")
        if not isinstance(name, str) or not re.fullmatch(NAME_PATTERN, name):
            raise InvalidSignal(f"signal name {name!r} is invalid: expected 1-64 characters of a-z, 0-9, '_', '.', '-'")
        body = check_json_object(
            {} if payload is None else payload, owner=f"signal {name!r} payload", error=InvalidSignal
        )
        self._ready()

        def stage_of(workflow: str, version: int) -> int:
            wf = self.runtime.definition(workflow, version)
            found = wf.wait_for(name)
            if found is None:
                awaited = [w.signal for w in wf.waits().values() if isinstance(w, WaitFor)]
                raise InvalidSignal(
                    f"workflow '{workflow}' version {version} waits for no signal {name!r}"
                    f" (it waits for: {', '.join(awaited) or 'none'})"
                )
            return found[0]

        claimer = owner(None)
        wake = self.waits.deliver(run_id, stage_of, name, body, actor, claimer)
        if wake is not None:  # the run waited for it: sent on now, not at a worker's next poll
            self.waiting.send_claimed([wake], claimer)
        result = self.run(run_id)
        assert result is not None
        return result

    def signal_by_key(
        self,
        workflow: str,
        key: str,
        name: str,
        payload: dict[str, Any] | None = None,
        *,
        actor: str | None = None,
    ) -> WorkflowRun:
        """``signal`` the run of ``workflow`` whose key (the input field the
        workflow declares as ``key``, e.g. ``email``) is ``key``. When several
        unfinished runs have that key, the newest one gets it (a later start
        for the same key supersedes the earlier ones). ``RunNotFound`` when no
        unfinished run has it."""
        if not isinstance(key, str) or not key:
            raise InvalidSignal(f"a key is a non-empty string, got {key!r}")
        wf = self._definition(workflow)[2]
        if wf.key is None:
            raise InvalidSignal(f"workflow '{workflow}' declares no key: signal its runs by id")
        found = self.waits.runs_with_key(workflow, key)
        if not found:
            raise RunNotFound(f"no unfinished run of workflow '{workflow}' has {wf.key} = {key!r}")
        return self.signal(found[0], name, payload, actor=actor)

    def runs(self, name: str | None = None, status: str | None = None, limit: int = 50) -> builtins.list[WorkflowRun]:
        """Runs, newest first (without their steps)."""
        if status is not None and status not in RUN_STATES:
            raise InvalidInput(f"unknown run status {status!r}: expected one of {', '.join(RUN_STATES)}")
        if not 1 <= limit <= 10_000:
            raise InvalidInput(f"limit must be between 1 and 10000, got {limit}")
        self._ready()
        return self.store.list_runs(name, status, limit)

    def resume(self, run_id: str) -> AsyncResult:
        """Continue a failed run from its failed stage, with the context saved before it.

        ``InvalidRunState`` unless the run is failed; of two concurrent resumes
        (a double click) one continues the run and the other gets ``InvalidRunState``."""
        run = self.run(run_id)
        if run is None:
            raise WorkflowNotFound(f"no workflow run {run_id!r}")
        if run.status != "failed":
            raise InvalidRunState(f"run {run_id} is {run.status}; only failed runs can be resumed")
        found = self.store.definition(run.name, run.version)
        if found is None:
            raise WorkflowNotFound(f"workflow '{run.name}' version {run.version} is gone")
        wf = Workflow.model_validate(found[1])
        # Conditional: of two concurrent resumes, one gets the run (InvalidRunState for the other).
        from_stage, context, done = self.store.reset_for_resume(run_id)
        context = self._after_waits(run_id, from_stage, context)
        canvas = build(self.runtime, wf, run_id, context, from_stage=from_stage, done=done)
        return self.send(canvas, run_id) if wf.waits() else canvas.apply_async()

    def _after_waits(self, run_id: str, from_stage: int, context: dict[str, Any]) -> dict[str, Any]:
        """A resumed run's context with what the waits it passed gave it: the
        payloads of the signals it took and ``signals.<name>``. (The steps'
        outputs win over a payload's fields of the same name.)"""
        waits, _ = self.waits.timeline(run_id)
        passed = [w for w in waits if w.stage < from_stage and w.kind == "signal" and w.outcome and w.signal]
        if not passed:
            return context
        payloads: dict[str, Any] = {}
        marks: dict[str, Any] = {}
        for wait in passed:
            assert wait.signal is not None
            marks[wait.signal] = wait.outcome
            if wait.outcome == "received":
                payloads.update(self.waits.payload(run_id, wait.signal))
        return {**payloads, **context, "signals": marks}

    def cancel(self, run_id: str, *, actor: str | None = None, terminate: bool = False) -> WorkflowRun:
        """Stop a pending or running run before its next step: the run becomes
        ``cancelled`` (``cancelled_by``, ``finished_at``), its pending steps
        ``cancelled``; a step whose body is running finishes (its outcome is
        recorded), unless ``terminate`` revokes it (``revoke(terminate=True)``:
        its process gets SIGTERM) and records it ``cancelled``. The run's result
        becomes REVOKED, so ``AsyncResult.get()`` raises ``TaskRevokedError``. Idempotent; a finished run is
        ``InvalidRunState``, an unknown one ``WorkflowNotFound``."""
        if not isinstance(run_id, str) or not run_id:
            raise InvalidInput(f"a run id is a non-empty string, got {run_id!r}")
        self._ready()
        running = self.store.cancel_run(run_id, actor, running=terminate)
        app = self.host.app
        if terminate and running:
            app.control.revoke(running, terminate=True)
        try:
            app.backend.mark_as_revoked(run_id, reason="workflow run cancelled")
        except Exception:  # noqa: BLE001 - no result backend (or it is down): the run row says it
            pass
        run = self.run(run_id)
        assert run is not None
        return run

    def sweep(self, older_than_s: float = 3600.0) -> builtins.list[str]:
        """Fail runs whose step has been ``running`` longer than ``older_than_s``
        (its worker died and the message is gone), or that made no progress for
        that long (a lost message); returns their ids, now resumable. Only pending
        and running runs are looked at: a finished run is never changed, and a run
        that failed already keeps its first error."""
        self._ready()
        swept = []
        for run_id, position, slug in self.store.stale_steps(older_than_s):
            self.store.fail_run(
                run_id, position, f"step '{slug}' lost: running for over {older_than_s:.0f}s (worker died?)"
            )
            swept.append(run_id)
        for run_id, position, slug in self.store.stalled_steps(older_than_s):
            self.store.fail_run(
                run_id,
                position,
                f"step '{slug}' lost: not started, no progress for {older_than_s:.0f}s (message lost?)",
            )
            swept.append(run_id)
        return sorted(set(swept))

    def prune(self, older_than_s: float) -> int:
        """Delete finished runs older than ``older_than_s``; returns how many."""
        self._ready()
        return self.store.prune(older_than_s)

    # -- internals -------------------------------------------------------------

    def _recorded_canvas(self, name: str, run_id: str, gate: tuple[str, str] | None = None) -> Any:
        """The canvas of an existing run: its recorded version and input."""
        run = self.store.get_run(run_id)
        if run is None:
            raise WorkflowNotFound(f"no workflow run {run_id!r}")
        if run.name != name:
            raise InvalidRunState(f"run {run_id} is a run of workflow '{run.name}', not of '{name}'")
        found = self.store.definition(run.name, run.version)
        if found is None:
            raise WorkflowNotFound(f"workflow '{run.name}' version {run.version} is gone")
        return build(self.runtime, Workflow.model_validate(found[1]), run_id, dict(run.input), gate=gate)

    def _definition(self, name: str) -> tuple[int, Any, Workflow]:
        """The newest version (number, time stored, parsed). A stored version never
        changes, so only its number and time are read per call and each one is
        parsed once."""
        self._ready()
        newest = self.store.newest(name) if isinstance(name, str) else None
        if newest is None:
            raise self.not_found(name)
        version, stored_at = newest
        wf = self._parsed.get((name, version, stored_at))
        if wf is None:
            found = self.store.definition(name, version)
            if found is None:
                raise self.not_found(name)
            wf = self._parsed[(name, version, stored_at)] = Workflow.model_validate(found[1])
        self._newest[name] = (version, stored_at, wf)
        return version, stored_at, wf

    def history(self, name: str) -> builtins.list[DefinitionVersion]:
        """Who defined which version of ``name`` when, newest first (the audit of
        definitions: every version is kept)."""
        self._ready()
        found = self.store.history(name) if isinstance(name, str) else []
        if not found:
            raise self.not_found(name)
        return [DefinitionVersion(name=name, version=v, defined_at=at, actor=who) for v, at, who in found]

    def not_found(self, name: Any) -> WorkflowNotFound:
        """``WorkflowNotFound`` for ``name``, naming the closest defined names."""
        names = [str(d.get("name")) for _, d in self.store.latest_definitions()]
        hint = did_you_mean(name, names) if isinstance(name, str) else ""
        return WorkflowNotFound(f"no workflow named {name!r}{hint}")

    def _ready(self) -> None:
        store = self.store
        if self._migrated_for is not store:
            self._parsed.clear()
            self._newest.clear()
            self.host.sync()
            store.migrate()
            self._store_declared()  # a bad declaration fails every use, loudly
            self._migrated_for = store


def _key_of(wf: Workflow, payload: dict[str, Any]) -> str | None:
    """The run's key: the input field the workflow declares as ``key``."""
    if wf.key is None:
        return None
    value = payload.get(wf.key)
    if not isinstance(value, (str, int)) or isinstance(value, bool) or value == "":
        raise InvalidInput(
            f"workflow '{wf.name}' input needs its key field {wf.key!r} (a non-empty string or integer), got {value!r}"
        )
    text = str(value)
    if len(text) > 255:
        raise InvalidInput(f"workflow '{wf.name}' key {wf.key!r} is longer than 255 characters")
    return text
