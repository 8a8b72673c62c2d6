"""WorkflowCapability: a named workflow exposed as a capability."""

from __future__ import annotations

from typing import Any

from pluginhost import CapabilityContext, PluginHost

from .service import Workflows


class WorkflowCapability:
    """A capability function that runs workflow ``name``.

    ``host.register_capability("onboard", WorkflowCapability(host, "onboarding"))``:
    the capability task replaces itself with the workflow's canvas
    (``Task.replace``), so ``run_capability(...).get()`` returns the final
    context and the result id is the run id. Nothing blocks inside a task.
    """

    def __init__(self, host: PluginHost, name: str) -> None:
        self.flows = Workflows(host)
        self.name = name
        self.__name__ = f"workflow_{name}"
        self.__doc__ = f"Runs workflow '{name}'."

    def __call__(self, payload: dict[str, Any], ctx: CapabilityContext) -> Any:
        task = ctx.task
        run_id = getattr(task.request, "id", None)
        if run_id is None or task.request.called_directly:
            # call_capability (in-process): start it and hand back the result handle id.
            return {"run_id": self.flows.start(self.name, payload).id}
        _, canvas = self.flows.prepare(self.name, payload, run_id=run_id)
        raise task.replace(canvas)
