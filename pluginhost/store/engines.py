"""The engines of ``SQLAlchemyStore``: its own pool and the public one, on SQLite
or PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url

from ..errors import StoreUnavailable
from .deadline import Call
from .postgres import KEEPALIVE, watch_pool

#: How long SQLite admin writes wait for the database file's write lock.
SQLITE_ADMIN_BUSY_S = 30.0


def make_engine(
    url: str,
    dialect: str,
    timeout_s: float,
    pool_size: int,
    current_call: Callable[[], Call | None],
    *,
    own: bool,
) -> Engine:
    """An engine for ``url``. ``own``: the pool of this store's calls (server-side
    timeouts, per-call SQLite busy timeout); else the public one (no timeouts
    imposed on migrations, the workflows store or direct SQL)."""
    if dialect == "sqlite":
        path = make_url(url).database
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": SQLITE_ADMIN_BUSY_S, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _connect(dbapi_conn: Any, _record: Any) -> None:
            # Let SQLAlchemy emit BEGIN itself so writers can take the lock up front.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA busy_timeout={int(SQLITE_ADMIN_BUSY_S * 1000)}")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin(conn: Connection) -> None:
            options = conn.get_execution_options()
            busy_ms = options.get("pluginhost_busy_ms")
            if busy_ms is not None and conn.info.get("pluginhost_busy_ms") != busy_ms:
                # how long this call may wait for the file lock (its deadline)
                conn.exec_driver_sql(f"PRAGMA busy_timeout={int(busy_ms)}")
                conn.info["pluginhost_busy_ms"] = busy_ms
            # Writers serialise on BEGIN IMMEDIATE: read-modify-write is atomic.
            conn.exec_driver_sql("BEGIN IMMEDIATE" if options.get("pluginhost_write") else "BEGIN")

        return engine
    if dialect == "postgresql":
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise StoreUnavailable('PostgreSQL needs psycopg 3: pip install "pluginhost[postgres]"') from None
        engine = create_engine(
            url,
            pool_size=pool_size,
            # own pool: a call that waits for a free connection waits within its
            # deadline, and pings within it (watch_pool); the public one as before
            pool_timeout=timeout_s if own else 30.0,
            pool_pre_ping=not own,
            connect_args={"connect_timeout": max(2, round(timeout_s)), **KEEPALIVE},
        )
        watch_pool(engine, current_call, timeout_s if own else None)
        return engine
    return create_engine(url)
