"""per-row change revisions and a table of deletions, for incremental follow

Revision ID: 0003
Revises: 0002

A process at revision N reads only the rows whose ``change_revision`` is above N
and the slugs deleted above N. The triggers that move the store revision now also
stamp each inserted or updated row with the revision of its change and record
each deleted (or renamed) slug, so direct SQL is followed like the store's own
writes. ``pluginhost_revision.horizon``: changes since a revision below it cannot
be proven complete (deletions pruned, a TRUNCATE); a reader that far behind loads
everything. The upgrade sets it to the current revision: a process that loaded
before the upgrade at that revision follows incrementally from there, one further
behind loads everything once.

PostgreSQL: the revision moves once per statement, after its rows, as before; the
row lock on ``pluginhost_revision`` is held until commit, so revisions are handed
out in commit order and a snapshot that reads revision R holds every change
stamped R or less, and none above. SQLite: once per row, as before (writers are
serialised by the database lock). The NOTIFY of 0001 is gone: nothing listens.

A column added to ``pluginhost_plugins`` later must be added to the SQLite update
trigger's column list (an update of ``change_revision`` alone fires nothing, so
the trigger's own stamping cannot recurse).
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_DATA_COLUMNS = "slug, kind, enabled, config, sort, label_en, label_ar, version, updated_at"

# The triggers run AFTER ... FOR EACH STATEMENT, as in 0001: a statement takes its
# row locks before the revision row's, the order every writer uses, so a bulk
# UPDATE and an admin write cannot deadlock. Each moves the revision once, then
# stamps the statement's rows with it: an UPDATE of rows this transaction has
# already locked, flagged so that it does not move the revision again (a flag, not
# pg_trigger_depth(): a change made by another table's trigger must still count).
# One function per event: a transition table exists only for its own event.
_PG_FUNCTIONS = {
    "pluginhost_next_revision": """
CREATE OR REPLACE FUNCTION pluginhost_next_revision() RETURNS bigint AS $$
DECLARE r bigint;
BEGIN
    UPDATE pluginhost_revision SET revision = revision + 1 WHERE id = 1 RETURNING revision INTO r;
    RETURN r;
END $$ LANGUAGE plpgsql
""",
    "pluginhost_stamp_rows": """
CREATE OR REPLACE FUNCTION pluginhost_stamp_rows(slugs text[], r bigint) RETURNS void AS $$
BEGIN
    PERFORM set_config('pluginhost.stamping', 'on', true);
    UPDATE pluginhost_plugins SET change_revision = r WHERE slug = ANY (slugs);
    PERFORM set_config('pluginhost.stamping', 'off', true);
END $$ LANGUAGE plpgsql
""",
    "pluginhost_rows_inserted": """
CREATE OR REPLACE FUNCTION pluginhost_rows_inserted() RETURNS trigger AS $$
BEGIN
    PERFORM pluginhost_stamp_rows(ARRAY(SELECT slug FROM new_rows), pluginhost_next_revision());
    RETURN NULL;
END $$ LANGUAGE plpgsql
""",
    "pluginhost_rows_updated": """
CREATE OR REPLACE FUNCTION pluginhost_rows_updated() RETURNS trigger AS $$
DECLARE r bigint;
BEGIN
    IF current_setting('pluginhost.stamping', true) = 'on' THEN
        RETURN NULL;
    END IF;
    r := pluginhost_next_revision();
    -- the old slug of a row renamed by direct SQL is gone: a deletion
    INSERT INTO pluginhost_deletions (slug, change_revision)
        SELECT o.slug, r FROM old_rows o WHERE NOT EXISTS (SELECT 1 FROM new_rows n WHERE n.slug = o.slug)
        ON CONFLICT (slug) DO UPDATE SET change_revision = EXCLUDED.change_revision;
    PERFORM pluginhost_stamp_rows(ARRAY(SELECT slug FROM new_rows), r);
    RETURN NULL;
END $$ LANGUAGE plpgsql
""",
    "pluginhost_rows_deleted": """
CREATE OR REPLACE FUNCTION pluginhost_rows_deleted() RETURNS trigger AS $$
DECLARE r bigint;
BEGIN
    r := pluginhost_next_revision();
    INSERT INTO pluginhost_deletions (slug, change_revision)
        SELECT slug, r FROM old_rows
        ON CONFLICT (slug) DO UPDATE SET change_revision = EXCLUDED.change_revision;
    RETURN NULL;
END $$ LANGUAGE plpgsql
""",
    # every row is gone and no deletion is recorded: nobody behind can follow it
    "pluginhost_bump_revision": """
CREATE OR REPLACE FUNCTION pluginhost_bump_revision() RETURNS trigger AS $$
BEGIN
    UPDATE pluginhost_revision SET revision = revision + 1, horizon = revision + 1 WHERE id = 1;
    RETURN NULL;
END $$ LANGUAGE plpgsql
""",
}

#: (trigger, event, transition tables, function)
_PG_TRIGGERS = [
    ("pluginhost_plugins_inserted", "INSERT", "REFERENCING NEW TABLE AS new_rows", "pluginhost_rows_inserted"),
    (
        "pluginhost_plugins_updated",
        "UPDATE",
        "REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows",
        "pluginhost_rows_updated",
    ),
    ("pluginhost_plugins_deleted", "DELETE", "REFERENCING OLD TABLE AS old_rows", "pluginhost_rows_deleted"),
    ("pluginhost_plugins_truncated", "TRUNCATE", "", "pluginhost_bump_revision"),
]

_PG_0001_FUNCTION = """
CREATE OR REPLACE FUNCTION pluginhost_bump_revision() RETURNS trigger AS $$
DECLARE r bigint;
BEGIN
    UPDATE pluginhost_revision SET revision = revision + 1 WHERE id = 1 RETURNING revision INTO r;
    PERFORM pg_notify('pluginhost', r::text);
    RETURN NULL;
END $$ LANGUAGE plpgsql
"""

_SQLITE_BUMP = "UPDATE pluginhost_revision SET revision = revision + 1 WHERE id = 1;"
_SQLITE_STAMP = (
    "UPDATE pluginhost_plugins SET change_revision = (SELECT revision FROM pluginhost_revision WHERE id = 1)"
    " WHERE slug = NEW.slug;"
)
_SQLITE_RECORD = (
    "INSERT INTO pluginhost_deletions (slug, change_revision)"
    " SELECT OLD.slug, revision FROM pluginhost_revision WHERE id = 1{also}"
    " ON CONFLICT (slug) DO UPDATE SET change_revision = excluded.change_revision;"
)

_SQLITE_TRIGGERS = {
    "insert": f"AFTER INSERT ON pluginhost_plugins BEGIN {_SQLITE_BUMP} {_SQLITE_STAMP} END",
    "update": (
        f"AFTER UPDATE OF {_DATA_COLUMNS} ON pluginhost_plugins BEGIN {_SQLITE_BUMP}"
        f" {_SQLITE_RECORD.format(also=' AND OLD.slug <> NEW.slug')} {_SQLITE_STAMP} END"
    ),
    "delete": f"AFTER DELETE ON pluginhost_plugins BEGIN {_SQLITE_BUMP} {_SQLITE_RECORD.format(also='')} END",
}


def upgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    op.add_column("pluginhost_plugins", sa.Column("change_revision", sa.BigInteger, nullable=False, server_default="0"))
    op.add_column("pluginhost_revision", sa.Column("horizon", sa.BigInteger, nullable=False, server_default="0"))
    op.create_table(
        "pluginhost_deletions",
        sa.Column("slug", sa.String(64), primary_key=True),
        sa.Column("change_revision", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_pluginhost_deletions_change_revision", "pluginhost_deletions", ["change_revision"])

    # The backfill must not move the revision (the rows do not change): the old
    # triggers go first, the new ones come after it.
    if postgres:
        op.execute("DROP TRIGGER IF EXISTS pluginhost_plugins_changed ON pluginhost_plugins")
    else:
        for event in ("insert", "update", "delete"):
            op.execute(f"DROP TRIGGER IF EXISTS pluginhost_plugins_{event}")
    op.execute(
        "UPDATE pluginhost_plugins SET change_revision = (SELECT revision FROM pluginhost_revision WHERE id = 1)"
    )
    op.execute("UPDATE pluginhost_revision SET horizon = revision WHERE id = 1")
    op.create_index("ix_pluginhost_plugins_change_revision", "pluginhost_plugins", ["change_revision"])

    if postgres:
        for body in _PG_FUNCTIONS.values():
            op.execute(body)
        for name, event, tables, function in _PG_TRIGGERS:
            op.execute(
                f"CREATE TRIGGER {name} AFTER {event} ON pluginhost_plugins {tables}"
                f" FOR EACH STATEMENT EXECUTE FUNCTION {function}()"
            )
    else:
        for event, body in _SQLITE_TRIGGERS.items():
            op.execute(f"CREATE TRIGGER pluginhost_plugins_{event} {body}")


def downgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    if postgres:
        for name, *_ in _PG_TRIGGERS:
            op.execute(f"DROP TRIGGER IF EXISTS {name} ON pluginhost_plugins")
        for function in _PG_FUNCTIONS:
            if function != "pluginhost_bump_revision":  # 0001's name: replaced below
                args = "text[], bigint" if function == "pluginhost_stamp_rows" else ""
                op.execute(f"DROP FUNCTION IF EXISTS {function}({args})")
    else:
        for event in ("insert", "update", "delete"):
            op.execute(f"DROP TRIGGER IF EXISTS pluginhost_plugins_{event}")
    op.drop_index("ix_pluginhost_plugins_change_revision", "pluginhost_plugins")
    op.drop_column("pluginhost_plugins", "change_revision")
    op.drop_column("pluginhost_revision", "horizon")
    op.drop_index("ix_pluginhost_deletions_change_revision", "pluginhost_deletions")
    op.drop_table("pluginhost_deletions")
    if postgres:
        op.execute(_PG_0001_FUNCTION)
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
