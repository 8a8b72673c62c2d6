"""Emptying a store database between tests, keeping its tables and migrations."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.harness.services import LOCALHOST, PG_PORT

#: Rows the migrations insert, which the code expects to find: put back after a
#: table is emptied (alembic will not run the migration again). Keep in step with
#: pluginhost/store/migrations and workflows/migrations.
SEED_ROWS: dict[str, str] = {
    "pluginhost_revision": "INSERT INTO pluginhost_revision (id, revision) VALUES (1, 0)",
}


def empty_store(url: str, lock_timeout_s: float = 10.0) -> list[str]:
    """Empty every table of the store database, keeping the tables themselves.

    PostgreSQL: ``TRUNCATE ... RESTART IDENTITY CASCADE`` on every table in the
    search path. SQLite: ``DELETE FROM`` each table and reset AUTOINCREMENT
    counters. Tables whose name contains ``alembic_version`` keep their rows;
    emptied tables named in :data:`SEED_ROWS` get their seed rows back, as a
    fresh migration leaves them. Returns the names of the emptied tables.
    """
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "postgresql":
        return _empty_postgres(parsed, lock_timeout_s)
    if backend == "sqlite":
        return _empty_sqlite(parsed.database or "")
    raise ValueError(f"empty_store does not know how to empty {backend!r} ({url})")


def _keep(table: str) -> bool:
    return "alembic_version" in table


def _empty_postgres(parsed: Any, lock_timeout_s: float) -> list[str]:
    import psycopg
    from psycopg import sql

    with psycopg.connect(
        host=parsed.host or LOCALHOST,
        port=parsed.port or PG_PORT,
        user=parsed.username or "postgres",
        password=parsed.password,
        dbname=parsed.database,
        connect_timeout=3,
    ) as conn:
        rows = conn.execute(
            "SELECT schemaname, tablename FROM pg_tables "
            "WHERE schemaname = ANY(current_schemas(false)) ORDER BY tablename"
        ).fetchall()
        tables = [(schema, name) for schema, name in rows if not _keep(name)]
        if tables:
            # a worker left holding a lock should fail the test, not hang it
            conn.execute(f"SET lock_timeout = '{int(lock_timeout_s * 1000)}ms'")
            conn.execute(
                sql.SQL("TRUNCATE {} RESTART IDENTITY CASCADE").format(
                    sql.SQL(", ").join(sql.Identifier(s, t) for s, t in tables)
                )
            )
            for _, name in tables:
                if name in SEED_ROWS:
                    conn.execute(SEED_ROWS[name])
        conn.commit()
    return [name for _, name in tables]


def _empty_sqlite(path: str) -> list[str]:
    import sqlite3

    if not path or path == ":memory:" or not Path(path).exists():
        return []
    with sqlite3.connect(path, timeout=30) as db:
        names = [
            row[0]
            for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")
        ]
        tables = [n for n in names if not _keep(n)]
        for name in tables:
            db.execute(f'DELETE FROM "{name}"')
        has_sequence = db.execute("SELECT 1 FROM sqlite_master WHERE name = 'sqlite_sequence'").fetchone()
        if has_sequence:
            db.execute("DELETE FROM sqlite_sequence")
        for name in tables:
            if name in SEED_ROWS:
                db.execute(SEED_ROWS[name])
    db.close()
    return tables
