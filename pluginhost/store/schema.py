"""Table definitions shared by the SQLAlchemy store and its migrations."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

metadata = MetaData()

plugins = Table(
    "pluginhost_plugins",
    metadata,
    Column("slug", String(64), primary_key=True),
    Column("kind", String(16), nullable=False),
    Column("enabled", Boolean, nullable=False),
    Column("config", JSON, nullable=False),
    Column("sort", Integer, nullable=False),
    Column("label_en", Text, nullable=False),
    Column("label_ar", Text, nullable=False),
    Column("version", BigInteger, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    # The store revision of the row's last change, set by the trigger that moves
    # the revision (0003): a process at revision N reads only the rows above N.
    Column("change_revision", BigInteger, nullable=False, server_default="0"),
    Index("ix_pluginhost_plugins_change_revision", "change_revision"),
)

audit = Table(
    "pluginhost_audit",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("actor", Text, nullable=True),
    Column("slug", String(64), nullable=False),
    Column("action", String(32), nullable=False),
    Column("before", JSON, nullable=True),
    Column("after", JSON, nullable=True),
    Index("ix_pluginhost_audit_slug_id", "slug", "id"),
    Index("ix_pluginhost_audit_actor_id", "actor", "id"),
)

revision = Table(
    "pluginhost_revision",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("revision", BigInteger, nullable=False),
    # Changes since a revision below this one cannot be proven complete (deletions
    # pruned, a TRUNCATE, the upgrade to 0003): such a reader loads everything.
    Column("horizon", BigInteger, nullable=False, server_default="0"),
)

# One row per deleted slug (its latest deletion), written by a trigger, also for a
# slug renamed by direct SQL: how a process following changes sees deletions.
deletions = Table(
    "pluginhost_deletions",
    metadata,
    Column("slug", String(64), primary_key=True),
    Column("change_revision", BigInteger, nullable=False),
    Index("ix_pluginhost_deletions_change_revision", "change_revision"),
)

# Workers that are alive: each worker's main process reports itself here on
# start and every ``pluginhost_heartbeat_interval_s`` seconds, and removes its row
# when it stops. ``wait=True`` admin calls use it to know how many
# acknowledgements to expect.
workers = Table(
    "pluginhost_workers",
    metadata,
    Column("hostname", String(255), primary_key=True),
    Column("revision", BigInteger, nullable=False),
    Column("seen_at", DateTime(timezone=True), nullable=False),
)
