"""The store's connection discipline: admin writes are one transaction whatever
readers did before them, and every store call has a deadline
(``pluginhost_store_timeout_s``, the store's ``timeout_s``).

Faults are real: a stalled network path through tests/tcpproxy.py (sockets stay
open, nothing is forwarded), triggers that make PostgreSQL itself refuse or
delay a write, a SQLite write lock held by another connection.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from celery import Celery
from sqlalchemy import text
from sqlalchemy.engine import make_url

from pluginhost import Plugin, PluginHost, PluginHostError, SQLAlchemyStore, StoreUnavailable
from tests import harness
from tests.tcpproxy import TcpProxy

TIMEOUT_S = 2.0
NO_ANSWER = r"no answer within 2 s \(pluginhost_store_timeout_s\)"


@pytest.fixture
def pg_db(empty_pg_url: str) -> str:
    return str(make_url(empty_pg_url).database)


@pytest.fixture
def admin(pg_db: str) -> Iterator[psycopg.Connection[Any]]:
    """A direct connection to the test database (not through any proxy)."""
    with psycopg.connect(harness.pg_conninfo(pg_db), autocommit=True) as conn:
        yield conn


@pytest.fixture
def store(empty_pg_url: str) -> Iterator[SQLAlchemyStore]:
    s = SQLAlchemyStore(empty_pg_url, timeout_s=TIMEOUT_S)
    s.migrate()
    yield s
    s.close()


@pytest.fixture
def proxy() -> Iterator[TcpProxy]:
    p = TcpProxy(("127.0.0.1", 5432))
    yield p
    p.close()


@pytest.fixture
def proxied_store(pg_db: str, proxy: TcpProxy, store: SQLAlchemyStore) -> Iterator[SQLAlchemyStore]:
    """A store reaching this test's database through ``proxy`` (``store`` migrated it)."""
    s = SQLAlchemyStore(proxy.url(pg_db), timeout_s=TIMEOUT_S)
    yield s
    proxy.restore()
    s.close()


@pytest.fixture
def audit_refused(admin: psycopg.Connection[Any]) -> Iterator[None]:
    """PostgreSQL refuses every audit row from now on (a trigger RAISEs), so an
    admin write fails inside its transaction, after its UPDATE ran."""
    admin.execute(
        "CREATE OR REPLACE FUNCTION pluginhost_test_refuse_audit() RETURNS trigger"
        " LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'audit refused by the test'; END $$"
    )
    admin.execute(
        "CREATE TRIGGER pluginhost_test_refuse_audit BEFORE INSERT ON pluginhost_audit"
        " FOR EACH ROW EXECUTE FUNCTION pluginhost_test_refuse_audit()"
    )
    try:
        yield
    finally:
        admin.execute("DROP TRIGGER IF EXISTS pluginhost_test_refuse_audit ON pluginhost_audit")
        admin.execute("DROP FUNCTION IF EXISTS pluginhost_test_refuse_audit()")


def _in_threads(n: int, fn: Callable[[], Any]) -> None:
    """Run ``fn`` in ``n`` threads at once; every thread has ended when this returns."""
    barrier = threading.Barrier(n)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            barrier.wait()
            fn()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def settled(condition: Callable[[], bool], within_s: float = 2.0) -> None:
    """Assert that ``condition`` holds within ``within_s`` (a closed session leaves
    pg_stat_activity a moment after the client closed it)."""
    deadline = time.monotonic() + within_s
    while not condition():
        assert time.monotonic() < deadline, "not settled in time"
        time.sleep(0.02)


def _after(delay_s: float, action: Callable[[], Any]) -> threading.Timer:
    """A safety net: ``action`` ends the fault after ``delay_s``, so code that would
    block until then returns and fails the test's assertions instead of hanging."""
    timer = threading.Timer(delay_s, action)
    timer.daemon = True
    timer.start()
    return timer


# -- admin writes are transactions ----------------------------------------------


def _rows(admin: psycopg.Connection[Any]) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """Plugins (slug, enabled, version) and audit rows (slug, action), read past the store."""
    plugins = admin.execute("SELECT slug, enabled, version FROM pluginhost_plugins ORDER BY slug").fetchall()
    audit = admin.execute("SELECT slug, action FROM pluginhost_audit ORDER BY id").fetchall()
    return plugins, audit


def test_an_admin_write_that_fails_in_its_transaction_writes_nothing_after_a_reader_thread_ended(
    store: SQLAlchemyStore, admin: psycopg.Connection[Any], request: pytest.FixtureRequest
) -> None:
    store.upsert(Plugin(slug="email"), actor="setup")  # a writer connection is pooled now
    _in_threads(1, store.revision)  # a revision reader came and went (a console thread idling out)
    request.getfixturevalue("audit_refused")
    for attempt in range(5):  # an operator retrying; each attempt may get another pooled connection
        with pytest.raises(StoreUnavailable) as raised:
            store.update("email", {"enabled": False}, action="disable", actor="ops")
        assert _rows(admin) == ([("email", True, 1)], [("email", "create")]), f"attempt {attempt} raised, yet wrote"
    assert "audit refused by the test" in str(raised.value)
    assert "nothing was written" in str(raised.value)


def test_a_disable_that_raises_wrote_nothing_after_a_reader_thread_ended(
    empty_pg_url: str, admin: psycopg.Connection[Any]
) -> None:
    # The reported case: a console thread read the revision and ended; then a
    # disable with an actor PostgreSQL cannot store raised, yet had disabled.
    app = Celery("g6", broker="memory://")
    host = PluginHost(app, SQLAlchemyStore(empty_pg_url, timeout_s=TIMEOUT_S))
    host.register({"slug": "email"}, actor="setup")
    _in_threads(1, host.store.revision)
    for _ in range(3):  # each attempt may get another pooled connection
        with pytest.raises(PluginHostError):
            host.disable("email", actor="ops\x00")
    assert _rows(admin) == ([("email", True, 1)], [("email", "create")])
    assert host.is_enabled("email")
    host.store.close()  # type: ignore[attr-defined]


def test_the_public_engine_hands_out_transactions_after_an_autocommit_borrower(
    store: SQLAlchemyStore, admin: psycopg.Connection[Any]
) -> None:
    # The workflows' hot path borrows connections of ``store.engine`` and sets
    # them to autocommit; the next borrower must still get a transaction.
    for _ in range(3):
        raw = store.engine.raw_connection()
        raw.driver_connection.autocommit = True  # type: ignore[union-attr]
        raw.close()
    with pytest.raises(RuntimeError):
        with store.engine.begin() as conn:
            conn.execute(text("INSERT INTO pluginhost_workers (hostname, revision, seen_at) VALUES ('w', 1, now())"))
            raise RuntimeError("the caller fails inside its transaction")
    assert admin.execute("SELECT count(*) FROM pluginhost_workers").fetchone() == (0,)


def test_every_writer_connection_is_transactional_after_readers_from_many_threads_came_and_went(
    store: SQLAlchemyStore, admin: psycopg.Connection[Any], request: pytest.FixtureRequest
) -> None:
    slugs = [f"p{i:02}" for i in range(24)]
    for slug in slugs:
        store.upsert(Plugin(slug=slug), actor="setup")
    _in_threads(12, store.revision)
    _in_threads(12, store.revision)
    request.getfixturevalue("audit_refused")
    # more writes than the pool holds connections, from one thread and then from
    # many at once: every pooled connection serves at least one of them
    for slug in slugs[:12]:
        with pytest.raises(StoreUnavailable):
            store.update(slug, {"enabled": False}, action="disable", actor="ops")
    pending = iter(slugs[12:])
    lock = threading.Lock()

    def disable_one() -> None:
        with lock:
            slug = next(pending)
        with pytest.raises(StoreUnavailable):
            store.update(slug, {"enabled": False}, action="disable", actor="ops")

    _in_threads(12, disable_one)
    plugins, audit = _rows(admin)
    assert [p for p in plugins if p[1:] != (True, 1)] == [], "writes that raised were committed"
    assert {action for _, action in audit} == {"create"}


def test_revision_readers_are_a_bounded_free_list_of_connections_of_their_own(
    empty_pg_url: str, admin: psycopg.Connection[Any]
) -> None:
    def sessions() -> set[int]:
        rows = admin.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchall()
        return {int(pid) for (pid,) in rows}

    s = SQLAlchemyStore(empty_pg_url, timeout_s=TIMEOUT_S, idle_readers=3)
    try:
        s.migrate()
        s.load()
        before = sessions()
        # 8 reads at once (each waits for a lock on the revision table): 8 readers
        with psycopg.connect(harness.pg_conninfo(str(make_url(empty_pg_url).database))) as locker:
            locker.execute("LOCK TABLE pluginhost_revision IN ACCESS EXCLUSIVE MODE")
            threads = [threading.Thread(target=s.revision) for _ in range(8)]
            for t in threads:
                t.start()
            deadline = time.monotonic() + 1.5
            while len(sessions() - before) < 8:
                assert time.monotonic() < deadline, f"{len(sessions() - before)} readers, not 8"
                time.sleep(0.02)
            locker.rollback()
        for t in threads:
            t.join()
        settled(lambda: len(sessions() - before) == 3)  # the rest were closed as they came back
        _in_threads(8, lambda: [s.revision() for _ in range(50)])
        settled(lambda: len(sessions() - before) <= 3)  # reused, not one per thread
    finally:
        s.close()


# -- deadlines on PostgreSQL ------------------------------------------------------


def test_pooled_calls_through_a_stalled_store_fail_within_the_timeout(
    proxied_store: SQLAlchemyStore, proxy: TcpProxy
) -> None:
    s = proxied_store
    s.upsert(Plugin(slug="email"))
    s.report_worker("w1@host", 1)  # pooled connections exist and are idle
    proxy.stall()
    safety = _after(TIMEOUT_S + 8, proxy.restore)
    try:
        calls: list[Callable[[], Any]] = [s.load, lambda: s.report_worker("w1@host", 2), lambda: s.live_workers(30)]
        for call in calls:
            started = time.monotonic()
            with pytest.raises(StoreUnavailable, match=NO_ANSWER):
                call()
            assert time.monotonic() - started <= TIMEOUT_S + 1
    finally:
        safety.cancel()
    proxy.restore()
    # recovered, and the stalled heartbeat wrote nothing
    assert s.live_workers(30) == {"w1@host": 1}


def test_a_write_stalled_before_its_commit_says_nothing_was_written(
    proxied_store: SQLAlchemyStore, proxy: TcpProxy, store: SQLAlchemyStore
) -> None:
    s = proxied_store
    s.upsert(Plugin(slug="email"), actor="setup")
    proxy.stall()
    safety = _after(TIMEOUT_S + 8, proxy.restore)
    started = time.monotonic()
    try:
        with pytest.raises(StoreUnavailable, match=r"no answer within 2 s.*nothing was written"):
            s.update("email", {"enabled": False}, action="disable", actor="ops")
        assert time.monotonic() - started <= TIMEOUT_S + 1
    finally:
        safety.cancel()
    proxy.restore()
    time.sleep(0.3)  # the proxy forwards what it held, then the client's close: rolled back
    plugin = store.get("email")
    assert plugin is not None and plugin.enabled
    assert [a.action for a in store.audit("email")] == ["create"]
    assert s.update("email", {"enabled": False}, action="disable", actor="ops").changed  # recovered


def test_a_write_stalled_during_its_commit_says_its_outcome_is_unknown(
    proxied_store: SQLAlchemyStore,
    proxy: TcpProxy,
    store: SQLAlchemyStore,
    admin: psycopg.Connection[Any],
) -> None:
    s = proxied_store
    s.upsert(Plugin(slug="email"), actor="setup")
    # the COMMIT takes 0.4 s on the server (a deferred trigger); the network path
    # stalls while it runs, so the client never learns that it committed
    admin.execute(
        "CREATE OR REPLACE FUNCTION pluginhost_test_slow_commit() RETURNS trigger"
        " LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_sleep(0.4); RETURN NULL; END $$"
    )
    admin.execute(
        "CREATE CONSTRAINT TRIGGER pluginhost_test_slow_commit AFTER UPDATE ON pluginhost_plugins"
        " DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION pluginhost_test_slow_commit()"
    )
    stalled = threading.Event()

    def stall_at_commit() -> None:
        conninfo = harness.pg_conninfo(str(make_url(s.url).database))
        with psycopg.connect(conninfo, autocommit=True) as watch:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                row = watch.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND state = 'active' AND query ILIKE 'commit%'"
                ).fetchone()
                if row and row[0]:
                    proxy.stall()
                    stalled.set()
                    return
                time.sleep(0.005)

    watcher = threading.Thread(target=stall_at_commit)
    watcher.start()
    safety = _after(TIMEOUT_S + 8, proxy.restore)
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match=r"no answer within 2 s.*outcome is unknown"):
            s.update("email", {"enabled": False}, action="disable", actor="ops")
        assert time.monotonic() - started <= TIMEOUT_S + 1
    finally:
        safety.cancel()
        watcher.join()
        admin.execute("DROP TRIGGER IF EXISTS pluginhost_test_slow_commit ON pluginhost_plugins")
        admin.execute("DROP FUNCTION IF EXISTS pluginhost_test_slow_commit()")
    assert stalled.is_set()
    # honest: the write did commit, with its audit row
    plugin = store.get("email")
    assert plugin is not None and not plugin.enabled
    audit = [(a.action, a.actor) for a in store.audit("email")]
    assert audit == [("disable", "ops"), ("create", "setup")]


# -- deadlines on SQLite ----------------------------------------------------------


def test_on_sqlite_a_held_write_lock_bounds_registry_writes_while_reads_answer(
    tmp_path: Path,
) -> None:
    path = tmp_path / "store.db"
    s = SQLAlchemyStore(f"sqlite:///{path}", timeout_s=0.5)
    s.migrate()
    s.upsert(Plugin(slug="email"))
    s.report_worker("w1@host", 1)
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")  # another process is writing
    safety = _after(5, holder.rollback)
    try:
        started = time.monotonic()
        # WAL: reads never wait for a writer
        assert s.revision() >= 1 and s.load()[1][0].slug == "email"
        assert time.monotonic() - started < 0.4
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match=r"no answer within 0\.5 s.*nothing was written"):
            s.report_worker("w1@host", 2)  # a heartbeat, in the worker's event loop
        assert time.monotonic() - started <= 0.5 + 1
        # an admin write queues behind the lock for longer (SQLite's busy timeout,
        # 30 s): a writer that holds the file lock is making progress, not hung
        _after(1.0, holder.rollback)
        started = time.monotonic()
        assert s.update("email", {"enabled": False}, action="disable").changed
        assert 0.5 < time.monotonic() - started < 4
    finally:
        safety.cancel()
        holder.close()
        s.close()
