"""workflows: multi-step workflows composed of pluginhost capabilities."""

from .capability import WorkflowCapability
from .definition import Parallel, Step, Workflow
from .errors import (
    InvalidRunState,
    InvalidWorkflow,
    RunFinished,
    RunNotFound,
    SqlStoreRequired,
    UnreadableOutcome,
    WorkflowNotFound,
)
from .service import PlannedStep, Workflows
from .store import RUN_STATES, StepRun, WorkflowRun

__all__ = [
    "Workflow",
    "Step",
    "Parallel",
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
    "SqlStoreRequired",
    "UnreadableOutcome",
]
