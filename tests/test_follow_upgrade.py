"""The upgrade to migration 0003 (change revisions, deletions) on a populated
database, on SQLite and PostgreSQL.

A store is built with migrations 0001+0002 and populated as the code of that
schema left it (plugins, audit rows, a worker), a process loads its view, and
the database is upgraded the way a deployment does (``store.migrate()``).
Nothing may be lost, and the process that loaded before the upgrade follows the
first changes after it incrementally.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from sqlalchemy import Engine, inspect, select, text

from pluginhost import Plugin, PluginHost
from pluginhost.store import SQLAlchemyStore, schema
from pluginhost.store.sql import MIGRATIONS
from tests.test_follow import CountingStore

TABLES = ("pluginhost_plugins", "pluginhost_audit", "pluginhost_revision", "pluginhost_workers")


def _migrate_to(engine: Engine, revision: str) -> None:
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def _rows(engine: Engine, columns: dict[str, set[str]]) -> dict[str, list[dict[str, Any]]]:
    out = {}
    with engine.connect() as conn:
        for name in TABLES:
            table = schema.metadata.tables[name]
            cols = [c for c in table.c if c.name in columns[name]]
            key = [c for c in table.primary_key.columns]
            out[name] = [dict(r._mapping) for r in conn.execute(select(*cols).order_by(*key))]
    return out


@pytest.fixture(params=["sqlite", "postgres"])
def old_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database with the pluginhost schema at 0002 and nothing else."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'old.db'}"
    else:
        url = str(request.getfixturevalue("empty_pg_url"))
    store = SQLAlchemyStore(url)
    with store.engine.begin() as conn:
        for table in (*TABLES, "pluginhost_deletions", "pluginhost_alembic_version"):
            conn.execute(text(f"DROP TABLE IF EXISTS {table}"))
        if request.param == "postgres":
            conn.execute(text("DROP FUNCTION IF EXISTS pluginhost_bump_revision() CASCADE"))
    _migrate_to(store.engine, "0002")
    store.close()
    yield url


def test_the_upgrade_to_0003_keeps_every_row_and_follow_is_incremental_after_it(old_url: str) -> None:
    store = CountingStore(old_url)
    engine = store.engine
    assert "change_revision" not in {c["name"] for c in inspect(engine).get_columns("pluginhost_plugins")}
    # the 0002 schema, written by the store's code (its columns are those of 0002)
    for i in range(30):
        store.upsert(Plugin(slug=f"p{i:02d}", sort=i, config={"n": i}), actor="before")
    store.update("p01", {"enabled": False}, action="disable", actor="before")
    store.update("p02", {"config": {"n": 200}}, action="configure", actor="before")
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM pluginhost_plugins WHERE slug = 'p29'"))
    store.report_worker("old@host", store.revision())

    app = Celery("upgrade", broker="memory://", backend="cache+memory://")
    app.conf.pluginhost_auto_migrate = False  # a process of the old deployment: it does not migrate
    host = PluginHost(app, store=store)
    assert len(host.list()) == 29
    with engine.begin() as conn:  # followed on the old schema: no change feed, a full load
        conn.execute(text("UPDATE pluginhost_plugins SET sort = 100 WHERE slug = 'p03'"))
    assert host.get("p03").sort == 100 and store.loads == 2

    old_columns = {t: {c["name"] for c in inspect(engine).get_columns(t)} for t in TABLES}
    before = _rows(engine, old_columns)
    revision = store.revision()

    store.migrate()

    assert _rows(engine, old_columns) == before  # nothing lost, nothing changed
    assert store.revision() == revision  # the upgrade itself changes no record
    with engine.connect() as conn:
        stamps = set(conn.execute(text("SELECT change_revision FROM pluginhost_plugins")).scalars())
        horizon = conn.execute(text("SELECT horizon FROM pluginhost_revision")).scalar_one()
    assert stamps == {revision} and horizon == revision
    assert list(store.live_workers(within_s=60)) == ["old@host"]
    assert [e.action for e in store.audit("p01")] == ["disable", "create"]

    # the view loaded before the upgrade follows the first changes after it incrementally
    store.reset()
    other = PluginHost(Celery("other", broker="memory://"), store=old_url)
    other.disable("p04", actor="after")
    assert host.is_enabled("p04") is False
    assert (store.loads, store.rows) == (0, 1)
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM pluginhost_plugins WHERE slug = 'p05'"))
        conn.execute(text("UPDATE pluginhost_plugins SET enabled = false WHERE sort < 3"))
    assert host.get("p05") is None and host.is_enabled("p00") is False
    assert (store.loads, store.rows) == (0, 4)
    full = {p.slug: p.model_dump(mode="json") for p in SQLAlchemyStore.load(store)[1]}
    assert {p.slug: p.model_dump(mode="json") for p in host.list()} == full
    assert [e.action for e in store.audit("p04")] == ["disable", "create"]
    other.store.close()
    store.close()
