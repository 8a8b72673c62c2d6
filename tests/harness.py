"""Run real Celery workers against real brokers, for pluginhost's integration tests.

A plain module: ``tests/conftest.py`` wraps it in fixtures, and the test app modules
that workers load (``tests/apps/*.py``) import :func:`conf_from_env` from it. It
imports nothing heavy at module level, so a worker pays almost nothing for it.

Sections, one concept each:

1. Config hand-over: a test's Celery settings travel to worker processes as JSON in
   the ``PH_CONF`` environment variable (:func:`conf_from_env`).
2. Services: is PostgreSQL / Redis / RabbitMQ up (:func:`check_service`)?
3. Session resources: one PostgreSQL database and one Redis db index per pytest
   session (:class:`SessionResources`), and :func:`empty_store` between tests.
4. Backends: the (broker, result backend, store) matrix (:class:`Backend`).
5. The test process's own app: :func:`configure_app` / :func:`reset_app`.
6. Processes: reading ``/proc`` (:func:`read_proc`, :func:`group_members`, ...).
7. Workers: :class:`Worker` (one ``celery worker`` subprocess in its own process
   group) and :class:`WorkerFactory` (records workers, stops them all).
"""

from __future__ import annotations

import atexit
import ctypes
import importlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------------------
# 1. Config hand-over
# ---------------------------------------------------------------------------

#: Environment variable holding a JSON object of Celery settings (and
#: ``pluginhost_store``) for the app module a worker loads.
PH_CONF_ENV = "PH_CONF"

#: Broker URL scheme of pluginhost's filesystem transport; importing
#: ``pluginhost.transport`` registers it with kombu.
PLUGINHOST_FS_SCHEME = "pluginhost-fs"


def conf_from_env(environ: dict[str, str] | None = None) -> dict[str, Any]:
    """The Celery settings in ``PH_CONF``, or ``{}`` when it is not set.

    Test app modules call this at import: ``app.conf.update(conf_from_env())``. In
    the test process ``PH_CONF`` is normally unset, and the test applies the
    settings itself with :func:`configure_app`.
    """
    raw = (os.environ if environ is None else environ).get(PH_CONF_ENV)
    if not raw:
        return {}
    conf = json.loads(raw)
    if not isinstance(conf, dict):
        raise TypeError(f"{PH_CONF_ENV} must hold a JSON object, got {type(conf).__name__}")
    register_transport_for(conf)
    return conf


def register_transport_for(conf: dict[str, Any]) -> None:
    """Import the module that registers the conf's broker transport, if it is ours."""
    if str(conf.get("broker_url", "")).startswith(PLUGINHOST_FS_SCHEME):
        importlib.import_module("pluginhost.transport")


# ---------------------------------------------------------------------------
# 2. Services
# ---------------------------------------------------------------------------

LOCALHOST = "127.0.0.1"
PG_PORT = 5432
REDIS_PORT = 6379
AMQP_PORT = 5672
PG_ADMIN_DB = "test"
AMQP_URL = f"amqp://guest:guest@{LOCALHOST}:{AMQP_PORT}//"


def pg_conninfo(dbname: str) -> str:
    """libpq connection string for a database on the local server (trust auth)."""
    return f"host={LOCALHOST} port={PG_PORT} user=postgres dbname={dbname} connect_timeout=3"


def _ping_postgres() -> None:
    import psycopg

    with psycopg.connect(pg_conninfo(PG_ADMIN_DB), autocommit=True) as conn:
        conn.execute("SELECT 1").fetchone()


def _ping_redis() -> None:
    import redis

    client = redis.Redis(host=LOCALHOST, port=REDIS_PORT, socket_connect_timeout=3, socket_timeout=3)
    try:
        client.ping()
    finally:
        client.close()


def _ping_rabbitmq() -> None:
    from kombu import Connection

    with Connection(AMQP_URL, connect_timeout=3) as conn:
        conn.connect()  # the full AMQP handshake, login included
        conn.default_channel  # noqa: B018 - opening a channel is the real check


@dataclass(frozen=True)
class Service:
    """A local server the integration tests talk to."""

    name: str
    port: int
    start_command: str
    ping: Callable[[], None]


SERVICES: dict[str, Service] = {
    s.name: s
    for s in (
        Service(
            "postgres",
            PG_PORT,
            "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start",
            _ping_postgres,
        ),
        Service(
            "redis",
            REDIS_PORT,
            'redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" '
            "--appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log",
            _ping_redis,
        ),
        Service("rabbitmq", AMQP_PORT, "rabbitmq-server -detached", _ping_rabbitmq),
    )
}

_service_problems: dict[str, str | None] = {}


def check_service(name: str) -> str | None:
    """``None`` if the service answers, else what is wrong. Checked once per process.

    Two steps, so the message says which failed: a TCP connect to its port, then a
    real round trip (``SELECT 1``, ``PING``, an AMQP login and channel).
    """
    if name not in _service_problems:
        _service_problems[name] = _probe(SERVICES[name])
    return _service_problems[name]


def _probe(service: Service) -> str | None:
    where = f"{LOCALHOST}:{service.port}"
    try:
        socket.create_connection((LOCALHOST, service.port), timeout=3).close()
    except OSError as exc:
        return f"{service.name} is not reachable at {where} ({exc})"
    try:
        service.ping()
    except Exception as exc:  # noqa: BLE001 - any driver error means "not usable"
        return f"{service.name} at {where} accepts connections but does not answer ({exc!r})"
    return None


def service_down_message(name: str, problem: str) -> str:
    """A message naming the service, what failed and the command that starts it."""
    return f"{problem}; start it with: {SERVICES[name].start_command}"


# ---------------------------------------------------------------------------
# 3. Session resources
# ---------------------------------------------------------------------------

#: Databases this harness creates are named PG_DB_PREFIX + <pid of pytest>.
PG_DB_PREFIX = "pluginhost_test_"
#: Redis key that marks a db index as taken by one pytest session.
REDIS_OWNER_KEY = "pluginhost:test-harness:owner"
REDIS_CLAIM_TTL_S = 6 * 3600
#: Set to a number to use that Redis db index instead of claiming a free one.
REDIS_DB_ENV = "PH_TEST_REDIS_DB"

# Flushes the db and marks it ours in one step, but only if it is still unowned and
# empty (someone else's data otherwise), or still owned by the dead session we saw:
# no other session can slip in between.
_CLAIM_REDIS_DB = """
local owner = redis.call('GET', KEYS[1])
if owner == false then
  if redis.call('DBSIZE') > 0 then return 0 end
elseif owner ~= ARGV[2] then
  return 0
end
redis.call('FLUSHDB')
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3])
return 1
"""


def pg_url(dbname: str) -> str:
    """SQLAlchemy URL (psycopg 3) of a database on the local server."""
    return f"postgresql+psycopg://postgres@{LOCALHOST}:{PG_PORT}/{dbname}"


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists and is not a zombie."""
    info = read_proc(pid)
    return info is not None and info.state not in ("Z", "X")


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


def claim_redis_db(owner: str) -> int:
    """Take a Redis db index (1..15) no other live session uses, flushed empty.

    A db is free when it is empty, or its owner key names a pytest process on this
    host that no longer runs. A db holding keys but no owner key belongs to someone
    who does not use this harness and is left alone; so is index 0.
    """
    import redis

    if os.environ.get(REDIS_DB_ENV):
        index = int(os.environ[REDIS_DB_ENV])
        client = redis.Redis(host=LOCALHOST, port=REDIS_PORT, db=index)
        try:
            client.flushdb()
        finally:
            client.close()
        return index
    host = socket.gethostname()
    for index in range(1, 16):
        client = redis.Redis(host=LOCALHOST, port=REDIS_PORT, db=index)
        try:
            current_s = _text(client.get(REDIS_OWNER_KEY))
            if current_s and _owner_alive(current_s, host):
                continue
            if client.eval(_CLAIM_REDIS_DB, 1, REDIS_OWNER_KEY, owner, current_s, REDIS_CLAIM_TTL_S):
                return index
        finally:
            client.close()
    raise RuntimeError(
        f"every Redis db index 1..15 is claimed by a running test session; set {REDIS_DB_ENV} to force one"
    )


def _text(value: bytes | str | None) -> str:
    return value.decode() if isinstance(value, bytes) else (value or "")


def _owner_alive(owner: str, host: str) -> bool:
    owner_host, _, pid = owner.rpartition(":")
    if owner_host != host or not pid.isdigit():
        return True  # another machine's session: leave it alone until its TTL ends
    return pid_alive(int(pid))


def release_redis_db(index: int, owner: str) -> None:
    """Flush a claimed db and give it back (only if this session still owns it)."""
    import redis

    client = redis.Redis(host=LOCALHOST, port=REDIS_PORT, db=index)
    try:
        if os.environ.get(REDIS_DB_ENV) or _text(client.get(REDIS_OWNER_KEY)) == owner:
            client.flushdb()
    finally:
        client.close()


class SessionResources:
    """The PostgreSQL database and Redis db index of one pytest session.

    Each is made on first use, so a run of embedded-only tests touches neither
    server; :meth:`close` drops the database and flushes the Redis db.
    """

    def __init__(self) -> None:
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self._pg_db: str | None = None
        self._redis_db: int | None = None
        self._lock = threading.Lock()

    def pg_database(self) -> str:
        """Name of this session's PostgreSQL database, created on first call."""
        with self._lock:
            if self._pg_db is None:
                drop_stale_pg_databases()
                name = f"{PG_DB_PREFIX}{os.getpid()}"
                create_pg_database(name)
                self._pg_db = name
            return self._pg_db

    def redis_db(self) -> int:
        """This session's Redis db index, claimed and flushed on first call."""
        with self._lock:
            if self._redis_db is None:
                self._redis_db = claim_redis_db(self.owner)
            return self._redis_db

    def close(self) -> None:
        with self._lock:
            if self._pg_db is not None:
                drop_pg_database(self._pg_db)
                self._pg_db = None
            if self._redis_db is not None:
                release_redis_db(self._redis_db, self.owner)
                self._redis_db = None


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


# ---------------------------------------------------------------------------
# 4. Backends
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Backend:
    """One (broker, result backend, store) combination the tests run against.

    ``services`` are the servers it needs up; ``make_conf(tmp_dir, resources)``
    builds its Celery settings (``pluginhost_store`` included) without the
    per-test isolation keys, which :func:`build_conf` adds.
    """

    id: str
    broker: str
    result_backend: str
    store: str
    services: tuple[str, ...]
    make_conf: Callable[[Path, SessionResources], dict[str, Any]]

    def __str__(self) -> str:
        return self.id


@cache
def _pluginhost_embedded_conf() -> Callable[[Path], dict[str, Any]] | None:
    """``pluginhost.embedded.embedded_conf`` if that module exists, else ``None``.

    A module that exists but fails to import raises: that is a bug to see, not a
    reason to test something else.
    """
    if importlib.util.find_spec("pluginhost.embedded") is None:
        return None
    return importlib.import_module("pluginhost.embedded").embedded_conf


def _stock_filesystem_conf(tmp_dir: Path) -> dict[str, Any]:
    """What ``embedded_conf`` gives, on kombu's stock ``filesystem://`` transport.

    Only used while ``pluginhost.embedded`` does not exist. Note that the stock
    transport can hand a consumer a half-written message (kombu #1551).
    """
    tmp_dir = tmp_dir.resolve()
    data = tmp_dir / "broker" / "data"
    control = tmp_dir / "broker" / "control"
    for folder in (data, control):
        folder.mkdir(parents=True, exist_ok=True)
    return {
        "broker_url": "filesystem://",
        "broker_transport_options": {
            "data_folder_in": str(data),
            "data_folder_out": str(data),
            "control_folder": str(control),
            "polling_interval": 0.01,
        },
        "result_backend": f"db+sqlite:///{tmp_dir / 'results.db'}",
        "result_chord_retry_interval": 0.05,
        "pluginhost_store": f"sqlite:///{tmp_dir / 'pluginhost.db'}",
    }


def _embedded_conf(tmp_dir: Path, resources: SessionResources) -> dict[str, Any]:
    factory = _pluginhost_embedded_conf()
    data_dir = tmp_dir / "embedded"
    if factory is not None:
        return factory(data_dir)
    return _stock_filesystem_conf(data_dir)


def _redis_conf(tmp_dir: Path, resources: SessionResources) -> dict[str, Any]:
    redis_url = f"redis://{LOCALHOST}:{REDIS_PORT}/{resources.redis_db()}"
    return {
        "broker_url": redis_url,
        "result_backend": redis_url,
        "pluginhost_store": pg_url(resources.pg_database()),
    }


def _amqp_conf(tmp_dir: Path, resources: SessionResources) -> dict[str, Any]:
    return {
        "broker_url": AMQP_URL,
        "result_backend": f"redis://{LOCALHOST}:{REDIS_PORT}/{resources.redis_db()}",
        "pluginhost_store": pg_url(resources.pg_database()),
    }


BACKENDS: dict[str, Backend] = {
    b.id: b
    for b in (
        Backend(
            "embedded",
            broker="pluginhost-fs:// (kombu filesystem:// until pluginhost.embedded exists)",
            result_backend="db+sqlite (file in the test's tmp dir)",
            store="sqlite (file in the test's tmp dir)",
            services=(),
            make_conf=_embedded_conf,
        ),
        Backend(
            "redis",
            broker="redis (session's db index)",
            result_backend="redis (same db)",
            store="postgresql (session's database)",
            services=("redis", "postgres"),
            make_conf=_redis_conf,
        ),
        Backend(
            "amqp",
            broker="rabbitmq (guest, vhost /)",
            result_backend="redis (session's db index)",
            store="postgresql (session's database)",
            services=("rabbitmq", "redis", "postgres"),
            make_conf=_amqp_conf,
        ),
    )
}
BACKEND_IDS: tuple[str, ...] = tuple(BACKENDS)


def isolation_conf(tag: str) -> dict[str, Any]:
    """Settings that keep one test's messages away from every other test's.

    A queue of its own for tasks, and a control exchange of its own, so broadcasts
    (ping, pluginhost's refresh) reach only this test's workers even on a broker
    that other test sessions share.
    """
    return {
        "task_default_queue": f"phq-{tag}",
        "control_exchange": f"phc-{tag}",
    }


def build_conf(backend: Backend, tmp_dir: Path, resources: SessionResources, tag: str | None = None) -> dict[str, Any]:
    """The complete settings for one test: the backend's plus isolation keys."""
    conf: dict[str, Any] = {"broker_connection_retry_on_startup": True}
    conf.update(backend.make_conf(tmp_dir, resources))
    conf.update(isolation_conf(tag or uuid.uuid4().hex[:12]))
    json.dumps(conf)  # it has to travel through PH_CONF: fail here, not in a worker
    return conf


def delete_broker_objects(conf: dict[str, Any], queues: Iterable[str]) -> None:
    """Delete a test's queues and exchanges on an AMQP broker (RabbitMQ keeps them).

    Deletes each queue and the direct exchange of the same name that Celery
    declares for it, and the test's two remote-control exchanges
    (``<control_exchange>.pidbox`` and ``reply.<control_exchange>.pidbox``, which
    kombu declares without auto-delete). Does nothing on other brokers: Redis is
    flushed at session end and the filesystem broker lives in the tmp dir.
    """
    from kombu import Connection

    if not str(conf.get("broker_url", "")).startswith("amqp"):
        return
    control = conf.get("control_exchange", "celery")
    exchanges = {*queues, f"{control}.pidbox", f"reply.{control}.pidbox"}
    with Connection(conf["broker_url"]) as conn:
        channel = conn.default_channel
        for name in sorted(set(queues)):
            channel.queue_delete(name)
        for name in sorted(exchanges):
            channel.exchange_delete(name)


# ---------------------------------------------------------------------------
# 5. The test process's own app
# ---------------------------------------------------------------------------


def configure_app(app: Any, conf: dict[str, Any]) -> Any:
    """Point an already imported Celery app at ``conf`` and return it.

    ``app.conf.update`` alone is not enough once the app has been used: it caches
    its broker pool, backend, ``amqp`` (queues, routes) and ``control`` (the
    control exchange), built from the settings of the time. Those are dropped here
    and rebuilt on next use. Task class attributes that Celery copies from the
    settings when a task is bound (``acks_late``, ``ignore_result``, serializer,
    ...) are not re-read; workers are unaffected, they build their app from
    ``PH_CONF``.
    """
    reset_app(app)
    register_transport_for(conf)
    app.conf.update(conf)
    return app


def reset_app(app: Any) -> None:
    """Drop the connections and objects an app built from its earlier settings."""
    backend = app._backend  # the cached result backend, if any (never creates one)
    if backend is not None:
        _close_backend(backend)
    app._backend_cache = None
    app._local = threading.local()  # thread-local backend and thread oid
    # kombu keeps connection pools in one process-wide map keyed by broker URL and
    # options, shared by every app using the same broker: forget ours, close none.
    app._pool = None
    for name in ("amqp", "control", "events"):
        app.__dict__.pop(name, None)


def _close_backend(backend: Any) -> None:
    consumer = getattr(backend, "result_consumer", None)
    if consumer is not None:
        consumer.stop()  # the Redis result backend's pub/sub connection
    session_manager = getattr(backend, "session_manager", None)
    if session_manager is not None:
        session_manager.invalidate(backend.url)  # a database backend's engine
    client = getattr(backend, "client", None)
    pool = getattr(client, "connection_pool", None)
    if pool is not None:
        pool.disconnect()


# ---------------------------------------------------------------------------
# 6. Processes
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcInfo:
    """One line of ``/proc/<pid>/stat``, the fields we use."""

    pid: int
    ppid: int
    pgid: int
    state: str  # R, S, D, T (stopped), Z (zombie), ...

    @property
    def alive(self) -> bool:
        return self.state not in ("Z", "X")


def read_proc(pid: int) -> ProcInfo | None:
    """``/proc/<pid>/stat`` parsed, or ``None`` if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses
    fields = data[data.rindex(")") + 2 :].split()
    return ProcInfo(pid=pid, state=fields[0], ppid=int(fields[1]), pgid=int(fields[2]))


def list_processes() -> list[ProcInfo]:
    """Every process visible in ``/proc``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            info = read_proc(int(entry))
            if info is not None:
                found.append(info)
    return found


def group_members(pgid: int, *, include_zombies: bool = False) -> list[int]:
    """Pids in process group ``pgid``; zombies only if asked for."""
    return sorted(p.pid for p in list_processes() if p.pgid == pgid and (include_zombies or p.alive))


def child_pids(pid: int) -> list[int]:
    """Pids of the live direct children of ``pid``."""
    return sorted(p.pid for p in list_processes() if p.ppid == pid and p.alive)


_PR_SET_CHILD_SUBREAPER = 36
_subreaper_state: list[bool] = []


def become_child_subreaper() -> bool:
    """Adopt orphaned descendants, so their zombies can be reaped here (Linux only).

    When a worker's main process is SIGKILLed, its pool children are orphaned. Their
    zombies would go to PID 1, which on these machines never reaps them; as a child
    subreaper this process gets them instead and :meth:`Worker.stop` reaps them.
    Idempotent; returns whether it is in effect.
    """
    if not _subreaper_state:
        ok = False
        if sys.platform.startswith("linux"):
            libc = ctypes.CDLL(None, use_errno=True)
            ok = libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
        _subreaper_state.append(ok)
    return _subreaper_state[0]


def reap_adopted_zombies(pgid: int, skip: Iterable[int] = ()) -> list[int]:
    """Reap zombies of group ``pgid`` that were re-parented to this process.

    ``skip`` names pids a :class:`subprocess.Popen` owns: they are reaped through it.
    """
    me, skipped, reaped = os.getpid(), set(skip), []
    for p in list_processes():
        if p.pgid == pgid and p.ppid == me and not p.alive and p.pid not in skipped:
            try:
                os.waitpid(p.pid, os.WNOHANG)
                reaped.append(p.pid)
            except ChildProcessError:
                pass
    return reaped


# ---------------------------------------------------------------------------
# 7. Workers
# ---------------------------------------------------------------------------


class WorkerError(RuntimeError):
    """A worker did not start, answer or stop as expected."""


#: Workers started and not yet stopped, for the exit-time safety net.
_LIVE_WORKERS: set[Worker] = set()


def kill_all_workers() -> None:
    """SIGKILL every worker group still recorded as running (the safety net)."""
    for worker in list(_LIVE_WORKERS):
        try:
            worker.kill()
        except Exception as exc:  # noqa: BLE001 - the others must die too
            print(f"harness: could not kill {worker!r}: {exc!r}", file=sys.stderr)


atexit.register(kill_all_workers)


class Worker:
    """One ``celery worker`` subprocess, alone in its own process group.

    The group id is the main process's pid, so signals to the group reach the
    prefork pool children (and anything a task started) as well.
    """

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        *,
        hostname: str,
        conf: dict[str, Any],
        log_path: Path,
        argv: Sequence[str],
        queues: Sequence[str],
    ) -> None:
        self.proc = proc
        self.hostname = hostname
        self.conf = conf
        self.queues = list(queues)
        self.log_path = log_path
        self.argv = list(argv)
        self.paused = False
        self.stopping = False
        # set once the group is gone and reaped: its pgid may then be reused by an
        # unrelated process, so no signal is sent to it any more
        self.finished = False
        self._control_app: Any = None

    # -- starting ---------------------------------------------------------------

    @classmethod
    def start(
        cls,
        app_module: str,
        conf: dict[str, Any],
        *,
        pool: str = "prefork",
        concurrency: int = 2,
        name: str = "w1",
        queues: Sequence[str] | None = None,
        extra_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        max_tasks_per_child: int | None = None,
        log_dir: Path | None = None,
        die_with_parent: bool = True,
    ) -> Worker:
        """Launch ``celery -A app_module worker`` and return at once (see :meth:`wait_ready`).

        ``queues`` defaults to the conf's ``task_default_queue``. The conf reaches
        the app module as ``PH_CONF``; ``env`` adds or overrides variables. Output
        goes to ``<log_dir>/worker-<name>.log``.

        ``die_with_parent``: the worker gets SIGKILL when the thread that started it
        ends (Linux's parent-death signal, set by util-linux ``setpriv`` where it is
        installed). That covers a test run killed outright, which no atexit hook
        survives: the worker's own process group escapes a kill of pytest's group.
        Start workers from the main thread, or from a thread that outlives them, or
        pass ``False``.
        """
        if pool not in ("prefork", "solo", "threads", "gevent"):
            raise ValueError(f"pool must be prefork, solo, threads or gevent, not {pool!r}")
        from celery.utils.nodenames import host_format

        become_child_subreaper()
        queue_names = list(queues) if queues else [conf.get("task_default_queue", "celery")]
        setpriv = shutil.which("setpriv") if die_with_parent else None
        argv = [
            *([setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []),
            sys.executable, "-m", "celery", "-A", app_module, "worker",
            f"--pool={pool}", f"--concurrency={concurrency}", "-n", f"{name}@%h",
            "--without-gossip", "--without-mingle", "--loglevel=INFO",
            "-Q", ",".join(queue_names),
        ]  # fmt: skip
        if max_tasks_per_child is not None:
            argv.append(f"--max-tasks-per-child={max_tasks_per_child}")
        argv.extend(extra_args)

        child_env = dict(os.environ)
        child_env[PH_CONF_ENV] = json.dumps(conf)
        child_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
        child_env["PYTHONUNBUFFERED"] = "1"  # prints from tasks reach the log at once
        child_env.update(env or {})

        log_dir = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="ph-worker-"))
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / f"worker-{name}.log"
        with open(log_path, "ab") as log:
            log.write(f"$ {' '.join(argv)}\n".encode())
            log.flush()
            proc = subprocess.Popen(
                argv,
                cwd=REPO_ROOT,
                env=child_env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own session, so own process group: pgid == pid
            )
        worker = cls(
            proc,
            hostname=host_format(f"{name}@%h"),
            conf=conf,
            log_path=log_path,
            argv=argv,
            queues=queue_names,
        )
        _LIVE_WORKERS.add(worker)
        return worker

    def __repr__(self) -> str:
        return f"<Worker {self.hostname} pid={self.pid} returncode={self.proc.returncode}>"

    # -- state --------------------------------------------------------------------

    @property
    def pid(self) -> int:
        """Pid of the worker's main process."""
        return self.proc.pid

    @property
    def pgid(self) -> int:
        """Its process group: the main process leads it."""
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        """Exit status once reaped (negative: killed by that signal), else ``None``."""
        return self.proc.poll()

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def children(self) -> list[int]:
        """Pids of the main process's live children (the prefork pool processes)."""
        return child_pids(self.pid)

    def group_pids(self) -> list[int]:
        """Pids of every live process in the worker's group, main process included."""
        return group_members(self.pgid)

    def log_text(self) -> str:
        """Everything the worker has written so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    # -- remote control -----------------------------------------------------------

    def control_app(self) -> Any:
        """A throwaway Celery app with the worker's settings, for remote control."""
        if self._control_app is None:
            from celery import Celery

            register_transport_for(self.conf)
            app = Celery("ph-harness-control", set_as_current=False)
            app.conf.update(self.conf)
            self._control_app = app
        return self._control_app

    def ping(self, timeout: float = 0.5) -> bool:
        """Whether the worker answers a ``ping`` broadcast within ``timeout`` seconds."""
        app = self.control_app()
        # a connection of our own: kombu's process-wide pool is shared with the test's app
        with app.connection_for_write() as conn:
            return self._ping(app, conn, timeout)

    def _ping(self, app: Any, conn: Any, timeout: float) -> bool:
        replies = app.control.ping(destination=[self.hostname], timeout=timeout, limit=1, connection=conn)
        return any(self.hostname in reply for reply in replies or ())

    def wait_ready(self, timeout: float = 30.0, *, ping_timeout: float = 0.5) -> float:
        """Ping until the worker answers; return the seconds it took.

        A ping sent before the worker listens is lost and costs the whole attempt's
        timeout, so attempts start at 0.1 s and grow to ``ping_timeout``; a ping
        answers in milliseconds once the worker listens. Raises
        :class:`WorkerError`, with the end of the worker's log, if the process exits
        first or ``timeout`` passes.
        """
        started = time.monotonic()
        deadline = started + timeout
        attempt_timeout = min(0.1, ping_timeout)
        app = self.control_app()
        last_error: BaseException | None = None
        conn = app.connection_for_write()
        try:
            while True:
                if not self.running:
                    raise WorkerError(
                        f"{self.hostname} exited with {self.returncode} before answering "
                        f"a ping; log {self.log_path}:\n{self.log_tail()}"
                    )
                try:
                    if self._ping(app, conn, timeout=attempt_timeout):
                        return time.monotonic() - started
                except Exception as exc:  # noqa: BLE001 - broker not up yet: keep polling
                    last_error = exc
                    conn.close()
                    conn = app.connection_for_write()
                    time.sleep(0.1)
                if time.monotonic() >= deadline:
                    raise WorkerError(
                        f"{self.hostname} did not answer a ping within {timeout} s"
                        + (f" (last error: {last_error!r})" if last_error else "")
                        + f"; log {self.log_path}:\n{self.log_tail()}"
                    )
                attempt_timeout = min(attempt_timeout * 1.5, ping_timeout)
        finally:
            conn.close()

    # -- signals ------------------------------------------------------------------

    def _signal_group(self, sig: int) -> None:
        if self.finished:
            return
        try:
            os.killpg(self.pgid, sig)
        except ProcessLookupError:
            pass  # the whole group is gone already

    def pause(self) -> None:
        """SIGSTOP the whole group: the worker stops answering and consuming."""
        self._signal_group(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        """SIGCONT the whole group."""
        self._signal_group(signal.SIGCONT)
        self.paused = False

    # -- stopping -----------------------------------------------------------------

    def request_stop(self, *, group: bool = False) -> None:
        """Send the stop signal without waiting (see :meth:`stop`)."""
        if self.running:
            if group:
                self._signal_group(signal.SIGTERM)
            else:
                os.kill(self.pid, signal.SIGTERM)  # running: not reaped, so still our pid
            # a paused group would hold the SIGTERM until woken up
            self._signal_group(signal.SIGCONT)
            self.paused = False
        self.stopping = True

    def stop(self, timeout: float = 10.0, *, group: bool = False) -> int:
        """Stop the worker and leave no process of its group alive; return its exit status.

        By default SIGTERM goes to the main process only: Celery's warm shutdown,
        which lets running tasks finish and then stops the pool itself (prefork
        children reset SIGTERM to the default action, so a SIGTERM sent to them
        directly kills them mid-task). ``group=True`` sends it to the whole group,
        like systemd's default ``KillMode=control-group``. Whatever is still alive
        ``timeout`` seconds later gets SIGKILL. The main process is always reaped,
        and so are orphaned children re-parented to this process.
        """
        self.request_stop(group=group)
        return self.finish_stop(timeout)

    def finish_stop(self, timeout: float = 10.0) -> int:
        """Wait for a stop :meth:`request_stop` began; SIGKILL the group after ``timeout``."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._signal_group(signal.SIGKILL)
            self.proc.wait()
        self._clear_group()
        return self.proc.returncode

    def kill(self) -> int:
        """SIGKILL the whole group, wait until it is gone and reap it; return the status."""
        self._signal_group(signal.SIGKILL)
        self.proc.wait()
        self._clear_group()
        return self.proc.returncode

    def wait_exit(self, timeout: float = 10.0) -> int:
        """Wait for the main process to exit by itself; reap it; return its status."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise WorkerError(f"{self.hostname} still running after {timeout} s") from None

    def _clear_group(self, grace_s: float = 5.0) -> None:
        """After the main process is reaped: kill stragglers and reap adopted zombies."""
        if self.finished:
            return
        deadline = time.monotonic() + grace_s
        while self.group_pids():
            self._signal_group(signal.SIGKILL)
            if time.monotonic() >= deadline:
                self._forget()
                raise WorkerError(
                    f"{self.hostname}: processes {self.group_pids()} of group {self.pgid} "
                    f"survived SIGKILL for {grace_s} s"
                )
            time.sleep(0.01)
        reap_adopted_zombies(self.pgid, skip=[self.pid])
        self.finished = True
        self._forget()

    def _forget(self) -> None:
        _LIVE_WORKERS.discard(self)
        if self._control_app is not None:
            self._control_app.close()
            self._control_app = None


class WorkerFactory:
    """Starts workers for one test with its settings, and stops every one of them.

    ``factory(app_module, **kw)`` takes :meth:`Worker.start`'s keywords, plus
    ``conf`` (defaults to the test's), ``wait`` (default ``True``: return once the
    worker answers a ping) and ``ready_timeout``. Without ``name``, workers are named
    ``w1``, ``w2``, ... in start order.
    """

    def __init__(self, conf: dict[str, Any], log_dir: Path) -> None:
        self.conf = conf
        self.log_dir = Path(log_dir)
        self.started: list[Worker] = []

    def queues(self) -> set[str]:
        """Every queue a worker of this factory consumed from."""
        return {q for worker in self.started for q in worker.queues}

    def __call__(
        self,
        app_module: str,
        *,
        conf: dict[str, Any] | None = None,
        wait: bool = True,
        ready_timeout: float = 30.0,
        **kwargs: Any,
    ) -> Worker:
        kwargs.setdefault("name", f"w{len(self.started) + 1}")
        kwargs.setdefault("log_dir", self.log_dir)
        worker = Worker.start(app_module, self.conf if conf is None else conf, **kwargs)
        self.started.append(worker)
        if wait:
            worker.wait_ready(ready_timeout)
        return worker

    def stop_all(self, timeout: float = 10.0, *, graceful: bool = False) -> list[str]:
        """Stop every worker; return a description of each failure.

        By default each group gets SIGKILL: teardown only has to leave nothing
        behind, and Celery's warm shutdown costs seconds (the prefork pool takes
        about 1.5 s to stop; on the filesystem broker the consumer notices the
        signal only between 2 s polls). ``graceful=True`` sends every worker
        SIGTERM at once and SIGKILLs what is left after ``timeout``.
        """
        problems = []
        if graceful:
            for worker in self.started:
                try:
                    worker.request_stop()
                except Exception as exc:  # noqa: BLE001 - reported; finish_stop SIGKILLs it
                    problems.append(f"{worker!r}: {exc!r}")
        deadline = time.monotonic() + timeout
        for worker in self.started:
            try:
                if graceful:
                    worker.finish_stop(max(deadline - time.monotonic(), 0.0))
                else:
                    worker.kill()
            except Exception as exc:  # noqa: BLE001 - reported; the others must stop too
                problems.append(f"{worker!r}: {exc!r}")
        return problems
