"""The step task: live enablement check, skip/fail policy, retries and history;
the wait task and the waker that sends sleeping and waiting runs on."""

from __future__ import annotations

import functools
import logging
import time
import weakref
from typing import Any, NoReturn

from celery import Celery, Task, signals
from celery.exceptions import Ignore, Reject, Retry

from pluginhost import (
    CapabilityDisabled,
    CapabilityNotFound,
    InvalidArgument,
    InvalidInput,
    Plugin,
    PluginHost,
    SQLAlchemyStore,
    StoreUnavailable,
    settings,
)

from . import conditions, metrics
from .conditions import CONDITION_FALSE
from .definition import Workflow
from .errors import ConditionFailed, InvalidWorkflow, RunFinished, SqlStoreRequired
from .store import DONE, StepBusy, StepRun, WorkflowStore, open_workflow_store
from .store.outcome import FORMATS as OUTCOME_FORMATS
from .store.outcome import Outcome, branch_result, carrying, read_branch, unique, unwrap
from .store.waits import WaitStore

log = logging.getLogger("workflows")

#: The step task of messages that name their capability in ``slug`` (every step
#: before steps had their capability's task options; a rolling upgrade's queued
#: messages still run here, inline, where they are delivered).
STEP_TASK = "workflows.step"
#: A step of capability ``x`` is a ``workflows.step.x`` message (``step_task_for``).
STEP_TASK_PREFIX = STEP_TASK + "."
MERGE_TASK = "workflows.merge"
FINISH_TASK = "workflows.finish"

# Steps are at-least-once: a step whose worker dies is redelivered, and the
# step row (not the message) decides whether it still has to run.
# Results a step need not keep (compile.py sets ignore_result per message) still
# record their errors, so a failure reaches the run's result. Celery's own retry
# count is not a limit here (max_retries=None): the step row counts attempts
# against the step's ``retries``.
TASK_OPTIONS: dict[str, Any] = {
    "acks_late": True,
    "reject_on_worker_lost": True,
    "store_errors_even_if_ignored": True,
    "shared": False,
    "lazy": False,
    "max_retries": None,
}

#: A delivery of a step that a live owner runs (a duplicate) looks again after
#: this long, doubling up to OWNER_WAIT_MAX_S: by then the step has finished
#: (nothing left to do) or its owner died or went stale (taken over).
OWNER_WAIT_S = 0.5
OWNER_WAIT_MAX_S = 10.0
#: Waits of a step whose process cannot load the current plugin view (G2) or
#: reach the workflow store: ``pluginhost_stale_retry_s``, doubling, capped.
STALE_VIEW_WAIT_MAX_S = 30.0

#: Capability task attributes its step task takes over: the worker enforces them
#: per task type (a rate limit is per type and worker, so a capability's step
#: runs have a bucket of their own, beside its own runs').
STEP_LIMITS = ("rate_limit", "time_limit", "soft_time_limit")
#: Capability task options that route a message: its step messages get them too.
#: Per message, not as step task attributes (Celery 5.7 deprecates those).
STEP_ROUTING = ("queue", "routing_key", "exchange", "priority")

_RUNTIMES: weakref.WeakKeyDictionary[Celery, Runtime] = weakref.WeakKeyDictionary()


class StepTask(Task):
    """The step task's class: a step's outcome is written once the task returned
    and Celery sent what follows it (the next step, or the chord's part), so a
    step recorded finished has always sent its continuation (a repeated delivery
    of it sends nothing). Until then the outcome travels in the step's result,
    which the next task records (``carrying``)."""

    def on_success(self, retval: Any, task_id: str, args: Any, kwargs: Any) -> None:
        post = getattr(self.request, "workflows_post", None)
        if post is not None:
            self.request.workflows_post = None
            post()


class CapabilityStepTask(StepTask):
    """The step task of one capability (``workflows.step.<slug>``): a step runs
    where and how its capability would run on its own.

    It has the capability task's rate limit and time limits (a step's
    ``timeout`` is its soft limit, sent with the message), and each of its
    messages is routed as the capability task's own would be, in every process
    that sends one (the producer, the worker sending the next link or a chord's
    branches, a retry): the capability task's ``queue``/``routing_key``/
    ``exchange``/``priority`` options, else the app's ``task_routes`` looked up
    with the capability task's name (``pluginhost.capability.<slug>``; a router
    function gets the step's arguments). A priority Celery clears when it sends
    the next link of a chain (``task_inherit_parent_priority`` off) is the
    capability's again."""

    #: the capability task's name, the one routes are looked up with
    workflows_route_name: str = ""
    #: the capability task's routing options that are set
    workflows_routing: dict[str, Any] = {}  # set per subclass, never changed

    def apply_async(
        self,
        args: Any = None,
        kwargs: Any = None,
        task_id: str | None = None,
        producer: Any = None,
        link: Any = None,
        link_error: Any = None,
        shadow: str | None = None,
        **options: Any,
    ) -> Any:
        for key, value in self.workflows_routing.items():
            if options.get(key) is None:
                options[key] = value
        options.setdefault("route_name", self.workflows_route_name)
        return super().apply_async(args, kwargs, task_id, producer, link, link_error, shadow, **options)


class Runtime:
    """The workflow tasks of one app, and the store they record into."""

    def __init__(self, host: PluginHost) -> None:
        self.host = host
        self._store: WorkflowStore | None = None
        self._store_of: Any = None
        self._waits: WaitStore | None = None
        self._waits_of: Any = None
        self._definitions: dict[tuple[str, int], Workflow] = {}
        #: ``Workflows.declare``: definitions to store on first use, with their actor
        self.declared: dict[str, tuple[Any, str | None]] = {}
        app = host.app

        @app.task(name=STEP_TASK, bind=True, base=StepTask, **TASK_OPTIONS)
        def step(task: Task, context: dict[str, Any], run_id: str, position: int, **policy: Any) -> Any:
            """Run one workflow step (history recorded in the workflow store)."""
            return self.run_step(task, context, run_id, position, **policy)

        @app.task(name=MERGE_TASK, **TASK_OPTIONS)
        def merge(
            results: Any, run_id: str, stage: int, *, done: dict[str, Any] | None = None, final: bool = False
        ) -> Any:
            """Merge a parallel stage's branch outputs, in declaration order, into
            the context the stage started with."""
            return self.merge_stage(results, run_id, stage, done or {}, final)

        @app.task(name=FINISH_TASK, **TASK_OPTIONS)
        def finish(context: dict[str, Any], run_id: str) -> dict[str, Any]:
            """Record a run as succeeded when no step is left to do it (a resume of
            a run whose steps had all finished)."""
            return self.finish_run(run_id, context)

        self.step_task, self.merge_task, self.finish_task = step, merge, finish
        #: the wait task (``waiting.Waiting`` registers it)
        self.wait_task: Any = None
        self._step_tasks: dict[str, Task] = {}
        self.register_step_tasks()

    def step_task_for(self, slug: str) -> Task | None:
        """The step task of capability ``slug`` (``CapabilityStepTask``), registered
        on first use; None if ``slug`` is not a capability declared on this host
        (its step goes as a ``workflows.step`` message, which fails it when it runs).

        A worker registers one for every declared capability when it starts
        (``worker_init``, see ``for_host``), before it consumes: a step message
        of a capability declared after the worker started is refused by it as
        an unregistered task."""
        task = self._step_tasks.get(slug)
        if task is None:
            try:
                cap_task = self.host.task(slug)
            except CapabilityNotFound:
                return None
            task = self._step_tasks[slug] = self._register_step_task(slug, cap_task)
        return task

    def register_step_tasks(self) -> None:
        """Register the step task of every capability declared so far."""
        for slug in self.host.capabilities():
            self.step_task_for(slug)

    def _register_step_task(self, slug: str, cap_task: Task) -> Task:
        limits = {k: getattr(cap_task, k) for k in STEP_LIMITS if getattr(cap_task, k, None) is not None}
        routing = {k: getattr(cap_task, k) for k in STEP_ROUTING if getattr(cap_task, k, None) is not None}

        def step(task: Task, context: dict[str, Any], run_id: str, position: int, **policy: Any) -> Any:
            return self.run_step(task, context, run_id, position, **{**policy, "slug": slug})

        step.__name__ = "step_" + "".join(c if c.isalnum() else "_" for c in slug)
        step.__doc__ = f"Run a workflow step of capability '{slug}' (history recorded in the workflow store)."
        return self.host.app.task(  # type: ignore[no-any-return]
            name=STEP_TASK_PREFIX + slug,
            bind=True,
            base=CapabilityStepTask,
            workflows_route_name=cap_task.name,
            workflows_routing=routing,
            **TASK_OPTIONS,
            **limits,
        )(step)

    @classmethod
    def for_host(cls, host: PluginHost) -> Runtime:
        """The runtime of ``host``'s app (its tasks are registered once per app)."""
        rt = _RUNTIMES.get(host.app)
        if rt is None:
            rt = _RUNTIMES[host.app] = cls(host)
            signals.worker_process_init.connect(lambda **_: rt.after_fork(), weak=False)

            def on_worker_init(sender: Any = None, **_: Any) -> None:
                # Before the worker consumes (and forks its pool): capabilities
                # declared after this runtime was made get their step tasks.
                if getattr(sender, "app", None) is host.app:
                    rt.register_step_tasks()

            signals.worker_init.connect(on_worker_init, weak=False)
        return rt

    @property
    def store(self) -> WorkflowStore:
        """The workflow tables, in the database of the host's current store."""
        current = self.host.store
        if self._store is None or self._store_of is not current:
            if not isinstance(current, SQLAlchemyStore):
                raise SqlStoreRequired(
                    f"workflows need a SQL store (SQLite or PostgreSQL), not {type(current).__name__}"
                )
            app = self.host.app
            self._store = open_workflow_store(
                current.engine,
                step_lease_s=settings.value(app, "pluginhost_workflows_step_lease_s"),
                synchronous_commit=bool(settings.value(app, "pluginhost_workflows_synchronous_commit")),
                connect_timeout_s=settings.value(app, "pluginhost_store_timeout_s"),
            )
            self._store_of = current
        return self._store

    @property
    def waits(self) -> WaitStore:
        """The waits and signals, in the workflow store's database."""
        store = self.store
        if self._waits is None or self._waits_of is not store:
            app = self.host.app
            self._waits = WaitStore(
                store.engine,
                lease_s=settings.value(app, "pluginhost_workflows_wake_lease_s"),
                timeout_s=settings.value(app, "pluginhost_store_timeout_s"),
            )
            self._waits_of = store
        return self._waits

    def definition(self, name: str, version: int) -> Workflow:
        """A stored version of a definition, parsed once per process (a stored
        version never changes)."""
        wf = self._definitions.get((name, version))
        if wf is None:
            found = self.store.definition(name, version)
            if found is None:
                raise InvalidWorkflow(f"workflow '{name}' version {version} is gone from the store")
            wf = self._definitions[(name, version)] = Workflow.model_validate(found[1])
        return wf

    @property
    def outcome_format(self) -> int:
        """The format carried step outcomes are written in (outcome.py)."""
        fmt = settings.value(self.host.app, "pluginhost_workflows_outcome_format")
        if fmt not in OUTCOME_FORMATS:
            raise InvalidArgument(
                f"setting pluginhost_workflows_outcome_format must be one of {OUTCOME_FORMATS}, got {fmt!r}"
            )
        return int(fmt)

    def after_fork(self) -> None:
        """Forget connections inherited from the parent (a prefork child)."""
        if self._store is not None:
            self._store.after_fork()

    # -- tasks -----------------------------------------------------------------

    def run_step(
        self,
        task: Task,
        context: dict[str, Any],
        run_id: str,
        position: int,
        *,
        slug: str,
        on_disabled: str = "skip",
        retries: int = 0,
        retry_backoff: float = 1.0,
        parallel: bool = False,
        first: bool = False,
        final: bool = False,
        gate: list[str] | None = None,
        when: str | None = None,
    ) -> Any:
        """Returns the context for the next step (with this step's outcome when it
        was sent without waiting: see ``carrying``), or ``[position, output,
        context, outcome]`` for a parallel branch (the merge combines them in
        declaration order)."""
        started = time.monotonic()
        context, carried = unwrap(context)
        host = self.host
        plugin = host.plugin_of(slug)
        self._snapshot(task, plugin)  # a view this process cannot load: sent again, nothing claimed
        row = self._claim(task, run_id, position, first, carried)
        if row.status in DONE:
            # A step that already finished. A repeat of the very message that ran
            # it (same task id) sends nothing: that outcome was recorded after the
            # message's continuation was sent (StepTask). The last step returns
            # the run's result again (the caller may be waiting on it). Any other
            # delivery (one sent on its own, another canvas of the run: a resume,
            # a repeated start) reuses the recorded output and goes on with its
            # own continuation.
            repeat = row.task_id is not None and row.task_id == task.request.id
            sends_more = bool(task.request.chain or task.request.chord)
            if repeat and sends_more and not (final and not parallel):
                raise Ignore()
            return self._outcome(run_id, position, context, row.output or {}, parallel, final)
        if row.status != "running":
            raise Ignore()  # the run failed or was cancelled meanwhile
        # The decision's one look, taken after the claim (a store round trip that
        # may wait on a lock): a disable acknowledged meanwhile is seen (G2/G3).
        snapshot = self._snapshot(task, plugin, claimed=(run_id, position))
        if gate is not None:
            self._check_gate(task, run_id, position, slug, gate, plugin, snapshot, started)
        if when is not None and not self._condition_holds(run_id, position, slug, when, context, started):
            outcome = self._finish(
                task, run_id, position, context, "skipped", None, CONDITION_FALSE, None, parallel, final
            )
            metrics.step_finished(slug, "skipped", time.monotonic() - started)
            return outcome
        if snapshot is None or not snapshot.enabled:
            return self._disabled(task, run_id, position, slug, plugin, on_disabled, context, parallel, final, started)
        version = snapshot.version
        try:
            result = host.call_capability_with(slug, snapshot, context)
        except (Retry, Ignore):
            self.store.release_step(run_id, position)
            raise
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            if row.attempts <= retries and not isinstance(exc, InvalidInput):
                countdown = min(60.0, retry_backoff * 2 ** (row.attempts - 1))
                self.store.retry_step(run_id, position, error)
                metrics.step_finished(slug, "retried", time.monotonic() - started)
                log.info(
                    "step %s of run %s failed (attempt %d), retrying in %.1fs: %s",
                    slug,
                    run_id,
                    row.attempts,
                    countdown,
                    error,
                )
                raise task.retry(exc=exc, countdown=countdown) from None
            self._failed(run_id, position, slug, error, version, started)
            raise
        output = result if isinstance(result, dict) else ({} if result is None else {slug: result})
        outcome = self._finish(task, run_id, position, context, "succeeded", output, None, version, parallel, final)
        metrics.step_finished(slug, "succeeded", time.monotonic() - started)
        return outcome

    def _snapshot(self, task: Task, plugin: str, claimed: tuple[str, int] | None = None) -> Plugin | None:
        """The step's one look at its plugin: whether it runs, the record its body
        gets and the version its row records all come from this snapshot (G4).

        A process whose view is behind and cannot be loaded runs nothing on it
        and loses nothing: the delivery is sent again later (G2), before any
        claim, so the step stays pending, not failed."""
        try:
            return self.host.get(plugin)
        except StoreUnavailable:
            if task.request.is_eager:
                raise
            if claimed is not None:  # give the claim back: the next delivery takes it at once
                try:
                    self.store.release_step(*claimed)
                except StoreUnavailable:
                    pass  # its owner is this session: the next delivery takes it over
            send_again(task, self.store_wait(task))

    def _condition_holds(
        self, run_id: str, position: int, slug: str, when: str, context: dict[str, Any], started: float
    ) -> bool:
        """The step's condition on the context it received; one that cannot be
        evaluated fails the step and the run (no retry: the context will not change)."""
        try:
            return conditions.holds(when, context)
        except ConditionFailed as exc:
            self._failed(run_id, position, slug, f"ConditionFailed: {exc}", None, started)
            raise

    def _check_gate(
        self,
        task: Task,
        run_id: str,
        position: int,
        slug: str,
        gate: list[str],
        plugin: str,
        snapshot: Plugin | None,
        started: float,
    ) -> None:
        """A run started by ``WorkflowCapability.dispatch`` had no capability task
        to check its capability on a worker (G2): its first stage does, here, with
        that task's error. A disabled capability fails the run."""
        capability, gate_plugin = gate
        record = snapshot if gate_plugin == plugin else self._snapshot(task, gate_plugin, claimed=(run_id, position))
        if record is not None and record.enabled:
            return
        why = "is not in the store" if record is None else "is disabled"
        reason = f"plugin '{gate_plugin}' {why}"
        if capability != gate_plugin:
            reason = f"capability '{capability}' is disabled: {reason}"
        error = CapabilityDisabled(reason)
        self._failed(run_id, position, slug, f"CapabilityDisabled: {error}", None, started)
        raise error

    def _claim(self, task: Task, run_id: str, position: int, first: bool, carried: list[Outcome]) -> StepRun:
        """The step's row, claimed for this delivery unless it finished. A step a
        live owner runs (a message sent twice, or redelivered while its first
        delivery still runs) is looked at again later, not run twice. So is a
        step whose workflow store cannot be reached: not lost, not failed (a
        claim that did land has this process's broken session as its owner,
        which the next delivery takes over)."""
        retries = min(task.request.retries or 0, 5)
        try:
            return self.store.begin_step(
                run_id,
                position,
                worker=task.request.hostname,
                first=first,
                carried=carried,
                task_id=task.request.id,
            )
        except RunFinished as exc:
            if task.request.is_eager:
                raise
            log.info("%s", exc)  # a late or duplicate delivery: nothing to do
            raise Ignore() from None
        except StepBusy:
            if task.request.is_eager:
                raise
            send_again(task, min(OWNER_WAIT_MAX_S, OWNER_WAIT_S * 2.0**retries))
        except StoreUnavailable as exc:
            if task.request.is_eager:
                raise
            countdown = self.store_wait(task)
            log.warning("step %s of run %s sent again in %.1fs: %s", position, run_id, countdown, exc)
            send_again(task, countdown)

    def store_wait(self, task: Task) -> float:
        """How long a step waits for a store it cannot use: the capability tasks'
        ``pluginhost_stale_retry_s``, doubling per wait, capped."""
        base = settings.value(self.host.app, "pluginhost_stale_retry_s")
        return min(STALE_VIEW_WAIT_MAX_S, base * 2.0 ** min(task.request.retries or 0, 5))

    def _finish(
        self,
        task: Task,
        run_id: str,
        position: int,
        context: dict[str, Any],
        status: str,
        output: dict[str, Any] | None,
        error: str | None,
        version: int | None,
        parallel: bool,
        final: bool,
    ) -> Any:
        """Record a step's outcome; returns what the step task returns.

        The last step waits for its write, which also records the run's success.
        Any other step's outcome is written once Celery sent what follows the
        step (``StepTask.on_success``; on PostgreSQL without waiting) and is
        handed on to the next task, which records it again in its own first
        statement."""
        if parallel or not final:
            outcome = self.store.outcome(position, status, output=output, error=error, plugin_version=version)
            task.request.workflows_post = functools.partial(self.store.post_step, run_id, outcome)
            if parallel:
                return branch_result(position, output or {}, context, outcome, self.outcome_format)
            return carrying({**context, **(output or {})}, [outcome], self.outcome_format)
        merged = {**context, **(output or {})}
        name = self.store.finish_step(
            run_id, position, status, output=output, error=error, plugin_version=version, run_output=merged
        )
        metrics.run_finished(name or "", "succeeded")
        return merged

    def _outcome(
        self, run_id: str, position: int, context: dict[str, Any], output: dict[str, Any], parallel: bool, final: bool
    ) -> Any:
        if parallel:
            return branch_result(position, output, context, None)  # recorded already: nothing to carry
        merged = {**context, **output}
        return self.finish_run(run_id, merged) if final else merged

    def merge_stage(self, results: Any, run_id: str, stage: int, done: dict[str, Any], final: bool) -> Any:
        outputs = {int(p): o for p, o in done.items()}
        base: dict[str, Any] | None = None
        results, carried = unwrap(results)
        if isinstance(results, dict):  # nothing ran in this stage: the context itself
            base = results
        else:
            for result in results:
                position, output, context, outcome = read_branch(result)
                outputs[position] = output
                base = context
                if outcome is not None:
                    carried.append(outcome)
        if base is None:
            raise InvalidWorkflow(f"run {run_id}: stage {stage} has no branch results to merge")
        merged = dict(base)
        for position in sorted(outputs):
            merged.update(outputs[position])
        if final:
            metrics.run_finished(self.store.finish_stage(run_id, unique(carried), merged), "succeeded")
            return merged
        return carrying(merged, unique(carried), self.outcome_format)

    def finish_run(self, run_id: str, context: Any) -> dict[str, Any]:
        context, carried = unwrap(context)
        metrics.run_finished(self.store.finish_stage(run_id, carried, context), "succeeded")
        return context

    def _disabled(
        self,
        task: Task,
        run_id: str,
        position: int,
        slug: str,
        plugin: str,
        policy: str,
        context: dict[str, Any],
        parallel: bool,
        final: bool,
        started: float,
    ) -> Any:
        reason = f"plugin '{plugin}' is disabled"
        if policy == "skip":
            outcome = self._finish(task, run_id, position, context, "skipped", None, reason, None, parallel, final)
            metrics.step_finished(slug, "skipped", time.monotonic() - started)
            return outcome
        error = CapabilityDisabled(f"step '{slug}' of run {run_id} failed: {reason}")
        self._failed(run_id, position, slug, f"CapabilityDisabled: {error}", None, started)
        raise error

    def _failed(self, run_id: str, position: int, slug: str, error: str, version: int | None, started: float) -> None:
        name = self.store.fail_run(run_id, position, error, plugin_version=version)
        metrics.step_finished(slug, "failed", time.monotonic() - started)
        metrics.run_finished(name, "failed")


def send_again(task: Task, countdown: float) -> NoReturn:
    """Send this delivery again in ``countdown`` seconds (same id, same
    continuation), then end this one without a state: a duplicate's wait must
    not overwrite the result its first delivery stores. If the new message
    cannot be sent, this delivery goes back to the queue instead."""
    request = task.request
    retries = (request.retries or 0) + 1
    sig = task.signature_from_request(request, countdown=countdown, retries=retries)
    try:
        sig.apply_async()
    except Exception as exc:  # noqa: BLE001 - the broker: keep the delivery itself
        raise Reject(exc, requeue=True) from None
    raise Ignore()
