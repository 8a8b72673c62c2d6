"""Self-test of tests/harness.py: real workers on every backend start, run tasks and die."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests import harness
from tests.apps import bare

APP = "tests.apps.bare"


def result(async_result: Any) -> Any:
    """Wait for a task's result; poll a database result backend every 20 ms, not 500."""
    return async_result.get(timeout=10, interval=0.02)


def assert_no_process_left(pids: list[int], pgid: int) -> None:
    """None of ``pids`` runs any more, and group ``pgid`` has no member, not even a zombie."""
    still_running = [pid for pid in pids if harness.pid_alive(pid)]
    assert still_running == [], f"processes still running: {still_running}"
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # not even a zombie: reaped
    assert harness.group_members(pgid, include_zombies=True) == []


def group_states(worker: harness.Worker) -> set[str]:
    """The /proc states of the worker's live processes ("T": stopped)."""
    infos = (harness.read_proc(pid) for pid in worker.group_pids())
    return {info.state for info in infos if info is not None}


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    return True


def test_conf_from_env_reads_ph_conf() -> None:
    conf = {"broker_url": "memory://", "pluginhost_store": "memory://"}
    assert harness.conf_from_env({harness.PH_CONF_ENV: json.dumps(conf)}) == conf
    assert harness.conf_from_env({}) == {}


def test_app_conf_isolates_each_test(
    backend: harness.Backend,
    app_conf: dict[str, Any],
    harness_resources: harness.SessionResources,
    tmp_path: Any,
) -> None:
    other = harness.build_conf(backend, tmp_path / "other", harness_resources)
    assert app_conf["task_default_queue"] != other["task_default_queue"]
    assert app_conf["control_exchange"] != other["control_exchange"]
    assert "pluginhost_store" in app_conf
    json.dumps(app_conf)


def test_workers_run_tasks_and_stop_cleanly(
    backend: harness.Backend,
    app_conf: dict[str, Any],
    configure_app: Any,
    workers: harness.WorkerFactory,
) -> None:
    app = configure_app(bare.app)
    queue = app_conf["task_default_queue"]
    # both consume the shared queue, and each one a queue of its own
    prefork = workers(
        APP,
        pool="prefork",
        concurrency=2,
        name="prefork",
        queues=[queue, f"{queue}-prefork"],
        wait=False,
    )
    solo = workers(APP, pool="solo", name="solo", queues=[queue, f"{queue}-solo"], wait=False)
    prefork.wait_ready()
    solo.wait_ready()

    assert prefork.ping() and solo.ping()
    assert result(bare.add.delay(2, 3)) == 5
    assert result(app.send_task("bare.add", (40, 2))) == 42
    pool_children = prefork.children()
    assert len(pool_children) == 2
    assert result(bare.getpid.apply_async(queue=f"{queue}-prefork")) in pool_children
    assert result(bare.getpid.apply_async(queue=f"{queue}-solo")) == solo.pid

    groups = {worker: worker.group_pids() for worker in (prefork, solo)}
    assert all(worker.pid in pids for worker, pids in groups.items())
    # stop() is request_stop() + finish_stop(): split here so both stop at once
    for worker in groups:
        worker.request_stop()
    for worker, pids in groups.items():
        assert worker.finish_stop(timeout=15) == 0  # a warm shutdown exits 0
        assert_no_process_left(pids, worker.pgid)
        assert not worker.ping(timeout=0.2)


@pytest.fixture
def check_reaped_after_teardown() -> Iterator[dict[harness.Worker, list[int]]]:
    """Workers put in this dict (with their pool children) are checked after
    ``workers`` has torn down.

    Request it before ``workers``: fixtures are torn down in reverse order.
    """
    recorded: dict[harness.Worker, list[int]] = {}
    yield recorded
    for worker, children in recorded.items():
        assert worker.returncode == -signal.SIGKILL
        assert worker not in harness._LIVE_WORKERS
        assert_no_process_left([worker.pid, *children], worker.pgid)


# Signals and reaping are about processes, not brokers: one backend is enough.
@pytest.mark.parametrize("backend", ["embedded"], indirect=True)
def test_pause_resume_and_a_sigkilled_worker_is_reaped_by_teardown(
    check_reaped_after_teardown: dict[harness.Worker, list[int]],
    backend: harness.Backend,
    workers: harness.WorkerFactory,
) -> None:
    worker = workers(APP, pool="prefork", concurrency=2)
    check_reaped_after_teardown[worker] = worker.children()
    assert len(check_reaped_after_teardown[worker]) == 2

    worker.pause()  # SIGSTOP reaches the pool children too
    assert wait_for(lambda: group_states(worker) == {"T"}), group_states(worker)
    assert not worker.ping(timeout=0.3)
    worker.resume()
    assert worker.ping(timeout=5)

    os.killpg(worker.pgid, signal.SIGKILL)  # from outside the harness, like the OOM killer
    assert wait_for(lambda: worker.group_pids() == [])
    # not reaped yet: the main process is a zombie until teardown waits for it
    assert worker.proc.returncode is None


@pytest.mark.parametrize("backend", ["embedded", "redis"], indirect=True)
def test_empty_store_keeps_tables_and_alembic_version(backend: harness.Backend, app_conf: dict[str, Any]) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(app_conf["pluginhost_store"])
    try:
        with engine.begin() as conn:
            ident = "SERIAL" if engine.dialect.name == "postgresql" else "INTEGER"
            conn.execute(text(f"CREATE TABLE pluginhost_things (id {ident} PRIMARY KEY, v TEXT)"))
            conn.execute(text("CREATE TABLE alembic_version (version_num TEXT)"))
            conn.execute(text("INSERT INTO pluginhost_things (v) VALUES ('a'), ('b')"))
            conn.execute(text("INSERT INTO alembic_version VALUES ('head')"))

        assert "pluginhost_things" in harness.empty_store(app_conf["pluginhost_store"])

        with engine.begin() as conn:
            assert conn.execute(text("SELECT count(*) FROM pluginhost_things")).scalar() == 0
            assert conn.execute(text("SELECT count(*) FROM alembic_version")).scalar() == 1
            if engine.dialect.name == "postgresql":  # identities restart
                conn.execute(text("INSERT INTO pluginhost_things (v) VALUES ('c')"))
                assert conn.execute(text("SELECT max(id) FROM pluginhost_things")).scalar() == 1
            conn.execute(text("DROP TABLE pluginhost_things"))
            conn.execute(text("DROP TABLE alembic_version"))
    finally:
        engine.dispose()


@pytest.mark.parametrize("backend", ["embedded", "redis"], indirect=True)
def test_empty_store_leaves_a_migrated_store_usable(backend: harness.Backend, app_conf: dict[str, Any]) -> None:
    """SEED_ROWS matches the migrations: after emptying, the store works as if new."""
    from pluginhost import Plugin, SQLAlchemyStore

    store = SQLAlchemyStore(app_conf["pluginhost_store"])
    try:
        store.migrate()
        fresh = store.revision()
        store.upsert(Plugin(slug="email"))
        assert store.revision() > fresh

        harness.empty_store(app_conf["pluginhost_store"])

        assert store.revision() == fresh
        assert store.load()[1] == []
        _, revision, _ = store.upsert(Plugin(slug="email"))
        assert revision > fresh
    finally:
        store.close()
