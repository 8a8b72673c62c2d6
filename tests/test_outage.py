"""Database outages: producers fail closed within a bounded time and enqueue
nothing; admin calls write nothing; workers keep running on their last known
state, log the outage once, and recover without a restart.

The database is cut off through a TCP proxy (tests/tcpproxy.py) in front of the
session's PostgreSQL database, so the shared server itself is never stopped.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from pluginhost import CapabilityDisabled, StoreUnavailable
from tests.tcpproxy import TcpProxy

pytestmark = pytest.mark.parametrize("backend", ["redis"], indirect=True)


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
