"""The workflow tables: definitions (versioned), runs and step runs, in the
host store's database.

Laid out like ``pluginhost.store``: the records (records.py), one table
definition (schema.py), the contract and what both engines share (base.py), one
implementation per engine (sql.py: SQLite; postgres.py: PostgreSQL), chosen once
by ``open_workflow_store``, and the outcome a step hands on to the next task
(outcome.py).
"""

from __future__ import annotations

from sqlalchemy import Engine

from .base import Claim, WorkflowStore
from .outcome import Outcome
from .records import DONE, OPEN_RUN_STATES, RUN_STATES, STEP_LEASE_S, STEP_STATES, StepBusy, StepRun, WorkflowRun
from .schema import MIGRATIONS, definitions, metadata, runs, steps
from .sql import SqlWorkflowStore


def open_workflow_store(
    engine: Engine,
    *,
    step_lease_s: float = STEP_LEASE_S,
    synchronous_commit: bool = True,
    connect_timeout_s: float = 2.0,
) -> WorkflowStore:
    """The workflow store of ``engine``'s database: PostgreSQL on connections of
    its own (postgres.py), any other dialect through SQLAlchemy (sql.py).
    ``synchronous_commit`` applies to PostgreSQL only."""
    if engine.dialect.name == "postgresql":
        from .postgres import PgWorkflowStore

        return PgWorkflowStore(
            engine,
            step_lease_s=step_lease_s,
            synchronous_commit=synchronous_commit,
            connect_timeout_s=connect_timeout_s,
        )
    return SqlWorkflowStore(engine, step_lease_s=step_lease_s)


__all__ = [
    "WorkflowStore",
    "SqlWorkflowStore",
    "open_workflow_store",
    "Claim",
    "Outcome",
    "StepBusy",
    "StepRun",
    "WorkflowRun",
    "STEP_STATES",
    "RUN_STATES",
    "DONE",
    "OPEN_RUN_STATES",
    "STEP_LEASE_S",
    "MIGRATIONS",
    "metadata",
    "definitions",
    "runs",
    "steps",
]
