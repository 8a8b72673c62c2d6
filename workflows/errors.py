"""Errors of the workflows package (all PluginHostError subclasses)."""

from pluginhost import PluginHostError


class InvalidWorkflow(PluginHostError):
    """A workflow definition is malformed or names an unknown capability."""


class WorkflowNotFound(PluginHostError):
    """No workflow (or run) with that name or id."""


class InvalidRunState(PluginHostError):
    """The run is not in a state that allows the operation (e.g. resume of a running run)."""


class RunFinished(InvalidRunState):
    """A step of a run that already ended (failed or succeeded) is not run: a
    late or duplicate delivery of it changes nothing until the run is resumed."""


__all__ = ["InvalidWorkflow", "WorkflowNotFound", "InvalidRunState", "RunFinished"]
