"""Cancelling a workflow run (``Workflows.cancel``, ``pluginhost workflows cancel``):
the run stops before its next step, later steps become ``cancelled``, the run
``cancelled`` with who and when; idempotent; a finished run is an error."""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from celery.exceptions import TaskRevokedError
from sqlalchemy import create_engine

from tests.harness import run_cli
from workflows import InvalidRunState, WorkflowNotFound
from workflows.errors import RunFinished
from workflows.store import WorkflowStore, open_workflow_store

ROOT = Path(__file__).resolve().parents[1]
LAYOUT = [(0, 0, "a"), (1, 1, "b"), (2, 1, "c"), (3, 2, "d")]


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[WorkflowStore]:
    url = f"sqlite:///{tmp_path / 'flows.db'}" if request.param == "sqlite" else request.getfixturevalue("empty_pg_url")
    engine = create_engine(url)
    s = open_workflow_store(engine)
    s.migrate()
    yield s
    s.close()
    engine.dispose()


def test_a_cancelled_run_claims_no_step_and_keeps_its_state(store: WorkflowStore) -> None:
    run_id = str(uuid.uuid4())
    store.create_run(run_id, "flow", 1, {}, LAYOUT)
    store.begin_step(run_id, 0, "w1", first=True, task_id="t0")
    store.finish_step(run_id, 0, "succeeded", output={"a": 1})
    store.begin_step(run_id, 1, "w1", task_id="t1")  # running when the run is cancelled
    assert store.cancel_run(run_id, "ops") == ["t1"]
    run = store.get_run(run_id)
    assert run is not None and (run.status, run.cancelled_by) == ("cancelled", "ops") and run.finished_at
    assert [s.status for s in run.steps] == ["succeeded", "running", "cancelled", "cancelled"]
    assert store.cancel_run(run_id, "someone else") == ["t1"]  # idempotent: nothing written again
    assert store.get_run(run_id).cancelled_by == "ops"  # type: ignore[union-attr]
    with pytest.raises(RunFinished, match="the run is cancelled"):
        store.begin_step(run_id, 1, "w1")  # a redelivery of the running step: not taken over
    later = store.begin_step(run_id, 2, "w1")  # a cancelled step is handed back unclaimed
    assert (later.status, later.attempts) == ("cancelled", 0)
    # the running step finishes after the cancel: its outcome is recorded, the run stays cancelled
    assert store.finish_step(run_id, 1, "succeeded", output={"b": 2}, run_output={"b": 2}) == "flow"
    assert store.fail_run(run_id, 2, "ValueError: late") == "flow"
    assert store.get_run(run_id).status == "cancelled"  # type: ignore[union-attr]


def test_cancel_of_a_finished_or_unknown_run_is_an_error_that_writes_nothing(store: WorkflowStore) -> None:
    run_id = str(uuid.uuid4())
    store.create_run(run_id, "flow", 1, {}, LAYOUT[:1])
    store.begin_step(run_id, 0, "w1", first=True)
    store.finish_step(run_id, 0, "succeeded", output={}, run_output={})
    with pytest.raises(InvalidRunState, match="is succeeded; only unfinished runs can be cancelled"):
        store.cancel_run(run_id, "ops")
    assert store.get_run(run_id).status == "succeeded"  # type: ignore[union-attr]
    with pytest.raises(WorkflowNotFound):
        store.cancel_run("no-such-run", "ops")


def _cli(app_conf: dict[str, Any], *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(app_conf, "tests.apps.core:app", *args)


def _wait_status(flows: Any, run_id: str, slug: str, status: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = flows.run(run_id)
        if run is not None and any(s.slug == slug and s.status == status for s in run.steps):
            return
        time.sleep(0.05)
    raise AssertionError(f"step {slug} of run {run_id} never became {status}: {flows.run(run_id)}")


@pytest.mark.parametrize("backend", ["redis"], indirect=True)
def test_cancel_through_the_cli_stops_a_run_before_its_next_step(
    core: ModuleType, workers: Any, app_conf: dict[str, Any]
) -> None:
    workers("tests.apps.core", pool="prefork", concurrency=2)
    res = core.flows.start("flow", {"tag": "cancel", "b_sleep": 25})
    _wait_status(core.flows, res.id, "step_b", "running")
    done = _cli(app_conf, "workflows", "cancel", res.id, "--actor", "ops")
    assert done.returncode == 0, done.stderr
    assert f"{res.id} cancelled by ops" in done.stdout
    with pytest.raises(TaskRevokedError):
        res.get(timeout=30)
    time.sleep(1)
    run = core.flows.run(res.id)
    assert (run.status, run.cancelled_by) == ("cancelled", "ops")
    statuses = {s.slug: s.status for s in run.steps}
    # step_b's body still runs (without --terminate); what comes after it is cancelled
    assert statuses["step_b"] == "running" and statuses["step_d"] == statuses["step_e"] == "cancelled"
    assert core.executions_of("step_d", "cancel") == core.executions_of("step_e", "cancel") == 0
    again = _cli(app_conf, "workflows", "cancel", res.id)  # idempotent
    assert again.returncode == 0 and "cancelled by ops" in again.stdout
    finished = core.flows.start("flow", {"tag": "finished"})
    finished.get(timeout=60)
    refused = _cli(app_conf, "workflows", "cancel", finished.id)
    assert refused.returncode != 0 and "only unfinished runs can be cancelled" in refused.stderr
    assert core.flows.run(finished.id).status == "succeeded"


@pytest.mark.parametrize("backend", ["redis"], indirect=True)
def test_cancel_with_terminate_revokes_the_running_step(core: ModuleType, workers: Any) -> None:
    workers("tests.apps.core", pool="prefork", concurrency=2)
    res = core.flows.start("flow", {"tag": "terminate", "b_sleep": 30})
    _wait_status(core.flows, res.id, "step_b", "running")
    run = core.flows.cancel(res.id, actor="ops", terminate=True)
    assert run.status == "cancelled" and {s.slug: s.status for s in run.steps}["step_b"] == "cancelled"
    time.sleep(2)
    assert core.executions_of("step_d", "terminate") == 0
    assert core.flows.run(res.id).status == "cancelled"
    assert len(core.flows.runs(status="cancelled")) >= 1
