"""run cancel: who cancelled a run

``cancelled_by``: the actor of ``Workflows.cancel`` (the run's ``finished_at`` is
when). NULL on every run written before, none of which is cancelled.

Revision ID: w0003
Revises: w0002
"""

import sqlalchemy as sa
from alembic import op

revision = "w0003"
down_revision = "w0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("workflows_runs", sa.Column("cancelled_by", sa.Text, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("workflows_runs") as batch:
        batch.drop_column("cancelled_by")
