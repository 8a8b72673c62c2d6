"""Databases on the local PostgreSQL server: URLs, and creating and dropping them."""

from __future__ import annotations

from tests.harness.processes import pid_alive
from tests.harness.services import LOCALHOST, PG_ADMIN_DB, PG_PORT

#: Databases a test session creates are named PG_DB_PREFIX + <pid of pytest>.
PG_DB_PREFIX = "pluginhost_test_"


def pg_conninfo(dbname: str) -> str:
    """libpq connection string for a database on the local server (trust auth)."""
    return f"host={LOCALHOST} port={PG_PORT} user=postgres dbname={dbname} connect_timeout=3"


def pg_url(dbname: str) -> str:
    """SQLAlchemy URL (psycopg 3) of a database on the local server."""
    return f"postgresql+psycopg://postgres@{LOCALHOST}:{PG_PORT}/{dbname}"


def create_pg_database(name: str) -> None:
    """Create an empty database (dropping one left over under the same name)."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(pg_conninfo(PG_ADMIN_DB), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def drop_pg_database(name: str) -> None:
    """Drop a database, disconnecting whoever still uses it."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(pg_conninfo(PG_ADMIN_DB), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def drop_stale_pg_databases() -> list[str]:
    """Drop ``pluginhost_test_<pid>`` databases whose pytest process is gone."""
    import psycopg

    with psycopg.connect(pg_conninfo(PG_ADMIN_DB), autocommit=True) as conn:
        names = [
            row[0]
            for row in conn.execute("SELECT datname FROM pg_database WHERE datname LIKE %s", (PG_DB_PREFIX + "%",))
        ]
    stale = [n for n in names if n[len(PG_DB_PREFIX) :].isdigit() and not pid_alive(int(n[len(PG_DB_PREFIX) :]))]
    for name in stale:
        drop_pg_database(name)
    return stale
