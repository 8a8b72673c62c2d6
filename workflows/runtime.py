"""The step task: live enablement check, skip/fail policy, retries and history."""

from __future__ import annotations

import logging
import time
import weakref
from typing import Any

from celery import Celery, Task, signals
from celery.exceptions import Ignore, Retry
from sqlalchemy import create_engine

from pluginhost import CapabilityDisabled, InvalidInput, PluginHost, settings

from . import metrics
from .errors import InvalidWorkflow
from .hotpath import Outcome
from .store import DONE, WorkflowStore

log = logging.getLogger("workflows")

STEP_TASK = "workflows.step"
MERGE_TASK = "workflows.merge"
FINISH_TASK = "workflows.finish"

# Steps are at-least-once: a step whose worker dies is redelivered, and the
# step row (not the message) decides whether it still has to run.
# Results a step need not keep (compile.py sets ignore_result per message) still
# record their errors, so a failure reaches the run's result.
TASK_OPTIONS: dict[str, Any] = {
    "acks_late": True, "reject_on_worker_lost": True, "store_errors_even_if_ignored": True,
    "shared": False, "lazy": False,
}

_RUNTIMES: weakref.WeakKeyDictionary[Celery, Runtime] = weakref.WeakKeyDictionary()

# What a step returns when its outcome was sent without waiting (PostgreSQL):
# [CARRIED, context, outcomes]. The next step (or the stage's merge) records the
# outcomes again in its own first statement; contexts are always dicts, so a
# list with this tag cannot be one.
CARRIED = "workflows.carried"


def carrying(context: dict[str, Any], outcomes: list[Outcome]) -> Any:
    """``context`` with the outcomes the next task records (none: the context itself)."""
    return [CARRIED, context, outcomes] if outcomes else context


def unwrap(value: Any) -> tuple[Any, list[Outcome]]:
    """(context, carried outcomes) of what the previous task returned."""
    if isinstance(value, list) and len(value) == 3 and value[0] == CARRIED:
        return value[1], list(value[2])
    return value, []


class Runtime:
    """The workflow tasks of one app, and the store they record into."""

    def __init__(self, host: PluginHost) -> None:
        self.host = host
        self._store: WorkflowStore | None = None
        self._store_of: Any = None
        app = host.app

        @app.task(name=STEP_TASK, bind=True, **TASK_OPTIONS)
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

    @classmethod
    def for_host(cls, host: PluginHost) -> Runtime:
        """The runtime of ``host``'s app (its tasks are registered once per app)."""
        rt = _RUNTIMES.get(host.app)
        if rt is None:
            rt = _RUNTIMES[host.app] = cls(host)
            signals.worker_process_init.connect(lambda **_: rt.after_fork(), weak=False)
        return rt

    @property
    def store(self) -> WorkflowStore:
        """The workflow tables, in the database of the host's current store."""
        current = self.host.store
        if self._store is None or self._store_of is not current:
            engine = getattr(current, "engine", None)
            if engine is None:
                raise InvalidWorkflow(
                    f"workflows need a SQL store (SQLite or PostgreSQL), not {type(current).__name__}"
                )
            if engine.dialect.name == "postgresql" and not settings.value(self.host.app, "pluginhost_workflows_synchronous_commit"):
                # History writes skip the WAL flush wait; a PostgreSQL *server*
                # crash can then lose the last ~0.6 s of step updates, which the
                # sweeper reports (steps left running). Plugin admin writes stay durable.
                engine = create_engine(
                    engine.url, pool_pre_ping=True,
                    connect_args={"options": "-c synchronous_commit=off"},
                )
            self._store, self._store_of = WorkflowStore(engine), current
        return self._store

    def after_fork(self) -> None:
        """Forget connections inherited from the parent (a prefork child)."""
        if self._store is not None:
            self._store.engine.dispose(close=False)

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
    ) -> Any:
        """Returns the context for the next step (with this step's outcome when it
        was sent without waiting: see ``carrying``), or ``[position, output,
        context, outcome]`` for a parallel branch (the merge combines them in
        declaration order)."""
        started = time.monotonic()
        context, carried = unwrap(context)
        row = self.store.begin_step(run_id, position, worker=task.request.hostname, first=first, carried=carried)
        if row.status in DONE:
            # A redelivered step that already finished: reuse what it recorded.
            return self._outcome(run_id, position, context, row.output or {}, parallel, final)
        if row.status != "running":
            raise Ignore()  # the run failed or was cancelled meanwhile
        host = self.host
        plugin = host.plugin_of(slug)
        if not host.is_enabled(plugin):
            return self._disabled(run_id, position, slug, plugin, on_disabled, context, parallel, final, started)
        found = host.get(plugin)
        version = found.version if found else None
        try:
            result = host.call_capability(slug, context)
        except CapabilityDisabled:
            return self._disabled(run_id, position, slug, plugin, on_disabled, context, parallel, final, started)
        except (Retry, Ignore):
            raise
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            if row.attempts <= retries and not isinstance(exc, InvalidInput):
                countdown = min(60.0, retry_backoff * 2 ** (row.attempts - 1))
                self.store.retry_step(run_id, position, error)
                metrics.step_finished(slug, "retried", time.monotonic() - started)
                log.info("step %s of run %s failed (attempt %d), retrying in %.1fs: %s", slug, run_id, row.attempts, countdown, error)
                raise task.retry(exc=exc, countdown=countdown, max_retries=None) from None
            self._failed(run_id, position, slug, error, version, started)
            raise
        output = result if isinstance(result, dict) else ({} if result is None else {slug: result})
        outcome = self._finish(run_id, position, context, "succeeded", output, None, version, parallel, final)
        metrics.step_finished(slug, "succeeded", time.monotonic() - started)
        return outcome

    def _finish(
        self,
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
        Any other step sends it without waiting and hands the outcome on to the
        next task, which records it again in its own first statement."""
        if parallel:
            outcome = self.store.post_step(run_id, position, status, output=output, error=error, plugin_version=version)
            return [position, output or {}, context, outcome]
        merged = {**context, **(output or {})}
        if not final:
            outcome = self.store.post_step(run_id, position, status, output=output, error=error, plugin_version=version)
            return carrying(merged, [outcome] if outcome else [])
        name = self.store.finish_step(
            run_id, position, status, output=output, error=error, plugin_version=version, run_output=merged
        )
        metrics.run_finished(name or "", "succeeded")
        return merged

    def _outcome(
        self, run_id: str, position: int, context: dict[str, Any], output: dict[str, Any], parallel: bool, final: bool
    ) -> Any:
        if parallel:
            return [position, output, context, None]  # recorded already: nothing to carry
        merged = {**context, **output}
        return self.finish_run(run_id, merged) if final else merged

    def merge_stage(self, results: Any, run_id: str, stage: int, done: dict[str, Any], final: bool) -> Any:
        outputs = {int(p): o for p, o in done.items()}
        base: dict[str, Any] | None = None
        results, carried = unwrap(results)
        if isinstance(results, dict):  # nothing ran in this stage: the context itself
            base = results
        else:
            for position, output, context, *outcome in results:  # outcome: [] from workers before it existed
                outputs[int(position)] = output
                base = context
                if outcome and outcome[0]:
                    carried.append(outcome[0])
        if base is None:
            raise InvalidWorkflow(f"run {run_id}: stage {stage} has no branch results to merge")
        merged = dict(base)
        for position in sorted(outputs):
            merged.update(outputs[position])
        if final:
            metrics.run_finished(self.store.finish_stage(run_id, _unique(carried), merged), "succeeded")
            return merged
        return carrying(merged, _unique(carried))

    def finish_run(self, run_id: str, context: Any) -> dict[str, Any]:
        context, carried = unwrap(context)
        metrics.run_finished(self.store.finish_stage(run_id, carried, context), "succeeded")
        return context

    def _disabled(
        self,
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
            outcome = self._finish(run_id, position, context, "skipped", None, reason, None, parallel, final)
            metrics.step_finished(slug, "skipped", time.monotonic() - started)
            return outcome
        error = CapabilityDisabled(f"step '{slug}' of run {run_id} failed: {reason}")
        self._failed(run_id, position, slug, f"CapabilityDisabled: {error}", None, started)
        raise error

    def _failed(
        self, run_id: str, position: int, slug: str, error: str, version: int | None, started: float
    ) -> None:
        name = self.store.fail_run(run_id, position, error, plugin_version=version)
        metrics.step_finished(slug, "failed", time.monotonic() - started)
        metrics.run_finished(name, "failed")


def _unique(outcomes: list[Outcome]) -> list[Outcome]:
    """One outcome per step (branches all carry the step before their stage)."""
    return list({int(o[0]): o for o in outcomes}.values())
