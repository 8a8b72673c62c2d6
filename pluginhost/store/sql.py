"""SQLAlchemyStore: plugin records in SQLite or PostgreSQL."""

from __future__ import annotations

import functools
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, delete, insert, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError, IntegrityError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from ..errors import (
    ConcurrentUpdate,
    InvalidArgument,
    PluginHostError,
    PluginNotFound,
    StoreUnavailable,
)
from ..model import AuditEntry, Kind, Plugin
from . import schema
from .base import MUTABLE_FIELDS, Changes, Written, audit_records, next_version
from .deadline import WATCHDOG, Breaker, Call, Overrun
from .engines import SQLITE_ADMIN_BUSY_S, make_engine
from .feed import RECORD_COLUMNS, read_changes
from .migrate import migrate
from .postgres import KEEPALIVE, QUERY_CANCELED, PgRevisionReader
from .readers import REVISION_SQL, DbapiReader, PendingRevision, RevisionReaders

log = logging.getLogger("pluginhost.store")
T = TypeVar("T")

MIGRATIONS = Path(__file__).with_name("migrations")
_PLUGIN_COLUMNS = RECORD_COLUMNS
#: While the store is not answering, how long a call waits for the background
#: probe to find it answering again before it fails.
STALLED_WAIT_S = 0.1


class SQLAlchemyStore:
    """``Store`` on SQLAlchemy Core; tested on SQLite and PostgreSQL (psycopg 3).

    ``url`` is any SQLAlchemy URL (``sqlite:///path.db``,
    ``postgresql+psycopg://user@host/db``). The schema is managed by Alembic
    (``migrate()``, or ``pluginhost db upgrade``).

    Every call but ``migrate()`` has a deadline, ``timeout_s``
    (``pluginhost_store_timeout_s``): past it, ``StoreUnavailable``. On PostgreSQL
    it covers connecting, lock waits and a server or network path that stops
    answering; a write cut off after its COMMIT was sent says that its outcome is
    unknown, any other failed write that nothing was written. On SQLite reads
    never wait (WAL); the worker registry and ``ensure`` wait at most ``timeout_s``
    for the file's write lock, admin writes at most 30 s (a writer holding the
    lock is progressing, not hung). ``connect_timeout_s`` is the former name of
    ``timeout_s``.

    Admin writes are one transaction each, on a pool that only this store's calls
    use. Revision reads use connections of their own, outside any pool: a free
    list of at most ``idle_readers`` idle ones, each used by one caller at a time
    (not one per thread: under gevent that would be one per task).
    """

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 2.0,
        connect_timeout_s: float | None = None,
        pool_size: int = 5,
        idle_readers: int = 8,
    ) -> None:
        timeout = timeout_s if connect_timeout_s is None else connect_timeout_s
        if not _is_number(timeout) or not math.isfinite(timeout) or timeout <= 0:
            raise InvalidArgument(f"store timeout_s must be seconds > 0: {timeout!r}")
        if not _is_number(idle_readers) or idle_readers != int(idle_readers) or idle_readers < 0:
            raise InvalidArgument(f"store idle_readers must be an integer >= 0: {idle_readers!r}")
        self.url = _normalise_url(url)
        self.dialect = make_url(self.url).get_backend_name()
        self.timeout_s = self.connect_timeout_s = float(timeout)
        self.idle_readers = int(idle_readers)
        database = make_url(self.url).database
        self._memory = self.dialect == "sqlite" and database in (None, "", ":memory:")
        self._local = threading.local()  # the deadline of the pooled call this thread makes
        self._pid = os.getpid()
        self._breaker = Breaker(self._probe)
        self._readers = self._new_readers()
        # Two pools: this store's own calls (session timeouts on PostgreSQL, a
        # per-call busy timeout on SQLite), and the public ``engine`` that
        # migrations, the workflows store and direct SQL use unchanged.
        engine_args = (self.url, self.dialect, self.timeout_s, pool_size, self._current_call)
        self._calls = make_engine(*engine_args, own=True)
        self._engine = make_engine(*engine_args, own=False)

    # -- schema ----------------------------------------------------------------

    def migrate(self) -> None:
        """Bring the schema to the newest migration (idempotent, safe to race).

        No deadline: an upgrade, or waiting for another process's, takes what it takes.
        """
        if os.getpid() != self._pid:
            self.after_fork()
        try:
            migrate(self._engine, MIGRATIONS, "pluginhost_alembic_version")
        except IntegrityError:
            raise
        except DBAPIError as exc:
            raise self._unreachable(_reason(exc)) from None

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine of this store's database, for migrations and direct SQL."""
        return self._engine

    # -- reads -----------------------------------------------------------------

    def revision(self) -> int:
        # The hot path (every dispatch check, worker polls and refreshes): one
        # prepared primary-key read, one round trip, on a reader connection of its
        # own (outside the pool: no BEGIN/ROLLBACK, no SQLAlchemy per-call cost),
        # within the deadline (readers.py).
        if self._pid != os.getpid():
            self.after_fork()
        if self._memory:  # an in-memory database exists once per pooled connection
            return self._read(_revision_of)
        if self._breaker.open:
            self._check_answering(write=False)
        return self._readers.read()

    def revision_read(self) -> PendingRevision:
        """``revision()`` sent now, answered by ``result()``: the same read on the
        same readers, split so the caller works while it travels."""
        if self._pid != os.getpid():
            self.after_fork()
        if self._memory or self._breaker.open:
            return PendingRevision.answered(self.revision())
        return self._readers.begin()

    def load(self) -> tuple[int, list[Plugin]]:
        def read(conn: Connection) -> tuple[int, list[Plugin]]:
            conn = self._snapshot(conn)
            rev = conn.execute(select(schema.revision.c.revision)).scalar_one()
            rows = conn.execute(select(*_PLUGIN_COLUMNS).order_by(schema.plugins.c.sort, schema.plugins.c.slug))
            return int(rev), [_plugin(r._mapping) for r in rows]

        return self._read(read)

    def changes(self, since: int) -> Changes | None:
        """The rows changed and the slugs deleted after revision ``since``, in one
        snapshot; None when that cannot be proven complete (see ``feed.read_changes``)."""
        return self._read(lambda conn: read_changes(conn, int(since), _plugin))

    def get(self, slug: str) -> Plugin | None:
        def read(conn: Connection) -> Plugin | None:
            row = conn.execute(select(*_PLUGIN_COLUMNS).where(schema.plugins.c.slug == slug)).first()
            return _plugin(row._mapping) if row else None

        return self._read(read)

    def audit(self, slug: str | None = None, *, actor: str | None = None, limit: int = 100) -> list[AuditEntry]:
        def read(conn: Connection) -> list[AuditEntry]:
            q = select(schema.audit).order_by(schema.audit.c.id.desc()).limit(limit)
            if slug is not None:
                q = q.where(schema.audit.c.slug == slug)
            if actor is not None:
                q = q.where(schema.audit.c.actor == actor)
            return [AuditEntry.model_validate(dict(r._mapping)) for r in conn.execute(q)]

        return self._read(read)

    # -- writes ----------------------------------------------------------------

    def upsert(self, plugin: Plugin, *, actor: str | None = None, expected_version: int | None = None) -> Written:
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

        return self._write(write, admin=True)

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

        return self._write(write, admin=True)

    def ensure(self, plugins: Iterable[Plugin], *, actor: str | None = None) -> list[Plugin]:
        wanted = {p.slug: p for p in plugins}
        if not wanted:
            return []

        def write(conn: Connection) -> list[Plugin]:
            have = set(
                conn.execute(select(schema.plugins.c.slug).where(schema.plugins.c.slug.in_(list(wanted)))).scalars()
            )
            return [self._insert(conn, p, actor) for s, p in wanted.items() if s not in have]

        return self._write(write)

    def prune_deletions(self, through: int) -> int:
        """Forget the deletions recorded at revisions up to ``through`` (the table
        keeps one row per deleted slug); returns how many. A process whose view is
        older than ``through`` then loads every row on its next catch-up."""

        def write(conn: Connection) -> int:
            rev_table = schema.revision
            current = int(conn.execute(select(rev_table.c.revision)).scalar_one())
            bound = min(int(through), current)
            done = conn.execute(delete(schema.deletions).where(schema.deletions.c.change_revision <= bound))
            conn.execute(update(rev_table).where(rev_table.c.horizon < bound).values(horizon=bound))
            return int(done.rowcount)

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
        self._readers.close()
        self._calls.dispose()
        self._engine.dispose()

    def after_fork(self) -> None:
        """Forget connections inherited from a parent process (call in a forked child)."""
        # Dropped, not closed: closing would end the parent's sessions (psycopg
        # leaves a connection alone when it is collected in another process).
        self._local = threading.local()
        self._breaker = Breaker(self._probe)  # the parent's probe thread is not here
        self._readers = self._new_readers()
        self._calls.dispose(close=False)
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

    def _log(self, conn: Connection, before: Plugin | None, after: Plugin, action: str, actor: str | None) -> None:
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

    def _snapshot(self, conn: Connection) -> Connection:
        """``conn`` with its reads in one snapshot. SQLite: a read transaction is
        one already (WAL); PostgreSQL's READ COMMITTED takes one per statement."""
        if self.dialect == "postgresql":
            return conn.execution_options(isolation_level="REPEATABLE READ")
        return conn

    def _current_revision(self, conn: Connection) -> int:
        return int(conn.execute(select(schema.revision.c.revision)).scalar_one())

    def _read(self, fn: Callable[[Connection], T]) -> T:
        return self._call(fn, write=False)

    def _write(self, fn: Callable[[Connection], T], *, admin: bool = False) -> T:
        return self._call(fn, write=True, admin=admin)

    def _call(self, fn: Callable[[Connection], T], *, write: bool, admin: bool = False) -> T:
        """Run ``fn`` on a pooled connection of this store, within the deadline; a
        write is one transaction (committed here, rolled back on any error)."""
        if os.getpid() != self._pid:
            self.after_fork()
        self._check_answering(write=write)
        bound_s = SQLITE_ADMIN_BUSY_S if admin and self.dialect == "sqlite" else self.timeout_s
        with self._deadline() as call:
            try:
                return self._attempts(fn, call, write=write, busy_ms=int(bound_s * 1000))
            except (IntegrityError, PluginHostError):
                raise
            except (DBAPIError, DisconnectionError, PoolTimeout, Overrun) as exc:
                if call.fired or isinstance(exc, Overrun):  # no answer at all
                    self._breaker.trip()
                raise self._unavailable(exc, call, write=write, bound_s=bound_s) from None

    def _attempts(self, fn: Callable[[Connection], T], call: Call, *, write: bool, busy_ms: int) -> T:
        for attempt in range(3):
            try:
                with self._calls.connect() as conn:
                    if self.dialect == "sqlite":
                        conn = conn.execution_options(pluginhost_write=write, pluginhost_busy_ms=busy_ms)
                    if not write:
                        return fn(conn)
                    transaction = conn.begin()
                    result = fn(conn)
                    call.committing = True
                    transaction.commit()
                    return result
            except IntegrityError:
                # Two writers inserted the same slug at once: the loser retries
                # and now sees the row (and updates it under the row lock).
                call.committing = False
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _check_answering(self, *, write: bool) -> None:
        """Fail at once (after ``STALLED_WAIT_S`` at most) while the store is not
        answering: a caller such as a worker's event loop must not wait the whole
        timeout on every call of an outage."""
        breaker = self._breaker
        if breaker.open and not breaker.wait(min(STALLED_WAIT_S, self.timeout_s)):
            silent_s = time.monotonic() - breaker.since
            nothing = "; nothing was written" if write else ""
            raise self._unreachable(
                f"{self._no_answer()}; no answer for {silent_s:.1f} s, retried in the background{nothing}"
            )

    def _probe(self) -> bool:
        """One attempt to reach the store (the breaker's probe): whether it answered."""
        deadline = time.monotonic() + self.timeout_s
        try:
            reader = self._open_reader(deadline)
        except Overrun:
            return False
        except Exception:
            return True  # refused, or an error from the server: an answer
        try:
            reader.read(deadline)
        except Overrun:
            return False
        except Exception:
            pass
        finally:
            reader.close()
        return True

    @contextmanager
    def _deadline(self) -> Iterator[Call]:
        """The deadline of the pooled call this thread makes now (the pool events
        in postgres.py find it and register the connections it uses)."""
        call = Call(self.timeout_s)
        if self.dialect == "postgresql":
            WATCHDOG.arm(call)
        self._local.call = call
        try:
            yield call
        finally:
            call.finish()
            self._local.call = None

    def _current_call(self) -> Call | None:
        return getattr(self._local, "call", None)

    def _unavailable(self, exc: BaseException, call: Call, *, write: bool, bound_s: float) -> StoreUnavailable:
        """The ``StoreUnavailable`` for a failed call: what happened, and for a write
        whether it certainly wrote nothing or its outcome is unknown."""
        orig = getattr(exc, "orig", None) or exc
        sqlstate = getattr(orig, "sqlstate", None)
        if call.fired or isinstance(exc, Overrun):
            what = self._no_answer(bound_s)
        elif sqlstate == QUERY_CANCELED or "database is locked" in str(orig):
            what = f"{self._no_answer(bound_s)}: {_reason(exc)}"  # the server's own word
        else:
            what = _reason(exc)
        if not write:
            return self._unreachable(what)
        # Only an answer from the server says what became of a COMMIT it was sent;
        # a lost connection (or an error of class 08/57, which may end the session
        # around the commit) leaves it unknown. SQLite is local: it always answers.
        answered = sqlstate is not None and sqlstate[:2] not in ("08", "57")
        if call.committing and self.dialect == "postgresql" and not answered:
            return self._unreachable(
                f"{what}; the write's outcome is unknown: its COMMIT was sent and not answered"
                " (read the record or the audit log before retrying)"
            )
        return self._unreachable(f"{what}; nothing was written")

    def _unreachable(self, what: str) -> StoreUnavailable:
        found = _MISSING_DATABASE.search(what)
        if found:  # it answered: the server is there, the database is not
            return StoreUnavailable(
                f"store {self._safe_url()}: database {found[1]} does not exist"
                " (create it; with pluginhost_auto_migrate on, the schema is created on first use)"
            )
        return StoreUnavailable(f"store {self._safe_url()} is unreachable: {what}")

    def _no_answer(self, bound_s: float | None = None) -> str:
        if bound_s is None or bound_s == self.timeout_s:
            return f"no answer within {self.timeout_s:g} s (pluginhost_store_timeout_s)"
        return f"no answer within {bound_s:g} s"

    def _new_readers(self) -> RevisionReaders:
        return RevisionReaders(
            self._open_reader,
            timeout_s=self.timeout_s,
            idle=self.idle_readers,
            breaker=self._breaker,
            unreachable=self._unreachable,
            no_answer=self._no_answer(),
        )

    def _open_reader(self, deadline: float) -> Any:
        """A new revision reader, on a driver connection that never enters a pool."""
        if self.dialect == "postgresql":
            return PgRevisionReader(self._conninfo, REVISION_SQL, self.timeout_s, deadline)
        # SQLite (a file; WAL: a read never waits for a writer, the busy timeout
        # covers the rare moments it would, WAL recovery after a crash)
        cargs, cparams = self._calls.dialect.create_connect_args(self._calls.url)
        options = {"timeout": self.timeout_s, "check_same_thread": False, "isolation_level": None}
        conn = self._calls.dialect.loaded_dbapi.connect(*cargs, **{**cparams, **options})
        return DbapiReader(conn)

    @functools.cached_property
    def _conninfo(self) -> bytes:
        """libpq parameters of the URL, for the revision readers."""
        from psycopg.conninfo import make_conninfo

        _, cparams = self._calls.dialect.create_connect_args(self._calls.url)
        params = {k: v for k, v in cparams.items() if isinstance(v, (str, int))}
        return make_conninfo("", **{**params, **KEEPALIVE}).encode()

    def _safe_url(self) -> str:
        return make_url(self.url).render_as_string(hide_password=True)


def _revision_of(conn: Connection) -> int:
    return int(conn.execute(select(schema.revision.c.revision)).scalar_one())


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _normalise_url(url: str) -> str:
    # "postgresql://" means psycopg 3 here, the driver the postgres extra installs.
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


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


#: PostgreSQL's refusal of a connection to a database that does not exist.
_MISSING_DATABASE = re.compile(r'database ("[^"]*") does not exist')


def _reason(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
