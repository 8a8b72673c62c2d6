"""workflows: multi-step workflows composed of pluginhost capabilities."""

from .capability import WorkflowCapability
from .definition import Parallel, Sleep, Step, WaitFor, Workflow
from .errors import (
    InvalidRunState,
    InvalidSignal,
    InvalidWorkflow,
    RunFinished,
    RunNotFound,
    SqlStoreRequired,
    UnreadableOutcome,
    WaitTimedOut,
    WorkflowNotFound,
)
from .service import PlannedStep, Workflows
from .store import RUN_STATES, StepRun, WorkflowRun

__all__ = [
    "Workflow",
    "Step",
    "Parallel",
    "Sleep",
    "WaitFor",
    "Workflows",
    "WorkflowCapability",
    "WorkflowRun",
    "StepRun",
    "RUN_STATES",
    "PlannedStep",
    "InvalidWorkflow",
    "WorkflowNotFound",
    "InvalidRunState",
    "RunFinished",
    "RunNotFound",
    "InvalidSignal",
    "WaitTimedOut",
    "SqlStoreRequired",
    "UnreadableOutcome",
]
