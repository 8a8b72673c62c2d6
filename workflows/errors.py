"""Errors of the workflows package (all PluginHostError subclasses)."""

from pluginhost import InvalidInput, PluginHostError, StoreUnavailable


class InvalidWorkflow(PluginHostError):
    """A workflow definition is malformed or names an unknown capability."""


class WorkflowNotFound(PluginHostError):
    """No workflow (or run) with that name or id."""


class InvalidRunState(PluginHostError):
    """The run is not in a state that allows the operation (e.g. resume of a running run)."""


class RunFinished(InvalidRunState):
    """A step of a run that already ended (failed or succeeded) is not run: a
    late or duplicate delivery of it changes nothing until the run is resumed."""


class ConditionFailed(InvalidInput):
    """A step's condition could not be evaluated for the run's context (a name the
    context lacks, a type error) or did not give a bool: the step fails (no retry)."""


class RunNotFound(WorkflowNotFound, StoreUnavailable):
    """A run a worker was recording is gone from the store (deleted, pruned, or
    another database): the delivery cannot record its outcome."""


class InvalidSignal(InvalidInput):
    """A signal that cannot be delivered: a malformed name or payload, a name the
    run's workflow does not wait for, a run that ended or passed that wait, or a
    second signal of the same name for one run. Nothing is stored."""


class WaitTimedOut(PluginHostError):
    """A ``WaitFor(on_timeout="fail")`` whose signal did not arrive in time."""


class SqlStoreRequired(InvalidWorkflow):
    """Workflows keep their runs in SQL tables: the host's store is not a SQL store."""


class UnreadableOutcome(PluginHostError):
    """A task carried a step outcome in a format this release cannot read (a
    message from a newer release, or a corrupted one)."""


__all__ = [
    "InvalidWorkflow",
    "WorkflowNotFound",
    "InvalidRunState",
    "RunFinished",
    "ConditionFailed",
    "RunNotFound",
    "InvalidSignal",
    "WaitTimedOut",
    "SqlStoreRequired",
    "UnreadableOutcome",
]
