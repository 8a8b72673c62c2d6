"""workflow definitions (versioned), runs and step runs

Revision ID: w0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "w0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "workflows_definitions",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("definition", sa.JSON, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.Text, nullable=True),
    )
    op.create_table(
        "workflows_runs",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("input", sa.JSON, nullable=False),
        sa.Column("context", sa.JSON, nullable=False),
        sa.Column("output", sa.JSON, nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    )
    # runs(status=...) and runs(name=...) list newest first.
    op.create_index("ix_workflows_runs_status_created", "workflows_runs", ["status", "created_at"])
    op.create_index("ix_workflows_runs_name_created", "workflows_runs", ["name", "created_at"])
    op.create_index("ix_workflows_runs_created", "workflows_runs", ["created_at"])
    op.create_table(
        "workflows_steps",
        sa.Column("run_id", sa.String(64), sa.ForeignKey("workflows_runs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("position", sa.Integer, primary_key=True),
        sa.Column("stage", sa.Integer, nullable=False),
        sa.Column("slug", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("output", sa.JSON, nullable=True),
        sa.Column("plugin_version", sa.BigInteger, nullable=True),
        sa.Column("worker", sa.Text, nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_workflows_steps_status", "workflows_steps", ["status"])


def downgrade() -> None:
    op.drop_table("workflows_steps")
    op.drop_table("workflows_runs")
    op.drop_table("workflows_definitions")
