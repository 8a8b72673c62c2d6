"""SQLAlchemyStore: plugin records in SQLite or PostgreSQL."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, create_engine, delete, event, insert, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from ..errors import ConcurrentUpdate, PluginNotFound, StoreUnavailable
from ..model import AuditEntry, Kind, Plugin
from . import schema
from .base import MUTABLE_FIELDS, Written, audit_records, next_version
from .migrate import migrate

log = logging.getLogger("pluginhost.store")
T = TypeVar("T")

MIGRATIONS = Path(__file__).with_name("migrations")
_PLUGIN_COLUMNS = [c for c in schema.plugins.c]


class SQLAlchemyStore:
    """``Store`` on SQLAlchemy Core; tested on SQLite and PostgreSQL (psycopg 3).

    ``url`` is any SQLAlchemy URL (``sqlite:///path.db``,
    ``postgresql+psycopg://user@host/db``). The schema is managed by Alembic
    (``migrate()``, or ``pluginhost db upgrade``). ``connect_timeout_s`` bounds how
    long a call waits for an unreachable database before ``StoreUnavailable``.
    """

    def __init__(self, url: str, *, connect_timeout_s: float = 2.0, pool_size: int = 5) -> None:
        self.url = _normalise_url(url)
        self.dialect = make_url(self.url).get_backend_name()
        self.connect_timeout_s = connect_timeout_s
        self._engine = _make_engine(self.url, self.dialect, connect_timeout_s, pool_size)
        self._local = threading.local()
        self._pid = os.getpid()

    # -- schema ----------------------------------------------------------------

    def migrate(self) -> None:
        """Bring the schema to the newest migration (idempotent, safe to race)."""
        self._guard(lambda: migrate(self._engine, MIGRATIONS, "pluginhost_alembic_version"))

    @property
    def engine(self) -> Engine:
        return self._engine

    # -- reads -----------------------------------------------------------------

    def revision(self) -> int:
        # The hot path (every dispatch check, worker polls and refreshes): one
        # primary-key read, one round trip, on a driver connection kept per thread
        # in autocommit (no BEGIN/ROLLBACK), without SQLAlchemy's per-call overhead.
        for attempt in (1, 2):
            fresh = getattr(self._local, "cursor", None) is None
            try:
                return self._raw_cursor()()
            except Exception as exc:
                self._drop_raw()
                if _is_missing_table(exc):
                    return 0
                if fresh or attempt == 2:
                    # a new connection failed too: the store is really unreachable
                    raise StoreUnavailable(f"store {self._safe_url()} is unreachable: {_reason(exc)}") from None
                # the kept connection died (an outage that is over): retry on a new one
        raise AssertionError("unreachable")

    def load(self) -> tuple[int, list[Plugin]]:
        def read(conn: Connection) -> tuple[int, list[Plugin]]:
            rev = conn.execute(select(schema.revision.c.revision)).scalar_one()
            rows = conn.execute(
                select(*_PLUGIN_COLUMNS).order_by(schema.plugins.c.sort, schema.plugins.c.slug)
            )
            return int(rev), [_plugin(r._mapping) for r in rows]

        return self._read(read)

    def get(self, slug: str) -> Plugin | None:
        def read(conn: Connection) -> Plugin | None:
            row = conn.execute(
                select(*_PLUGIN_COLUMNS).where(schema.plugins.c.slug == slug)
            ).first()
            return _plugin(row._mapping) if row else None

        return self._read(read)

    def audit(
        self, slug: str | None = None, *, actor: str | None = None, limit: int = 100
    ) -> list[AuditEntry]:
        def read(conn: Connection) -> list[AuditEntry]:
            q = select(schema.audit).order_by(schema.audit.c.id.desc()).limit(limit)
            if slug is not None:
                q = q.where(schema.audit.c.slug == slug)
            if actor is not None:
                q = q.where(schema.audit.c.actor == actor)
            return [AuditEntry.model_validate(dict(r._mapping)) for r in conn.execute(q)]

        return self._read(read)

    # -- writes ----------------------------------------------------------------

    def upsert(
        self, plugin: Plugin, *, actor: str | None = None, expected_version: int | None = None
    ) -> Written:
        def write(conn: Connection) -> Written:
            current = self._locked(conn, plugin.slug)
            if current is None:
                if expected_version not in (None, 0):
                    raise ConcurrentUpdate(
                        f"plugin '{plugin.slug}': expected version {expected_version}, but it does not exist"
                    )
                new = self._insert(conn, plugin, actor)
                return Written(new, self._current_revision(conn), True)
            fields = {f: getattr(plugin, f) for f in MUTABLE_FIELDS}
            return self._apply(conn, current, fields, "register", actor, expected_version)

        return self._write(write)

    def update(
        self,
        slug: str,
        changes: dict[str, Any],
        *,
        action: str,
        actor: str | None = None,
        expected_version: int | None = None,
    ) -> Written:
        def write(conn: Connection) -> Written:
            current = self._locked(conn, slug)
            if current is None:
                raise PluginNotFound(f"plugin '{slug}' not found")
            return self._apply(conn, current, changes, action, actor, expected_version)

        return self._write(write)

    def ensure(self, plugins: Iterable[Plugin], *, actor: str | None = None) -> list[Plugin]:
        wanted = {p.slug: p for p in plugins}
        if not wanted:
            return []

        def write(conn: Connection) -> list[Plugin]:
            have = set(
                conn.execute(
                    select(schema.plugins.c.slug).where(schema.plugins.c.slug.in_(list(wanted)))
                ).scalars()
            )
            return [self._insert(conn, p, actor) for s, p in wanted.items() if s not in have]

        return self._write(write)

    # -- the worker registry ---------------------------------------------------

    def report_worker(self, hostname: str, revision: int) -> None:
        def write(conn: Connection) -> None:
            now = _now()
            workers = schema.workers
            done = conn.execute(
                update(workers).where(workers.c.hostname == hostname).values(revision=revision, seen_at=now)
            )
            if done.rowcount == 0:
                conn.execute(insert(workers).values(hostname=hostname, revision=revision, seen_at=now))

        self._write(write)

    def forget_worker(self, hostname: str) -> None:
        self._write(lambda conn: conn.execute(delete(schema.workers).where(schema.workers.c.hostname == hostname)))

    def live_workers(self, within_s: float) -> dict[str, int]:
        cutoff = _now() - timedelta(seconds=within_s)
        workers = schema.workers

        def read(conn: Connection) -> dict[str, int]:
            rows = conn.execute(select(workers.c.hostname, workers.c.revision).where(workers.c.seen_at >= cutoff))
            return {name: int(rev) for name, rev in rows}

        return self._read(read)

    def close(self) -> None:
        self._drop_raw()
        self._engine.dispose()

    def after_fork(self) -> None:
        """Forget connections inherited from a parent process (call in a forked child)."""
        self._local = threading.local()
        self._engine.dispose(close=False)
        self._pid = os.getpid()

    # -- internals -------------------------------------------------------------

    def _locked(self, conn: Connection, slug: str) -> Plugin | None:
        q = select(*_PLUGIN_COLUMNS).where(schema.plugins.c.slug == slug)
        if self.dialect == "postgresql":
            q = q.with_for_update()
        row = conn.execute(q).first()
        return _plugin(row._mapping) if row else None

    def _insert(self, conn: Connection, plugin: Plugin, actor: str | None) -> Plugin:
        new = plugin.model_copy(update={"version": 1, "updated_at": _now()})
        conn.execute(insert(schema.plugins).values(**_row(new)))
        self._log(conn, None, new, "create", actor)
        return new

    def _apply(
        self,
        conn: Connection,
        current: Plugin,
        changes: dict[str, Any],
        action: str,
        actor: str | None,
        expected_version: int | None,
    ) -> Written:
        new = next_version(current, changes, expected_version)
        if new is None:
            return Written(current, self._current_revision(conn), False)
        # The version predicate makes the write conditional even where the row
        # lock is weak (SQLite serialises writers instead): no lost update.
        done = conn.execute(
            update(schema.plugins)
            .where(schema.plugins.c.slug == current.slug)
            .where(schema.plugins.c.version == current.version)
            .values(**_row(new))
        )
        if done.rowcount != 1:
            raise ConcurrentUpdate(f"plugin '{current.slug}' changed during the update; try again")
        self._log(conn, current, new, action, actor)
        return Written(new, self._current_revision(conn), True)

    def _log(
        self, conn: Connection, before: Plugin | None, after: Plugin, action: str, actor: str | None
    ) -> None:
        before_record, after_record = audit_records(before, after)
        conn.execute(
            insert(schema.audit).values(
                at=after.updated_at,
                actor=actor,
                slug=after.slug,
                action=action,
                before=before_record,
                after=after_record,
            )
        )

    def _current_revision(self, conn: Connection) -> int:
        return int(conn.execute(select(schema.revision.c.revision)).scalar_one())

    def _read(self, fn: Callable[[Connection], T]) -> T:
        def run() -> T:
            with self._engine.connect() as conn:
                return fn(conn)

        return self._guard(run)

    def _write(self, fn: Callable[[Connection], T]) -> T:
        def run() -> T:
            for attempt in range(3):
                try:
                    with self._engine.connect() as conn:
                        conn = conn.execution_options(pluginhost_write=True)
                        with conn.begin():
                            return fn(conn)
                except IntegrityError:
                    # Two writers inserted the same slug at once: the loser retries
                    # and now sees the row (and updates it under the row lock).
                    if attempt == 2:
                        raise
            raise AssertionError("unreachable")

        return self._guard(run)

    def _guard(self, fn: Callable[[], T]) -> T:
        if os.getpid() != self._pid:
            self.after_fork()
        try:
            return fn()
        except (OperationalError, DBAPIError) as exc:
            if isinstance(exc, IntegrityError):
                raise
            raise StoreUnavailable(f"store {self._safe_url()} is unreachable: {_reason(exc)}") from None

    def _raw_cursor(self) -> Callable[[], int]:
        """This thread's revision reader (made on first use, on its own connection)."""
        if os.getpid() != self._pid:
            self.after_fork()
        reader = getattr(self._local, "cursor", None)
        if reader is None:
            raw = self._engine.raw_connection()
            reader = _pg_reader(raw.driver_connection) if self.dialect == "postgresql" else _dbapi_reader(raw)
            self._local.raw, self._local.cursor = raw, reader
        return reader

    def _drop_raw(self) -> None:
        raw = getattr(self._local, "raw", None)
        self._local.raw = self._local.cursor = None
        if raw is not None:
            try:
                raw.invalidate()
            except Exception:  # the connection is already gone
                pass

    def _safe_url(self) -> str:
        return make_url(self.url).render_as_string(hide_password=True)




def _normalise_url(url: str) -> str:
    # "postgresql://" means psycopg 3 here, the driver the postgres extra installs.
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


# A dead peer (a partition that drops packets) is noticed in ~3 s, not hours.
_KEEPALIVE: dict[str, Any] = {"keepalives": 1, "keepalives_idle": 1, "keepalives_interval": 1, "keepalives_count": 2}


def _make_engine(url: str, dialect: str, connect_timeout_s: float, pool_size: int) -> Engine:
    if dialect == "sqlite":
        path = make_url(url).database
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _connect(dbapi_conn: Any, _record: Any) -> None:
            # Let SQLAlchemy emit BEGIN itself so writers can take the lock up front.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin(conn: Connection) -> None:
            # Writers serialise on BEGIN IMMEDIATE: read-modify-write is atomic.
            immediate = conn.get_execution_options().get("pluginhost_write")
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

        return engine
    if dialect == "postgresql":
        try:
            import psycopg  # noqa: F401
        except ImportError:
            from ..errors import StoreUnavailable as _E

            raise _E('PostgreSQL needs psycopg 3: pip install "pluginhost[postgres]"') from None
        # pre_ping: after an outage, pooled connections are dead; checking them
        # on checkout makes the first call after recovery succeed. The hot paths
        # (revision reads) do not go through the pool.
        return create_engine(
            url,
            pool_size=pool_size,
            pool_pre_ping=True,
            connect_args={"connect_timeout": max(1, round(connect_timeout_s)), **_KEEPALIVE},
        )
    return create_engine(url)


_REVISION_SQL = "SELECT revision FROM pluginhost_revision WHERE id = 1"


def _pg_reader(driver: Any) -> Callable[[], int]:
    # A server-side prepared statement through libpq directly: one round trip
    # and ~35 us less Python than a psycopg cursor, on every dispatch.
    from psycopg import OperationalError
    from psycopg.pq import ExecStatus

    driver.autocommit = True
    pg = driver.pgconn
    prepared = pg.prepare(b"pluginhost_revision", _REVISION_SQL.encode())
    if prepared.status != ExecStatus.COMMAND_OK:
        message = prepared.error_message.decode(errors="replace")
        # A pooled connection that served a reader before (its thread ended and
        # returned it to the pool) keeps the statement: same text, reuse it.
        if "already exists" not in message:
            raise OperationalError(message)

    def read() -> int:
        res = pg.exec_prepared(b"pluginhost_revision", None)
        if res.status != ExecStatus.TUPLES_OK:
            raise OperationalError(res.error_message.decode(errors="replace") or "revision read failed")
        value = res.get_value(0, 0) if res.ntuples else None
        return int(value) if value is not None else 0

    return read


def _dbapi_reader(raw: Any) -> Callable[[], int]:
    cur = raw.cursor()

    def read() -> int:
        cur.execute(_REVISION_SQL)
        row = cur.fetchone()
        return int(row[0]) if row else 0

    return read


def _plugin(row: Any) -> Plugin:
    return Plugin.model_construct(
        slug=row["slug"],
        kind=Kind(row["kind"]),
        enabled=bool(row["enabled"]),
        config=row["config"] or {},
        sort=row["sort"],
        label_en=row["label_en"],
        label_ar=row["label_ar"],
        version=int(row["version"]),
        updated_at=_utc(row["updated_at"]),
    )


def _row(plugin: Plugin) -> dict[str, Any]:
    return {
        "slug": plugin.slug,
        "kind": Kind(plugin.kind).value,
        "enabled": plugin.enabled,
        "config": plugin.config,
        "sort": plugin.sort,
        "label_en": plugin.label_en,
        "label_ar": plugin.label_ar,
        "version": plugin.version,
        "updated_at": plugin.updated_at,
    }


def _utc(at: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes; everything we write is UTC.
    if at is not None and at.tzinfo is None:
        return at.replace(tzinfo=timezone.utc)
    return at


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _reason(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _is_missing_table(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "no such table" in text or "does not exist" in text and "relation" in text

