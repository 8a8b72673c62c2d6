"""The workflow store's run and step writes, on SQLite and PostgreSQL.

On PostgreSQL the per-run and per-step writes take the hot path
(workflows/store/postgres.py, prepared statements on a kept connection); these tests
hold both paths to the same results, and the hot path to the store's outage
contract (a dead kept connection is replaced, an unreachable server is
``StoreUnavailable``).
"""

from __future__ import annotations

import dataclasses
import gc
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import create_engine, insert

from pluginhost import StoreUnavailable
from tests import harness
from workflows import Workflow
from workflows.errors import WorkflowNotFound
from workflows.store import Outcome, WorkflowStore, open_workflow_store
from workflows.store import runs as runs_table

LAYOUT = [(0, 0, "a"), (1, 1, "b"), (2, 1, "c"), (3, 2, "d")]


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[WorkflowStore]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'flows.db'}"
    else:
        url = request.getfixturevalue("empty_pg_url")
    engine = create_engine(url, pool_pre_ping=True)
    s = open_workflow_store(engine)
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
        (0, 0, "a", "pending", 0),
        (1, 1, "b", "pending", 0),
        (2, 1, "c", "pending", 0),
        (3, 2, "d", "pending", 0),
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
    # the same process again (its first attempt is over); a live other owner is
    # refused: tests/test_workflows_g4.py
    assert store.begin_step(run_id, 0, "w2", first=True).attempts == 2
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
    pid = store._session().conn.info.backend_pid  # type: ignore[attr-defined]
    with psycopg.connect(harness.pg_conninfo(store.engine.url.database or ""), autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    store.finish_step(run_id, 0, "succeeded", output={"a": 1})  # on a new connection
    assert store.get_run(run_id).steps[0].status == "succeeded"  # type: ignore[union-attr]


@pytest.mark.parametrize("store", ["postgres"], indirect=True)
def test_a_thread_that_wrote_steps_leaves_the_engines_transactions_atomic(store: WorkflowStore) -> None:
    """Steps run on threads that end (the threads pool, the console's anyio
    threads, which end after 10 s idle). The store's step writes run in
    autocommit; a connection of theirs must not go back to the engine that
    migrations, the SQLAlchemy writes and users' direct SQL share, or those
    transactions stop being transactions (a rolled-back insert stays)."""
    run_id = _run(store)

    def steps() -> None:
        store.begin_step(run_id, 0, "w1", first=True)
        store.post_step(run_id, store.outcome(0, "succeeded", output={"a": 1}))
        store.begin_step(run_id, 1, "w1")
        store.finish_step(run_id, 1, "succeeded", output={"b": 1})

    for _ in range(3):
        worker = threading.Thread(target=steps)
        worker.start()
        worker.join()
        del worker
    gc.collect()

    engine = store.engine
    held = [engine.connect() for _ in range(engine.pool.size())]  # type: ignore[attr-defined]
    try:
        for i, conn in enumerate(held):
            tx = conn.begin()
            conn.execute(
                insert(runs_table).values(
                    id=f"probe-{i}",
                    name="p",
                    version=1,
                    status="pending",
                    input={},
                    context={},
                    created_at=datetime.now(timezone.utc),
                )
            )
            tx.rollback()
    finally:
        for conn in held:
            conn.close()
    kept = [i for i in range(len(held)) if store.get_run(f"probe-{i}") is not None]
    assert kept == [], f"rolled-back inserts were committed on pooled connections {kept}"


def test_postgres_hot_path_fails_with_store_unavailable_when_the_server_is_unreachable() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind((harness.LOCALHOST, 0))
        port = s.getsockname()[1]
    engine = create_engine(
        f"postgresql+psycopg://postgres@{harness.LOCALHOST}:{port}/test", connect_args={"connect_timeout": 1}
    )
    store = open_workflow_store(engine)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="workflow store unreachable"):
        store.create_run(str(uuid.uuid4()), "flow", 1, {}, LAYOUT)
    with pytest.raises(StoreUnavailable):
        store.begin_step("r", 0, "w1")
    assert time.monotonic() - started < 4


def _steps(store: WorkflowStore, run_id: str) -> list[tuple[int, str, int, dict | None, str | None]]:
    run = store.get_run(run_id)
    assert run is not None
    return [(s.position, s.status, s.attempts, s.output, s.error) for s in run.steps]


def test_a_posted_outcome_is_recorded_and_carrying_it_again_changes_nothing(store: WorkflowStore) -> None:
    """post_step writes without waiting (PostgreSQL) or at once (SQLite); the next
    step's running mark records the carried outcome again only where it is missing."""
    run_id = _run(store)
    store.begin_step(run_id, 0, "w1", first=True)
    carried = store.outcome(0, "succeeded", output={"a": 1}, plugin_version=3)
    store.post_step(run_id, carried)
    store.begin_step(run_id, 1, "w1", carried=[carried])  # reads the posted answer first
    before = store.get_run(run_id).steps[0]  # type: ignore[union-attr]
    assert (before.status, before.output, before.plugin_version, before.attempts) == ("succeeded", {"a": 1}, 3, 1)
    late = dataclasses.replace(carried, status="skipped", output=None, error="carried twice", plugin_version=None)
    store.begin_step(run_id, 2, "w1", carried=[late])  # a step that finished is not rewritten
    assert store.get_run(run_id).steps[0] == before  # type: ignore[union-attr]


@pytest.mark.parametrize("store", ["postgres"], indirect=True)
def test_an_outcome_whose_write_was_lost_is_recorded_by_the_task_that_carries_it(
    store: WorkflowStore, caplog: pytest.LogCaptureFixture
) -> None:
    """The kept connection dies just before an outcome is posted: a warning, and
    the next step's running mark (on a new connection) records the outcome."""
    run_id = _run(store)
    store.begin_step(run_id, 0, "w1", first=True)
    first = store.outcome(0, "succeeded", output={"a": 1})
    store.post_step(run_id, first)  # prepares the statement
    store.begin_step(run_id, 1, "w1", carried=[first])
    pid = store._session().conn.info.backend_pid  # type: ignore[attr-defined]
    with psycopg.connect(harness.pg_conninfo(store.engine.url.database or ""), autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        time.sleep(0.2)
        carried = store.outcome(1, "succeeded", output={"b": 2})
        store.post_step(run_id, carried)
        row = admin.execute("SELECT status FROM workflows_steps WHERE run_id = %s AND position = 1", (run_id,))
        assert row.fetchone() == ("running",)
    store.begin_step(run_id, 2, "w2", carried=[carried])
    assert "the next task records it" in caplog.text
    assert _steps(store, run_id)[:3] == [
        (0, "succeeded", 1, {"a": 1}, None),
        (1, "succeeded", 1, {"b": 2}, None),
        (2, "running", 1, None, None),
    ]


def test_a_last_parallel_stage_records_its_branches_and_the_run_in_one_write(store: WorkflowStore) -> None:
    run_id = _run(store)
    for position in (0, 1, 2):
        store.begin_step(run_id, position, "w1", first=position == 0)
    store.finish_step(run_id, 0, "succeeded", output={"a": 1})
    outcomes = [  # as a worker of the previous release carried them (format 1)
        Outcome.from_wire([1, "succeeded", {"b": 2}, None, 1, "2026-12-01T10:00:00+00:00"]),
        Outcome.from_wire([2, "skipped", None, "plugin 'c' is disabled", None, "2026-12-01T10:00:01+00:00"]),
    ]
    assert store.finish_stage(run_id, outcomes, {"user": "ana", "a": 1, "b": 2}) == "flow"
    run = store.get_run(run_id)
    assert run is not None and (run.status, run.output) == ("succeeded", {"user": "ana", "a": 1, "b": 2})
    assert _steps(store, run_id)[1:3] == [
        (1, "succeeded", 1, {"b": 2}, None),
        (2, "skipped", 1, None, "plugin 'c' is disabled"),
    ]
    assert run.steps[2].finished_at is not None and run.steps[2].finished_at.second == 1


def test_a_run_is_created_only_for_the_newest_definition(store: WorkflowStore) -> None:
    assert store.create_newest_run(str(uuid.uuid4()), "flow", 1, datetime.now(timezone.utc), {}, LAYOUT) == (
        None,
        False,
    )  # none defined
    store.define("flow", {"name": "flow", "steps": [{"slug": "a"}]}, actor="t")
    v1 = store.newest("flow")
    assert v1 is not None
    run_id = str(uuid.uuid4())
    assert store.create_newest_run(run_id, "flow", v1[0], v1[1], {"n": 1}, LAYOUT) == (v1, True)
    assert store.create_newest_run(run_id, "flow", v1[0], v1[1], {"n": 2}, LAYOUT) == (
        v1,
        False,
    )  # again: kept as it was
    store.define("flow", {"name": "flow", "steps": [{"slug": "b"}]}, actor="t")
    v2 = store.newest("flow")
    stale = str(uuid.uuid4())
    assert store.create_newest_run(stale, "flow", v1[0], v1[1], {}, LAYOUT) == (v2, False)  # not inserted: v1 is old
    assert store.get_run(stale) is None
    run = store.get_run(run_id)
    assert run is not None and (run.version, run.input, len(run.steps)) == (1, {"n": 1}, 4)


def test_the_example_definition_file_is_the_example_apps_workflow() -> None:
    from examples.onboarding.app import ONBOARDING

    text = (Path(__file__).resolve().parents[1] / "examples" / "onboarding" / "onboarding.json").read_text()
    assert Workflow.parse(text) == ONBOARDING
