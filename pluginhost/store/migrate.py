"""Run a package's Alembic migrations programmatically, safely when processes race."""

from __future__ import annotations

import fcntl
from pathlib import Path
from typing import IO

from sqlalchemy import Connection, Engine, text
from sqlalchemy.engine import make_url


def migrate(engine: Engine, script_location: Path, version_table: str) -> None:
    """Upgrade ``engine`` to the newest revision under ``script_location``.

    Cheap when already current (one read). Concurrent callers (several workers
    starting at once) serialise on a PostgreSQL advisory lock or a lock file.
    """
    # Imported here: alembic costs ~0.5 s to import, and most processes
    # (workers, CLI calls) find the schema current and never need it.
    from alembic import command
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", str(script_location))
    head = ScriptDirectory.from_config(cfg).get_current_head()
    if _current(engine, version_table) == head:
        return
    with _lock(engine, version_table):
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")


def run_env(version_table: str) -> None:
    """The body of an Alembic ``env.py``: migrate the connection ``migrate()``
    hands over (or the configured URL) with ``version_table``."""
    from alembic import context
    from sqlalchemy import create_engine

    config = context.config

    def run(conn: Connection) -> None:
        context.configure(connection=conn, version_table=version_table)
        with context.begin_transaction():
            context.run_migrations()

    connection = config.attributes.get("connection")
    if connection is not None:
        run(connection)
        return
    with create_engine(config.get_main_option("sqlalchemy.url") or "").connect() as conn:
        run(conn)


def _current(engine: Engine, version_table: str) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"version_table": version_table})
        return ctx.get_current_revision()


class _lock:
    def __init__(self, engine: Engine, name: str) -> None:
        self.engine = engine
        self.name = name
        self.conn: Connection | None = None
        self.fh: IO[str] | None = None

    def __enter__(self) -> None:
        if self.engine.dialect.name == "postgresql":
            self.conn = self.engine.connect()
            self.conn.execute(text("SELECT pg_advisory_lock(hashtext(:n))"), {"n": self.name})
            self.conn.commit()
        else:
            db = make_url(str(self.engine.url)).database or ""
            if db and db != ":memory:":
                self.fh = open(db + ".migrate.lock", "w")
                fcntl.flock(self.fh, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        if self.conn is not None:
            self.conn.execute(text("SELECT pg_advisory_unlock(hashtext(:n))"), {"n": self.name})
            self.conn.commit()
            self.conn.close()
        if self.fh is not None:
            fcntl.flock(self.fh, fcntl.LOCK_UN)
            self.fh.close()
