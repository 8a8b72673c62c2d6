"""Self-test of tests/harness/: real workers on every backend start, run tasks and die."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
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


def test_conf_from_env_reads_ph_conf() -> None:
    conf = {"broker_url": "memory://", "pluginhost_store": "memory://"}
    assert harness.conf_from_env({harness.PH_CONF_ENV: json.dumps(conf)}) == conf
    assert harness.conf_from_env({}) == {}


def test_wait_until_returns_the_first_true_value_or_says_what_it_waited_for() -> None:
    values = iter([0, None, "ready", "later"])
    assert harness.wait_until(lambda: next(values), 5.0, 0.001) == "ready"
    started = time.monotonic()
    assert harness.wait_until(lambda: 0, 0.1, 0.01) == 0
    assert time.monotonic() - started >= 0.1
    with pytest.raises(AssertionError, match="after 0.05 s waiting for the moon"):
        harness.wait_until(lambda: False, 0.05, 0.01, what="the moon")


@pytest.mark.parametrize("backend", ["redis"], indirect=True)
def test_claim_redis_db_skips_live_owners_and_takes_a_dead_sessions_db(
    backend: harness.Backend, harness_resources: harness.SessionResources
) -> None:
    import redis

    db = harness_resources.redis_db()
    key = harness.REDIS_OWNER_KEY
    client = redis.Redis(host=harness.LOCALHOST, port=harness.REDIS_PORT, db=db)
    try:
        for live in (harness_resources.owner, "another-host:1"):  # this process; another machine's
            client.set(key, live)
            with pytest.raises(RuntimeError, match=f"every Redis db index of {db} is claimed"):
                harness.claim_redis_db("the-next-one", [db])
        gone = subprocess.Popen([sys.executable, "-c", ""])
        gone.wait()
        client.set(key, f"{socket.gethostname()}:{gone.pid}")
        client.set("left-over", "x")
        assert harness.claim_redis_db("the-next-one", [db], ttl_s=60) == db
        assert client.get("left-over") is None  # flushed
        assert client.get(key) == b"the-next-one" and 0 < client.ttl(key) <= 60
        harness.release_redis_db(db, "not-the-owner")
        assert client.get(key) == b"the-next-one"
    finally:
        client.set(key, harness_resources.owner, ex=harness.REDIS_CLAIM_TTL_S)
        client.close()


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
        assert worker not in harness.workers._LIVE_WORKERS
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
    assert harness.wait_until(lambda: group_states(worker) == {"T"}, 5.0, 0.01), group_states(worker)
    assert not worker.ping(timeout=0.3)
    worker.resume()
    assert worker.ping(timeout=5)

    os.killpg(worker.pgid, signal.SIGKILL)  # from outside the harness, like the OOM killer
    assert harness.wait_until(lambda: worker.group_pids() == [], 5.0, 0.01)
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
