"""Fixtures for tests that run real Celery workers (the machinery is in tests/harness.py).

Fixtures:

- ``backend`` -> :class:`harness.Backend`: parametrized over ``embedded``, ``redis``
  and ``amqp``; pick some with
  ``@pytest.mark.parametrize("backend", ["embedded"], indirect=True)``.
- ``app_conf`` -> ``dict``: the Celery settings of this test (``pluginhost_store``
  included), with a queue and control exchange of its own; the store is emptied
  before the test.
- ``configure_app`` -> ``(app) -> app``: applies ``app_conf`` to an in-process app.
- ``workers`` -> :class:`harness.WorkerFactory`: ``workers("tests.apps.bare", pool=...)``
  starts a worker and waits until it answers a ping; at teardown, pass or fail,
  every one is SIGKILLed and reaped (call ``worker.stop()`` in the test to go
  through Celery's warm shutdown), and on a failure the end of each worker's log
  is added to the report.
- ``empty_store`` -> ``() -> list[str]``: empties the store's tables again, mid-test
  (seed rows of :data:`harness.SEED_ROWS` are put back).
- ``harness_resources`` (session) -> :class:`harness.SessionResources`.

Service checks: before any test runs, every service a collected test's backend
needs is checked. Down under ``CI=true``: the run stops, naming the service and
the command that starts it. Down elsewhere: those tests are skipped with that
message. Tests that use ``backend`` get the ``integration`` marker.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from tests import harness


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def _backend_id(item: pytest.Item) -> str | None:
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return None
    value = callspec.params.get("backend")
    return value if isinstance(value, str) else None


def _down_services(backend_id: str) -> list[str]:
    """Messages for each service this backend needs that does not answer."""
    messages = []
    for name in harness.BACKENDS[backend_id].services:
        problem = harness.check_service(name)
        if problem:
            messages.append(harness.service_down_message(name, problem))
    return messages


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    used = sorted({b for b in map(_backend_id, items) if b is not None})
    down = {b: _down_services(b) for b in used}
    if _in_ci():
        problems = sorted({m for messages in down.values() for m in messages})
        if problems:
            pytest.exit(
                "CI=true and a service the integration tests need is down:\n  " + "\n  ".join(problems),
                returncode=3,
            )
    for item in items:
        backend_id = _backend_id(item)
        if backend_id is None:
            continue
        item.add_marker(pytest.mark.integration)
        if down.get(backend_id):
            item.add_marker(pytest.mark.skip(reason="; ".join(down[backend_id])))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """On failure, add the end of each worker's log to the test's report."""
    report = yield
    if report.failed and report.when in ("setup", "call"):
        factory = getattr(item, "funcargs", {}).get("workers")
        if isinstance(factory, harness.WorkerFactory):
            for worker in factory.started:
                report.sections.append(
                    (
                        f"worker {worker.hostname} log, last 60 lines ({worker.log_path})",
                        worker.log_tail(60),
                    )
                )
    return report


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    harness.kill_all_workers()  # safety net; fixtures normally stopped them all


@pytest.fixture(scope="session")
def harness_resources() -> Iterator[harness.SessionResources]:
    """This session's PostgreSQL database and Redis db index, made on first use."""
    resources = harness.SessionResources()
    yield resources
    harness.kill_all_workers()  # nothing may hold the database open now
    resources.close()


@pytest.fixture
def empty_pg_url(harness_resources: harness.SessionResources) -> str:
    """The URL of this session's PostgreSQL database, emptied (skipped, or failed
    under CI=true, when PostgreSQL is down)."""
    problem = harness.check_service("postgres")
    if problem:
        pytest.skip(harness.service_down_message("postgres", problem))
    url = harness.pg_url(harness_resources.pg_database())
    harness.empty_store(url)
    return url


@pytest.fixture(params=harness.BACKEND_IDS)
def backend(request: pytest.FixtureRequest) -> harness.Backend:
    """The (broker, result backend, store) combination of this test."""
    backend_id = request.param
    if backend_id not in harness.BACKENDS:
        raise pytest.UsageError(f"unknown backend {backend_id!r}; known: {harness.BACKEND_IDS}")
    down = _down_services(backend_id)  # cached: normally checked at collection already
    if down:
        if _in_ci():
            pytest.exit("; ".join(down), returncode=3)
        pytest.skip("; ".join(down))
    return harness.BACKENDS[backend_id]


@pytest.fixture
def app_conf(
    backend: harness.Backend, harness_resources: harness.SessionResources, tmp_path: Path
) -> Iterator[dict[str, Any]]:
    """Celery settings for this test; its store starts empty."""
    conf = harness.build_conf(backend, tmp_path, harness_resources)
    harness.empty_store(conf["pluginhost_store"])
    yield conf
    harness.delete_broker_objects(conf, [conf["task_default_queue"]])


@pytest.fixture
def empty_store(app_conf: dict[str, Any]) -> Callable[[], list[str]]:
    """Empty the store's tables (all but ``*alembic_version*``) when called."""
    return lambda: harness.empty_store(app_conf["pluginhost_store"])


@pytest.fixture
def configure_app(app_conf: dict[str, Any]) -> Iterator[Callable[[Any], Any]]:
    """``configure_app(app)`` points an in-process Celery app at this test's settings."""
    configured: list[Any] = []

    def configure(app: Any) -> Any:
        configured.append(app)
        return harness.configure_app(app, app_conf)

    yield configure
    for app in configured:
        harness.reset_app(app)  # close this test's connections


@pytest.fixture
def workers(app_conf: dict[str, Any], tmp_path: Path) -> Iterator[harness.WorkerFactory]:
    """Start workers with ``workers(app_module, **kw)``; all are killed at teardown."""
    factory = harness.WorkerFactory(app_conf, log_dir=tmp_path / "workers")
    yield factory
    problems = factory.stop_all()
    harness.delete_broker_objects(app_conf, factory.queues())
    if problems:
        pytest.fail("workers did not stop cleanly:\n" + "\n".join(problems))


@pytest.fixture
def core(app_conf: dict[str, Any], configure_app: Callable[[Any], Any]) -> Iterator[Any]:
    """tests.apps.core (capabilities and the ``flow`` workflow) pointed at this
    test's broker, result backend and store."""
    from tests.apps import core as module

    configure_app(module.app)
    module.host.with_store(app_conf["pluginhost_store"])
    module.host.sync()
    module.flows.define(module.FLOW)
    yield module
    module.host.store.close()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[Any]:
    """A redis-server of this test's own, keeping nothing on disk (a broker a test
    may kill and start again); stopped at teardown."""
    from tests.servers import PrivateRedis

    server = PrivateRedis(tmp_path / "redis")
    try:
        server.start(timeout_s=30)
        yield server
    finally:
        server.stop(timeout_s=10)


@pytest.fixture
def nologin_role(app_conf: dict[str, Any]) -> Any:
    """A role of its own for the worker (with rights on the store's tables), so the
    test can take LOGIN away from it while the admin keeps connecting as postgres."""
    admin_url = app_conf["pluginhost_store"]
    role = "ph_bounds_" + app_conf["task_default_queue"].split("-")[-1][:8]
    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f"DROP ROLE IF EXISTS {role}"))
        conn.execute(text(f"CREATE ROLE {role} LOGIN"))
        conn.execute(text(f"GRANT ALL ON SCHEMA public TO {role}"))
        conn.execute(text(f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {role}"))
        conn.execute(text(f"GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {role}"))

    def set_login(allowed: bool) -> None:
        with engine.connect() as conn:
            conn.execute(text(f"ALTER ROLE {role} {'LOGIN' if allowed else 'NOLOGIN'}"))

    url = admin_url.replace("postgres@", f"{role}@", 1)
    yield url, set_login
    with engine.connect() as conn:
        conn.execute(text(f"ALTER ROLE {role} LOGIN"))
        conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = :r"), {"r": role})
    for _ in range(50):
        try:
            with engine.connect() as conn:
                conn.execute(text(f"DROP OWNED BY {role}"))
                conn.execute(text(f"DROP ROLE IF EXISTS {role}"))
            break
        except Exception:  # noqa: BLE001 - its backends are still going away
            time.sleep(0.1)
    engine.dispose()
