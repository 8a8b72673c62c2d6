"""The step task: live enablement check, skip/fail policy, retries and history."""

from __future__ import annotations

import logging
import time
import weakref
from typing import Any

from celery import Celery, Task, signals
from celery.exceptions import Ignore, Retry
from sqlalchemy import create_engine

from pluginhost import CapabilityDisabled, InvalidInput, PluginHost, metrics

from .errors import InvalidWorkflow
from .store import DONE, WorkflowStore

log = logging.getLogger("workflows")

STEP_TASK = "workflows.step"
MERGE_TASK = "workflows.merge"
FINISH_TASK = "workflows.finish"

# Steps are at-least-once: a step whose worker dies is redelivered, and the
# step row (not the message) decides whether it still has to run.
TASK_OPTIONS: dict[str, Any] = {"acks_late": True, "reject_on_worker_lost": True, "shared": False, "lazy": False}

_RUNTIMES: weakref.WeakKeyDictionary[Celery, Runtime] = weakref.WeakKeyDictionary()


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
        ) -> dict[str, Any]:
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
            if engine.dialect.name == "postgresql" and not self.host.app.conf.get("workflows_synchronous_commit", True):
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
        """Returns the context for the next step, or ``[position, output, context]``
        for a parallel branch (the merge combines them in declaration order)."""
        started = time.monotonic()
        row = self.store.begin_step(run_id, position, worker=task.request.hostname, first=first)
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
        """Record a step's outcome (and, for the last step, the run's success in
        the same statement); returns what the step task returns."""
        if parallel:
            self.store.finish_step(run_id, position, status, output=output, error=error, plugin_version=version)
            return [position, output or {}, context]
        merged = {**context, **(output or {})}
        name = self.store.finish_step(
            run_id, position, status, output=output, error=error, plugin_version=version,
            run_output=merged if final else None,
        )
        if final:
            metrics.run_finished(name or "", "succeeded")
        return merged

    def _outcome(
        self, run_id: str, position: int, context: dict[str, Any], output: dict[str, Any], parallel: bool, final: bool
    ) -> Any:
        if parallel:
            return [position, output, context]
        merged = {**context, **output}
        return self.finish_run(run_id, merged) if final else merged

    def merge_stage(
        self, results: Any, run_id: str, stage: int, done: dict[str, Any], final: bool
    ) -> dict[str, Any]:
        outputs = {int(p): o for p, o in done.items()}
        base: dict[str, Any] | None = None
        if isinstance(results, dict):  # nothing ran in this stage: the context itself
            base = results
        else:
            for position, output, context in results:
                outputs[int(position)] = output
                base = context
        if base is None:
            raise InvalidWorkflow(f"run {run_id}: stage {stage} has no branch results to merge")
        merged = dict(base)
        for position in sorted(outputs):
            merged.update(outputs[position])
        return self.finish_run(run_id, merged) if final else merged

    def finish_run(self, run_id: str, context: dict[str, Any]) -> dict[str, Any]:
        metrics.run_finished(self.store.finish_run(run_id, context), "succeeded")
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
