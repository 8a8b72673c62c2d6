"""plugins, audit log, revision counter and the triggers that bump it

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_PG_FUNCTION = """
CREATE OR REPLACE FUNCTION pluginhost_bump_revision() RETURNS trigger AS $$
DECLARE r bigint;
BEGIN
    UPDATE pluginhost_revision SET revision = revision + 1 WHERE id = 1 RETURNING revision INTO r;
    PERFORM pg_notify('pluginhost', r::text);
    RETURN NULL;
END $$ LANGUAGE plpgsql
"""


def upgrade() -> None:
    op.create_table(
        "pluginhost_plugins",
        sa.Column("slug", sa.String(64), primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("enabled", sa.Boolean, nullable=False),
        sa.Column("config", sa.JSON, nullable=False),
        sa.Column("sort", sa.Integer, nullable=False),
        sa.Column("label_en", sa.Text, nullable=False),
        sa.Column("label_ar", sa.Text, nullable=False),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_pluginhost_plugins_sort_slug", "pluginhost_plugins", ["sort", "slug"])
    op.create_table(
        "pluginhost_audit",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.Text, nullable=True),
        sa.Column("slug", sa.String(64), nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("before", sa.JSON, nullable=True),
        sa.Column("after", sa.JSON, nullable=True),
    )
    op.create_index("ix_pluginhost_audit_slug_id", "pluginhost_audit", ["slug", "id"])
    op.create_index("ix_pluginhost_audit_actor_id", "pluginhost_audit", ["actor", "id"])
    op.create_table(
        "pluginhost_revision",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("revision", sa.BigInteger, nullable=False),
    )
    op.execute("INSERT INTO pluginhost_revision (id, revision) VALUES (1, 0)")

    # The revision moves on every change to the plugins table, whoever makes it
    # (the store, a migration, an admin's direct SQL): workers poll this one row.
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_PG_FUNCTION)
        op.execute(
            "CREATE TRIGGER pluginhost_plugins_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE"
            " ON pluginhost_plugins FOR EACH STATEMENT EXECUTE FUNCTION pluginhost_bump_revision()"
        )
    else:
        for event in ("INSERT", "UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER pluginhost_plugins_{event.lower()} AFTER {event} ON pluginhost_plugins"
                " BEGIN UPDATE pluginhost_revision SET revision = revision + 1 WHERE id = 1; END"
            )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS pluginhost_plugins_changed ON pluginhost_plugins")
        op.execute("DROP FUNCTION IF EXISTS pluginhost_bump_revision()")
    op.drop_table("pluginhost_revision")
    op.drop_table("pluginhost_audit")
    op.drop_table("pluginhost_plugins")
