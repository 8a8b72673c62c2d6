"""durable waits and signals: workflows_waits, workflows_signals, runs.key

``workflows_waits``: one row per wait a run reached (a ``Sleep`` or a
``WaitFor``), with its due time; workers claim due rows and send the run on.
``workflows_signals``: signals delivered to a run (at most one per name), kept
until the run's wait takes them. ``workflows_runs.key``: the value of the input
field a workflow names as its key (``signal_by_key``), NULL for every run
written before (none of their workflows had waits).

Revision ID: w0004
Revises: w0003
"""

import sqlalchemy as sa
from alembic import op

revision = "w0004"
down_revision = "w0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("workflows_runs", sa.Column("key", sa.String(255), nullable=True))
    op.create_index("workflows_runs_key", "workflows_runs", ["name", "key"])
    op.create_table(
        "workflows_waits",
        sa.Column("run_id", sa.String(64), sa.ForeignKey("workflows_runs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("stage", sa.Integer, primary_key=True),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("signal", sa.String(64)),
        sa.Column("on_timeout", sa.String(8)),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("outcome", sa.String(16)),
        sa.Column("wake_at", sa.DateTime(timezone=True)),
        sa.Column("context", sa.JSON, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("claimed_by", sa.Text),
        sa.Column("claimed_at", sa.DateTime(timezone=True)),
        sa.Column("woke_at", sa.DateTime(timezone=True)),
    )
    op.create_index("workflows_waits_due", "workflows_waits", ["status", "wake_at"])
    op.create_table(
        "workflows_signals",
        sa.Column("run_id", sa.String(64), sa.ForeignKey("workflows_runs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("payload", sa.JSON, nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.Text),
        sa.Column("consumed_at", sa.DateTime(timezone=True)),
    )


def downgrade() -> None:
    op.drop_table("workflows_signals")
    op.drop_index("workflows_waits_due", table_name="workflows_waits")
    op.drop_table("workflows_waits")
    op.drop_index("workflows_runs_key", table_name="workflows_runs")
    with op.batch_alter_table("workflows_runs") as batch:
        batch.drop_column("key")
