"""The workflow store's run and step writes, on SQLite and PostgreSQL.

On PostgreSQL the per-run and per-step writes take the hot path
(workflows/hotpath.py, prepared statements on a kept connection); these tests
hold both paths to the same results, and the hot path to the store's outage
contract (a dead kept connection is replaced, an unreachable server is
``StoreUnavailable``).
"""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import create_engine

from pluginhost import StoreUnavailable
from tests import harness
from workflows.errors import WorkflowNotFound
from workflows.store import WorkflowStore

LAYOUT = [(0, 0, "a"), (1, 1, "b"), (2, 1, "c"), (3, 2, "d")]


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[WorkflowStore]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'flows.db'}"
    else:
        url = request.getfixturevalue("empty_pg_url")
    engine = create_engine(url, pool_pre_ping=True)
    s = WorkflowStore(engine)
    s.migrate()
    yield s
    engine.dispose()


def _run(store: WorkflowStore) -> str:
    run_id = str(uuid.uuid4())
    assert store.create_run(run_id, "flow", 1, {"user": "ana", "n": 1}, LAYOUT) is True
    return run_id


def test_a_run_is_created_with_its_pending_steps_once(store: WorkflowStore) -> None:
    run_id = _run(store)
    assert store.create_run(run_id, "flow", 1, {"other": True}, LAYOUT) is False  # redelivered start
    run = store.get_run(run_id)
    assert run is not None
    assert (run.status, run.input, run.context, run.version) == ("pending", {"user": "ana", "n": 1}, run.input, 1)
    assert [(s.position, s.stage, s.slug, s.status, s.attempts) for s in run.steps] == [
        (0, 0, "a", "pending", 0), (1, 1, "b", "pending", 0), (2, 1, "c", "pending", 0), (3, 2, "d", "pending", 0)
    ]


def test_steps_record_running_then_their_outcome_and_the_last_one_the_run(store: WorkflowStore) -> None:
    run_id = _run(store)
    row = store.begin_step(run_id, 0, "w1", first=True)
    assert (row.position, row.slug, row.status, row.attempts) == (0, "a", "running", 1)
    running = store.get_run(run_id)
    assert running is not None and running.status == "running" and running.started_at is not None
    assert running.steps[0].worker == "w1" and running.steps[0].started_at is not None

    assert store.finish_step(run_id, 0, "succeeded", output={"a": 1}, plugin_version=7) is None
    store.begin_step(run_id, 1, "w2")
    store.finish_step(run_id, 1, "skipped", error="plugin 'b' is disabled")
    store.begin_step(run_id, 3, "w1")
    name = store.finish_step(run_id, 3, "succeeded", output={"d": "é ✓"}, run_output={"n": 1, "a": 1, "d": "é ✓"})
    assert name == "flow"

    run = store.get_run(run_id)
    assert run is not None
    assert (run.status, run.output, run.context) == ("succeeded", {"n": 1, "a": 1, "d": "é ✓"}, run.output)
    a, b, _, d = run.steps
    assert (a.status, a.output, a.plugin_version, a.error) == ("succeeded", {"a": 1}, 7, None)
    assert (b.status, b.output, b.error) == ("skipped", None, "plugin 'b' is disabled")
    assert d.output == {"d": "é ✓"} and d.finished_at is not None and run.finished_at is not None


def test_a_redelivered_step_sees_its_recorded_outcome(store: WorkflowStore) -> None:
    run_id = _run(store)
    store.begin_step(run_id, 0, "w1", first=True)
    store.finish_step(run_id, 0, "succeeded", output={"a": 1})
    again = store.begin_step(run_id, 0, "w2", first=True)
    assert (again.status, again.attempts, again.output) == ("succeeded", 1, {"a": 1})
    steps = store.get_run(run_id).steps  # type: ignore[union-attr]
    assert steps[0].worker == "w1"  # untouched by the duplicate


def test_a_second_attempt_counts_and_an_unknown_step_is_an_error(store: WorkflowStore) -> None:
    run_id = _run(store)
    store.begin_step(run_id, 0, "w1", first=True)
    assert store.begin_step(run_id, 0, "w2", first=True).attempts == 2  # the first worker died
    with pytest.raises(WorkflowNotFound, match="no step at position 9"):
        store.begin_step(run_id, 9, "w1")
    with pytest.raises(WorkflowNotFound):
        store.begin_step("no-such-run", 0, "w1")


def test_finishing_a_run_twice_keeps_its_first_end_time(store: WorkflowStore) -> None:
    run_id = _run(store)
    store.finish_run(run_id, {"x": 1})
    first = store.get_run(run_id).finished_at  # type: ignore[union-attr]
    time.sleep(0.01)
    assert store.finish_run(run_id, {"x": 1}) == "flow"
    assert store.get_run(run_id).finished_at == first  # type: ignore[union-attr]


def test_newest_names_the_newest_stored_definition(store: WorkflowStore) -> None:
    assert store.newest("flow") is None
    store.define("flow", {"name": "flow", "steps": ["a"]}, actor="ana")
    first = store.newest("flow")
    store.define("flow", {"name": "flow", "steps": ["a", "b"]}, actor="ana")
    newest = store.newest("flow")
    assert first is not None and newest is not None
    assert (first[0], newest[0]) == (1, 2) and newest[1] >= first[1]


@pytest.mark.parametrize("store", ["postgres"], indirect=True)
def test_postgres_hot_path_replaces_a_connection_that_died(store: WorkflowStore) -> None:
    run_id = _run(store)
    store.begin_step(run_id, 0, "w1", first=True)
    pid = store._hot._local.raw.driver_connection.info.backend_pid  # type: ignore[union-attr]
    with psycopg.connect(harness.pg_conninfo(store.engine.url.database or ""), autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    store.finish_step(run_id, 0, "succeeded", output={"a": 1})  # on a new connection
    assert store.get_run(run_id).steps[0].status == "succeeded"  # type: ignore[union-attr]


def test_postgres_hot_path_fails_with_store_unavailable_when_the_server_is_unreachable() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind((harness.LOCALHOST, 0))
        port = s.getsockname()[1]
    engine = create_engine(
        f"postgresql+psycopg://postgres@{harness.LOCALHOST}:{port}/test", connect_args={"connect_timeout": 1}
    )
    store = WorkflowStore(engine)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="workflow store unreachable"):
        store.create_run(str(uuid.uuid4()), "flow", 1, {}, LAYOUT)
    with pytest.raises(StoreUnavailable):
        store.begin_step("r", 0, "w1")
    assert time.monotonic() - started < 4
