"""WorkflowCapability: a named workflow exposed as a capability."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pluginhost import CapabilityContext, PluginHost

from .service import NeedsCapabilityTask, Workflows

if TYPE_CHECKING:
    from celery.result import AsyncResult


class WorkflowCapability:
    """A capability function that runs workflow ``name``.

    ``host.register_capability("onboard", WorkflowCapability(host, "onboarding"))``:
    ``run_capability`` sends the workflow's canvas itself (``dispatch``); a run
    started from inside a task, or by a capability task sent some other way
    (``task.delay``, beat, ``celery call``), replaces that task with the canvas
    (``Task.replace``). Either way ``run_capability(...).get()`` returns the final
    context and the result id is the run id. Nothing blocks inside a task.
    """

    def __init__(self, host: PluginHost, name: str) -> None:
        self.flows = Workflows(host)
        self.name = name
        self.__name__ = f"workflow_{name}"
        self.__doc__ = f"Runs workflow '{name}'."

    def dispatch(
        self, capability: str, plugin: str, on_disabled: str, payload: dict[str, Any], options: dict[str, Any]
    ) -> AsyncResult | None:
        """``run_capability`` from a producer, after its store check: record the
        run and send the workflow's canvas directly (no capability task, no
        ``Task.replace`` hop; the result id is the run id, as before). The
        capability's worker-side check moves into the first stage's steps, which
        fail the run with ``CapabilityDisabled`` if ``plugin`` was disabled
        meanwhile. Only for ``on_disabled="fail"`` (the default): ``skip`` and
        ``defer`` keep the capability task, which applies them before any run
        exists; so does a workflow whose first stage is a wait (it has no step
        there to take over the check)."""
        if on_disabled != "fail":
            return None
        try:
            run_id, canvas = self.flows.prepare(
                self.name, payload, run_id=options.get("task_id"), gate=(capability, plugin)
            )
        except NeedsCapabilityTask:
            return None  # nothing recorded: the capability task checks, then records the run
        options.pop("task_id", None)
        return self.flows.send(canvas, run_id, **options)

    def __call__(self, payload: dict[str, Any], ctx: CapabilityContext) -> Any:
        task = ctx.task
        run_id = getattr(task.request, "id", None)
        if run_id is None or task.request.called_directly:
            # call_capability (in-process): start it and hand back the result handle id.
            return {"run_id": self.flows.start(self.name, payload).id}
        _, canvas = self.flows.prepare(self.name, payload, run_id=run_id)
        raise task.replace(canvas)
