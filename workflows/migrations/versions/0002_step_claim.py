"""step claim: who holds a running step and which message claimed it

``owner``: the claiming process (its PostgreSQL session, or host:pid:thread on
SQLite), so a duplicate delivery tells a live owner from a dead one.
``task_id``: the claiming message, so a repeat of that very message (which
already sent what follows the step) is told from another canvas's delivery of
the same step (a resume's, a repeated start's). Both are NULL on rows written
before: such a step is treated as it was before (its owner unknown).

Revision ID: w0002
Revises: w0001
"""

import sqlalchemy as sa
from alembic import op

revision = "w0002"
down_revision = "w0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("workflows_steps", sa.Column("owner", sa.Text, nullable=True))
    op.add_column("workflows_steps", sa.Column("task_id", sa.Text, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("workflows_steps") as batch:
        batch.drop_column("task_id")
        batch.drop_column("owner")
