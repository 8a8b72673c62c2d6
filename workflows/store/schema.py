"""The workflow tables, as the code reads and writes them (one definition).

The migrations under ``workflows/migrations`` are the history that builds them;
``tests/test_workflows_upgrade.py`` holds the migrated schema equal to this one.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import JSON, BigInteger, Column, DateTime, ForeignKey, Integer, MetaData, String, Table, Text

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

#: Column names in table order (the PostgreSQL store selects these).
RUN_COLUMNS = tuple(c.name for c in runs.columns)
STEP_COLUMNS = tuple(c.name for c in steps.columns if c.name != "run_id")
