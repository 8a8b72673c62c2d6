"""The workflow tables, as the code reads and writes them (one definition).

The migrations under ``workflows/migrations`` are the history that builds them;
``tests/test_workflows_upgrade.py`` holds the migrated schema equal to this one.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import JSON, BigInteger, Column, DateTime, ForeignKey, Index, Integer, MetaData, String, Table, Text

MIGRATIONS = Path(__file__).resolve().parents[1] / "migrations"
VERSION_TABLE = "workflows_alembic_version"

metadata = MetaData()
definitions = Table(
    "workflows_definitions",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("definition", JSON, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("actor", Text),
)
runs = Table(
    "workflows_runs",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("name", String(64), nullable=False),
    Column("version", Integer, nullable=False),
    Column("status", String(16), nullable=False),
    Column("input", JSON, nullable=False),
    Column("context", JSON, nullable=False),
    Column("output", JSON),
    Column("error", Text),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("started_at", DateTime(timezone=True)),
    Column("finished_at", DateTime(timezone=True)),
    Column("cancelled_by", Text),  # who cancelled it (Workflows.cancel); finished_at says when
    Column("key", String(255)),  # the input field the workflow names as its key (signal_by_key)
    Index("workflows_runs_key", "name", "key"),
)
steps = Table(
    "workflows_steps",
    metadata,
    Column("run_id", String(64), ForeignKey("workflows_runs.id", ondelete="CASCADE"), primary_key=True),
    Column("position", Integer, primary_key=True),
    Column("stage", Integer, nullable=False),
    Column("slug", String(64), nullable=False),
    Column("status", String(16), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("error", Text),
    Column("output", JSON),
    Column("plugin_version", BigInteger),
    Column("worker", Text),
    Column("started_at", DateTime(timezone=True)),
    Column("finished_at", DateTime(timezone=True)),
    Column("owner", Text),  # who holds a running step: see WorkflowStore.begin_step
    Column("task_id", Text),  # the message that claimed it last
)

waits = Table(
    "workflows_waits",
    metadata,
    Column("run_id", String(64), ForeignKey("workflows_runs.id", ondelete="CASCADE"), primary_key=True),
    Column("stage", Integer, primary_key=True),
    Column("kind", String(8), nullable=False),  # "sleep" | "signal"
    Column("signal", String(64)),  # the awaited signal (kind "signal")
    Column("on_timeout", String(8)),  # WaitFor.on_timeout
    Column("status", String(16), nullable=False),  # waiting -> claimed -> done; or cancelled
    Column("outcome", String(16)),  # slept | received | timed_out, once known
    Column("wake_at", DateTime(timezone=True)),  # due time: a sleep's end, a signal's timeout (NULL: never)
    Column("context", JSON, nullable=False),  # the context the run goes on with
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("claimed_by", Text),  # who sends the run on (host:pid), with claimed_at: a lease
    Column("claimed_at", DateTime(timezone=True)),
    Column("woke_at", DateTime(timezone=True)),  # when the run was sent on
    Index("workflows_waits_due", "status", "wake_at"),
)
signals = Table(
    "workflows_signals",
    metadata,
    Column("run_id", String(64), ForeignKey("workflows_runs.id", ondelete="CASCADE"), primary_key=True),
    Column("name", String(64), primary_key=True),
    Column("payload", JSON, nullable=False),
    Column("received_at", DateTime(timezone=True), nullable=False),
    Column("actor", Text),
    Column("consumed_at", DateTime(timezone=True)),  # when its wait took it
)

#: Column names in table order (the PostgreSQL store selects these).
RUN_COLUMNS = tuple(c.name for c in runs.columns)
STEP_COLUMNS = tuple(c.name for c in steps.columns if c.name != "run_id")
