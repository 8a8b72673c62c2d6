"""Green pools (gevent): greenlet-local state must not mean a database connection
per task. Under gevent's monkey patching ``threading.local`` is per greenlet, and
every task runs in a greenlet of its own."""

from __future__ import annotations

import importlib.util
from types import ModuleType
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from tests.apps import green_app

pytestmark = [
    pytest.mark.parametrize("backend", ["redis"], indirect=True),
    pytest.mark.skipif(importlib.util.find_spec("gevent") is None, reason="needs gevent"),
]
TASKS = 200


@pytest.fixture
def green(app_conf: dict[str, Any], configure_app: Any) -> Any:
    configure_app(green_app.app)
    green_app.host.with_store(app_conf["pluginhost_store"])
    green_app.host.sync()
    yield green_app
    green_app.host.store.close()


def _sessions(url: str) -> int:
    """Sessions ever established to the store's database (PostgreSQL 14+)."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return int(
                conn.execute(
                    text("SELECT sessions FROM pg_stat_database WHERE datname = current_database()")
                ).scalar_one()
            )
    finally:
        engine.dispose()


def test_a_gevent_worker_does_not_open_a_connection_per_task(
    green: ModuleType, workers: Any, app_conf: dict[str, Any]
) -> None:
    workers("tests.apps.green_app", pool="gevent", concurrency=20)
    host = green.host

    def batch() -> None:
        results = [host.run_capability("relay", {"n": i}) for i in range(TASKS)]
        assert len({r.get(timeout=60) for r in results}) == TASKS

    batch()  # the worker's connections exist now (at most one per concurrent task)
    before = _sessions(app_conf["pluginhost_store"])
    batch()
    opened = _sessions(app_conf["pluginhost_store"]) - before - 1  # -1: _sessions() itself
    assert opened <= 2, f"{opened} new database sessions for {TASKS} more tasks"
