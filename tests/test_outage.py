"""Database outages: producers fail closed within a bounded time and enqueue
nothing; admin calls write nothing; workers keep running on their last known
state, log the outage once, and recover without a restart.

The database is cut off through a TCP proxy (tests/tcpproxy.py) in front of the
session's PostgreSQL database, so the shared server itself is never stopped. A
*stall* (the proxy keeps every socket open and forwards nothing: a hung network
path or pgbouncer) and a lock held by another connection are bounded by
``pluginhost_store_timeout_s`` (default 2 s): past it, ``StoreUnavailable``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from pluginhost import CapabilityDisabled, StoreUnavailable
from tests import harness
from tests.tcpproxy import TcpProxy

pytestmark = pytest.mark.parametrize("backend", ["redis"], indirect=True)

STORE_TIMEOUT_S = 2.0  # pluginhost_store_timeout_s, the default (the tests do not set it)


@pytest.fixture
def proxy() -> Iterator[TcpProxy]:
    p = TcpProxy(("127.0.0.1", 5432))
    yield p
    p.close()


@pytest.fixture
def proxied(app_conf: dict[str, Any], proxy: TcpProxy) -> dict[str, Any]:
    """This test's settings with the store reached through the proxy."""
    dbname = make_url(app_conf["pluginhost_store"]).database
    return {**app_conf, "pluginhost_store": proxy.url(str(dbname)), "pluginhost_poll_interval_s": 0.3}


@pytest.fixture
def core(proxied: dict[str, Any], configure_app: Any) -> Iterator[ModuleType]:
    from tests.apps import core as module

    configure_app(module.app)
    module.host.with_store(proxied["pluginhost_store"])
    module.host.sync()
    yield module
    module.host.store.close()


def queue_size(app: Any, queue: str) -> int:
    with app.connection_for_write() as conn:
        return int(conn.default_channel.queue_declare(queue, passive=True).message_count)


@pytest.mark.parametrize("fault", ["cut", "blackhole"])
def test_dispatch_fails_closed_within_two_seconds_and_enqueues_nothing(
    core: ModuleType, proxy: TcpProxy, proxied: dict[str, Any], fault: str
) -> None:
    host, queue = core.host, proxied["task_default_queue"]
    host.run_capability("pure", {"n": 0})
    before = queue_size(core.app, queue)
    audit_before = len(host.audit())
    getattr(proxy, fault)()
    for _ in range(3):
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="unreachable"):
            host.run_capability("pure", {"n": 1})
        assert time.monotonic() - started <= 2.5
    with pytest.raises(StoreUnavailable):
        host.disable("pure", actor="ops")
    assert queue_size(core.app, queue) == before
    proxy.restore()
    # recovery without a restart: the same host dispatches again, nothing was written
    host.run_capability("pure", {"n": 2})
    assert queue_size(core.app, queue) == before + 1
    assert host.is_enabled("pure") and len(host.audit()) == audit_before


def test_workers_keep_their_last_state_during_an_outage_and_recover(
    core: ModuleType, proxy: TcpProxy, proxied: dict[str, Any], workers: Any
) -> None:
    w = workers("tests.apps.core", conf=proxied, pool="prefork")
    host = core.host
    assert host.run_capability("pure", {"n": 0}).get(timeout=20)["echo"] == {"n": 0}
    proxy.cut()
    time.sleep(1.0)  # several poll ticks fail while the database is away
    results = [host.task("pure").delay({"n": i}) for i in range(20)]  # bypass the (failing) dispatch check
    assert [r.get(timeout=30)["echo"]["n"] for r in results] == list(range(20))
    assert w.log_text().count("store unavailable") == 1  # logged once, not per task or tick
    proxy.restore()
    host.disable("pure", wait=True, timeout=2.0)
    deadline = time.monotonic() + 5
    while host.workers(timeout=0.3).get(w.hostname, {}).get("revision") != host.revision:
        assert time.monotonic() < deadline, "worker did not converge after the outage"
    with pytest.raises(CapabilityDisabled):
        host.task("pure").delay({"n": 99}).get(timeout=20)
    assert "store reachable again" in w.log_text()


def _after(delay_s: float, action: Callable[[], Any]) -> threading.Timer:
    """Run ``action`` after ``delay_s`` (a safety net: code that would block until
    the fault ends returns then, and the test fails on its assertions instead of
    hanging until pytest's timeout)."""
    timer = threading.Timer(delay_s, action)
    timer.daemon = True
    timer.start()
    return timer


def test_dispatch_through_a_stalled_store_fails_closed_within_the_timeout_and_enqueues_nothing(
    core: ModuleType, proxy: TcpProxy, proxied: dict[str, Any]
) -> None:
    host, queue = core.host, proxied["task_default_queue"]
    host.run_capability("pure", {"n": 0})  # this thread's revision reader is connected now
    before = queue_size(core.app, queue)
    proxy.stall()
    safety = _after(STORE_TIMEOUT_S + 6, proxy.restore)
    try:
        # first on the kept connection (the query is sent, no answer comes), then on
        # new ones (the proxy accepts them, the startup packet is never answered)
        for _ in range(3):
            started = time.monotonic()
            with pytest.raises(StoreUnavailable, match=r"no answer within 2 s \(pluginhost_store_"):
                host.run_capability("pure", {"n": 1})
            assert time.monotonic() - started <= STORE_TIMEOUT_S + 1
    finally:
        safety.cancel()
    assert queue_size(core.app, queue) == before
    proxy.restore()
    host.run_capability("pure", {"n": 2})  # recovers without a restart
    assert queue_size(core.app, queue) == before + 1


def test_dispatch_blocked_by_a_lock_on_the_revision_table_fails_closed_within_the_timeout(
    core: ModuleType, proxied: dict[str, Any]
) -> None:
    import psycopg

    host, queue = core.host, proxied["task_default_queue"]
    host.run_capability("pure", {"n": 0})
    before = queue_size(core.app, queue)
    dbname = str(make_url(proxied["pluginhost_store"]).database)
    with (
        psycopg.connect(harness.pg_conninfo(dbname)) as locker,
        psycopg.connect(harness.pg_conninfo(dbname), autocommit=True) as observer,
    ):
        locker.execute("LOCK TABLE pluginhost_revision IN ACCESS EXCLUSIVE MODE")
        safety = _after(STORE_TIMEOUT_S + 6, locker.rollback)
        try:
            for _ in range(2):
                started = time.monotonic()
                with pytest.raises(StoreUnavailable, match="within 2 s"):
                    host.run_capability("pure", {"n": 1})
                assert time.monotonic() - started <= STORE_TIMEOUT_S + 1
            # the server gave up too: no session of ours is left queued behind the lock
            # (each would hold a connection until the lock goes)
            waiting = observer.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
            ).fetchone()
            assert waiting == (0,)
        finally:
            safety.cancel()
            locker.rollback()
    assert queue_size(core.app, queue) == before
    host.run_capability("pure", {"n": 2})
    assert queue_size(core.app, queue) == before + 1


def test_a_worker_whose_store_stalls_still_answers_pings_and_broadcasts(
    core: ModuleType, proxy: TcpProxy, proxied: dict[str, Any], workers: Any
) -> None:
    # polls every 0.3 s and heartbeats every 0.5 s: both are due many times during the stall
    conf = {**proxied, "pluginhost_heartbeat_interval": 0.5}
    w = workers("tests.apps.core", conf=conf, pool="threads")
    proxy.stall()
    safety = _after(30, proxy.restore)
    try:
        time.sleep(STORE_TIMEOUT_S / 2)  # a poll and a heartbeat wait on the stalled store now
        ends = time.monotonic() + 3 * STORE_TIMEOUT_S
        while time.monotonic() < ends:
            started = time.monotonic()
            assert w.ping(timeout=STORE_TIMEOUT_S + 1.5), "a store call blocks the event loop"
            replies = core.app.control.broadcast(
                "pluginhost_refresh",
                arguments={"revision": 0},
                reply=True,
                timeout=STORE_TIMEOUT_S + 1.5,
                destination=[w.hostname],
                limit=1,
            )
            assert any(w.hostname in r for r in replies), "no pluginhost_refresh reply in the stall"
            assert time.monotonic() - started <= 2 * STORE_TIMEOUT_S + 3
    finally:
        safety.cancel()
        proxy.restore()
    assert w.ping(timeout=3)
