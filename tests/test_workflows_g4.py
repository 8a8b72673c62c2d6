"""G4 under faults, against the store and in-process: who may take over a running
step, what a failed run keeps, what the sweeper may touch, a double resume, and
the one enablement decision per step.

Real SQLite files and the real PostgreSQL on 127.0.0.1; the processes that race
are real processes (subprocesses of this test), killed with SIGKILL where a
test says a worker died. Tests on real workers are in test_workflows_g4_live.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import ModuleType
from typing import Any

import psycopg
import pytest
from sqlalchemy import create_engine, update

from tests import harness
from workflows import InvalidRunState, RunFinished, Step, Workflow
from workflows.store import WorkflowStore, open_workflow_store
from workflows.store import runs as runs_table
from workflows.store import steps as steps_table

LAYOUT = [(0, 0, "a"), (1, 1, "b"), (2, 1, "c"), (3, 2, "d")]
PLUGINHOST = str(Path(sys.executable).with_name("pluginhost"))


# -- fixtures and helpers ------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'flows.db'}"
    return str(request.getfixturevalue("empty_pg_url"))


@pytest.fixture
def store(store_url: str) -> Iterator[WorkflowStore]:
    engine = create_engine(store_url, pool_pre_ping=True)
    s = open_workflow_store(engine)
    s.migrate()
    yield s
    engine.dispose()


def _run(store: WorkflowStore) -> str:
    run_id = str(uuid.uuid4())
    assert store.create_run(run_id, "flow", 1, {"n": 1}, LAYOUT) is True
    return run_id


def _row(store: WorkflowStore, run_id: str, position: int) -> Any:
    run = store.get_run(run_id)
    assert run is not None
    return run.steps[position]


# A worker's pool process: claims a step of a run (step 0 unless a position is
# given, as the step task does), says so, then stays inside the "step" until it
# is killed.
_OWNER = textwrap.dedent(
    """
    import sys, time
    from sqlalchemy import create_engine
    from workflows.store import open_workflow_store
    store = open_workflow_store(create_engine(sys.argv[1]))
    position = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    store.begin_step(sys.argv[2], position, "owner", first=position == 0)
    print("claimed", flush=True)
    time.sleep(300)
    """
)


@pytest.fixture
def owner_process() -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """``owner_process(url, run_id, position=0)``: a separate process that claims
    that step and keeps running; every one is SIGKILLed and reaped at teardown."""
    started: list[subprocess.Popen[str]] = []

    def start(url: str, run_id: str, position: int = 0) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-c", _OWNER, url, run_id, str(position)],
            cwd=harness.REPO_ROOT, stdout=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(harness.REPO_ROOT)},
        )  # fmt: skip
        started.append(proc)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "claimed"
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


def _try_claim(store: WorkflowStore, run_id: str, worker: str, position: int = 0) -> BaseException | None:
    """Claim a step (the first one by default) as a second worker would; the
    exception if it was refused."""
    try:
        store.begin_step(run_id, position, worker, first=position == 0)
    except Exception as exc:  # noqa: BLE001 - the test checks which one
        return exc
    return None


# -- who may take over a running step (issue 11, item 6) -------------------------------


def test_a_running_step_is_not_taken_over_while_its_owner_process_lives(
    store: WorkflowStore, store_url: str, owner_process: Callable[[str, str], subprocess.Popen[str]]
) -> None:
    """Fault: a duplicate delivery of a step that another, live process is running.

    Asserted: the claim is refused (``StepBusy``), the row keeps its owner and its
    one attempt; once the owner is SIGKILLed (its database session ends with it)
    the next claim takes the step over, counting a second attempt."""
    run_id = _run(store)
    owner = owner_process(store_url, run_id)

    refused = _try_claim(store, run_id, "intruder")
    row = _row(store, run_id, 0)
    assert (row.status, row.attempts, row.worker) == ("running", 1, "owner"), "a live owner's step was taken over"
    assert type(refused).__name__ == "StepBusy", refused

    owner.send_signal(signal.SIGKILL)
    owner.wait(timeout=10)
    deadline = time.monotonic() + 5  # PostgreSQL ends the dead session's backend within ms
    while _try_claim(store, run_id, "heir") is not None:
        assert time.monotonic() < deadline, "the step of a killed owner was never taken over"
        time.sleep(0.05)
    row = _row(store, run_id, 0)
    assert (row.status, row.attempts, row.worker) == ("running", 2, "heir")


def test_a_running_step_whose_owner_is_stale_is_taken_over(
    store_url: str, owner_process: Callable[[str, str], subprocess.Popen[str]]
) -> None:
    """A live owner that has held a step for longer than the lease
    (``step_lease_s``, the setting ``pluginhost_workflows_step_lease_s``) is stale:
    a hung body, or a session that looks alive but is not (a host that vanished)."""
    engine = create_engine(store_url, pool_pre_ping=True)
    try:
        store = open_workflow_store(engine, step_lease_s=0.5)
        store.migrate()
        run_id = _run(store)
        owner_process(store_url, run_id)
        assert type(_try_claim(store, run_id, "early")).__name__ == "StepBusy"
        time.sleep(0.6)
        assert _try_claim(store, run_id, "late") is None
        row = _row(store, run_id, 0)
        assert (row.status, row.attempts, row.worker) == ("running", 2, "late")
    finally:
        engine.dispose()


def test_the_same_session_claims_its_own_step_again(store: WorkflowStore) -> None:
    """A process that claims a step it holds itself finished with it (one task at a
    time per pool process / thread): a retry on the same process is not refused."""
    run_id = _run(store)
    store.begin_step(run_id, 0, "w1", first=True)
    assert store.begin_step(run_id, 0, "w1", first=True).attempts == 2


def test_a_step_of_a_failed_run_is_not_taken_over(
    store: WorkflowStore, store_url: str, owner_process: Callable[..., subprocess.Popen[str]]
) -> None:
    """Found by the 30-minute soak: branch ``b`` of a parallel stage ran, and its
    process's database session was terminated before its outcome was written (the
    row stays ``running``, its owner gone); branch ``c`` failed, so the run failed.
    Then ``b``'s message came again (a duplicate delivery; on Redis, a redelivery
    after ``visibility_timeout``) and ran ``b``'s body a second time, in a run that
    had failed.

    Asserted: no step of a finished run is claimed (``RunFinished``, nothing
    written), whether its row is running under a dead owner or still pending; a
    resume makes the run's steps claimable again."""
    run_id = _run(store)
    store.begin_step(run_id, 0, "w1", first=True)
    store.finish_step(run_id, 0, "succeeded", output={"a": 1})
    owner = owner_process(store_url, run_id, 1)
    owner.send_signal(signal.SIGKILL)
    owner.wait(timeout=10)
    store.fail_run(run_id, 2, "ValueError: branch c")
    time.sleep(0.2)  # PostgreSQL ends the dead session's backend within ms

    refused = _try_claim(store, run_id, "late", position=1)
    row = _row(store, run_id, 1)
    assert (row.status, row.attempts, row.worker) == ("running", 1, "owner"), "a failed run's step was taken over"
    assert isinstance(refused, RunFinished), refused

    other = _run(store)  # a sibling not started yet when its branch failed: still pending
    store.begin_step(other, 0, "w1", first=True)
    store.finish_step(other, 0, "succeeded", output={"a": 1})
    store.fail_run(other, 1, "ValueError: branch b")
    assert isinstance(_try_claim(store, other, "late", position=2), RunFinished)
    assert (_row(store, other, 2).status, _row(store, other, 2).attempts) == ("pending", 0)

    store.reset_for_resume(run_id)
    assert _try_claim(store, run_id, "resumed", position=1) is None
    assert (_row(store, run_id, 1).attempts, _row(store, run_id, 1).worker) == (2, "resumed")


# -- a failed run keeps its first error (suspected item) ---------------------------


def test_a_second_failure_keeps_the_runs_first_error(store: WorkflowStore) -> None:
    """Two branches of a parallel stage fail one after the other (or a sweep comes
    after a branch failure): the run's error stays the first cause; each step
    keeps its own."""
    run_id = _run(store)
    store.begin_step(run_id, 0, "w1", first=True)
    store.finish_step(run_id, 0, "succeeded", output={"a": 1})
    store.begin_step(run_id, 1, "w1")
    store.begin_step(run_id, 2, "w2")
    store.fail_run(run_id, 1, "ValueError: the first cause")
    first = store.get_run(run_id)
    assert first is not None and first.finished_at is not None
    store.fail_run(run_id, 2, "step 'c' lost: running for over 1s (worker died?)")
    run = store.get_run(run_id)
    assert run is not None
    assert (run.status, run.error) == ("failed", "ValueError: the first cause")
    assert run.finished_at == first.finished_at
    assert [(s.status, s.error) for s in run.steps] == [
        ("succeeded", None),
        ("failed", "ValueError: the first cause"),
        ("failed", "step 'c' lost: running for over 1s (worker died?)"),
        ("cancelled", None),
    ]


def test_a_repeated_start_says_whether_it_inserted_the_run(store: WorkflowStore) -> None:
    """``create_newest_run`` tells a new run from one that existed (a redelivered
    start), so the caller builds an existing run from what was recorded."""
    store.define("flow", {"name": "flow", "steps": [{"slug": "a"}]}, actor="t")
    v1 = store.newest("flow")
    run_id = str(uuid.uuid4())
    assert store.create_newest_run(run_id, "flow", v1[0], v1[1], {"n": 1}, LAYOUT) == (v1, True)  # type: ignore[index]
    assert store.create_newest_run(run_id, "flow", v1[0], v1[1], {"n": 2}, LAYOUT) == (v1, False)  # type: ignore[index]


# -- service level, on PostgreSQL ------------------------------------------------------

G4FAIL = Workflow("g4fail", steps=[Step("skipper", on_disabled="fail")])


def _ph_env(app_conf: dict[str, Any]) -> dict[str, str]:
    return {
        **os.environ,
        harness.PH_CONF_ENV: json.dumps(app_conf),
        "PLUGINHOST_APP": "tests.apps.core:app",
        "PYTHONPATH": str(harness.REPO_ROOT),
    }


@pytest.mark.parametrize("backend", ["redis"], indirect=True)
def test_sweep_leaves_a_succeeded_run_alone(core: ModuleType) -> None:
    """Fault: PostgreSQL lost an asynchronously committed step outcome in a crash:
    the run is recorded succeeded while one step row is still ``running`` (the
    rows as the crash leaves them, written here).

    Asserted: ``sweep`` does not report the run nor mark it failed; a run that is
    still running with a stale step is swept as before."""
    flows = core.flows
    done, _ = flows.prepare("flow", {"tag": "done"})
    stuck, _ = flows.prepare("flow", {"tag": "stuck"})
    two_hours_ago = datetime.now(timezone.utc) - timedelta(hours=2)
    with flows.store.engine.begin() as conn:
        conn.execute(
            update(steps_table)
            .where(steps_table.c.run_id.in_([done, stuck]))
            .values(
                status="succeeded",
                output={},
                attempts=1,
                started_at=two_hours_ago,
                finished_at=two_hours_ago,
            )
        )
        conn.execute(
            update(steps_table)
            .where(steps_table.c.position == 3, steps_table.c.run_id.in_([done, stuck]))
            .values(
                status="running",
                finished_at=None,
            )
        )
        conn.execute(
            update(runs_table)
            .where(runs_table.c.id == done)
            .values(
                status="succeeded",
                output={"tag": "done"},
                started_at=two_hours_ago,
                finished_at=two_hours_ago,
            )
        )
        conn.execute(
            update(runs_table).where(runs_table.c.id == stuck).values(status="running", started_at=two_hours_ago)
        )

    assert flows.sweep(older_than_s=60) == [stuck]
    run = flows.run(done)
    assert (run.status, run.error, run.output) == ("succeeded", None, {"tag": "done"})
    assert flows.run(stuck).status == "failed"


@pytest.mark.parametrize("backend", ["redis"], indirect=True)
def test_two_concurrent_resumes_start_one_canvas(core: ModuleType, app_conf: dict[str, Any]) -> None:
    """Fault: a double click: two processes call ``resume(run_id)`` on the same
    failed run at the same moment. The race is made certain, not hoped for:
    another connection holds the run's row lock (a slow transaction) until both
    processes wait on it, then lets go.

    Asserted: exactly one resume starts a canvas (one message on the broker);
    the other raises ``InvalidRunState``."""
    import redis

    flows = core.flows
    run_id, _ = flows.prepare("flow", {"tag": "twice"})
    flows.store.fail_run(run_id, 0, "RuntimeError: boom")
    script = textwrap.dedent(
        """
        import sys
        from tests.apps import core
        try:
            core.flows.resume(sys.argv[1])
        except Exception as exc:
            print("refused", type(exc).__name__, flush=True)
        else:
            print("resumed", flush=True)
        """
    )
    dbname = create_engine(app_conf["pluginhost_store"]).url.database or ""
    procs: list[subprocess.Popen[str]] = []
    with psycopg.connect(harness.pg_conninfo(dbname)) as holder:
        holder.execute("SELECT 1 FROM workflows_runs WHERE id = %s FOR UPDATE", (run_id,))
        try:
            for _ in range(2):
                procs.append(subprocess.Popen(
                    [sys.executable, "-c", script, run_id], cwd=harness.REPO_ROOT,
                    env=_ph_env(app_conf), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                ))  # fmt: skip
            with psycopg.connect(harness.pg_conninfo(dbname), autocommit=True) as watcher:
                deadline = time.monotonic() + 60
                while True:
                    waiting = watcher.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                        " AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
                    ).fetchone()
                    if waiting and waiting[0] >= 2:
                        break
                    exited = [p.poll() for p in procs if p.poll() is not None]
                    assert not exited and time.monotonic() < deadline, (
                        f"both resumes should wait on the lock; waiting={waiting}, exited={exited}"
                    )
                    time.sleep(0.05)
        finally:
            holder.rollback()  # lets go of the row lock
        outcomes = []
        for proc in procs:
            out, err = proc.communicate(timeout=60)
            outcomes.append(out.strip() or err.strip().splitlines()[-1])
    queued = redis.Redis.from_url(app_conf["broker_url"]).llen(app_conf["task_default_queue"])
    assert sorted(outcomes) == ["refused InvalidRunState", "resumed"], outcomes
    assert queued == 1
    assert flows.run(run_id).status == "running"
    with pytest.raises(InvalidRunState):
        flows.resume(run_id)


@pytest.mark.parametrize("backend", ["redis"], indirect=True)
def test_a_step_decides_enablement_once_under_its_own_policy(
    core: ModuleType, app_conf: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fault: an admin in another process disables the step's plugin right after
    the step's deciding look at the store (the interleaving is forced: the disable
    runs, and commits, as soon as that first read returns). The capability is
    declared ``on_disabled="skip"``, the step's own policy is ``fail``.

    Asserted: the step decided from that one look: the plugin was enabled, so
    the body ran (once) and its output is recorded with the step ``succeeded``;
    never "succeeded" without the body having run. Then, with the plugin
    disabled before the step looks, the step's policy decides: ``failed``
    (``CapabilityDisabled``), the body not run."""
    flows, rt, host = core.flows, core.flows.runtime, core.host
    flows.define(G4FAIL)
    store = host.store
    real_revision = store.revision
    reads: list[int] = []

    def revision() -> int:
        value = real_revision()
        reads.append(value)
        # read 1: the step checks that its view loads, before it claims; read 2:
        # the decision's one look, after the claim. The disable lands right after it.
        if len(reads) == 2:
            proc = subprocess.run(
                [PLUGINHOST, "disable", "skipper", "--actor", "race"], env=_ph_env(app_conf),
                cwd=harness.REPO_ROOT, capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip
            assert proc.returncode == 0, proc.stderr
        return value

    run_id, _ = flows.prepare("g4fail", {"tag": "race"})
    host.view.check_store()  # this process's view is current before the step
    monkeypatch.setattr(store, "revision", revision)
    result = rt.step_task.apply(
        args=({"tag": "race"}, run_id, 0),
        kwargs={"slug": "skipper", "on_disabled": "fail", "first": True, "final": True},
    )
    monkeypatch.undo()
    assert reads, "the step never looked at the store"
    assert not host.is_enabled("skipper")  # the disable did land, mid-step
    step = flows.run(run_id).steps[0]
    ran = core.executions_of("skipper", "race")
    assert (step.status, ran, step.output) == ("succeeded", 1, {"skipper": "ran"}), (
        f"step recorded {step.status} with output {step.output}, body ran {ran} time(s): {result.result!r}"
    )

    later, _ = flows.prepare("g4fail", {"tag": "off"})
    refused = rt.step_task.apply(
        args=({"tag": "off"}, later, 0), kwargs={"slug": "skipper", "on_disabled": "fail", "first": True, "final": True}
    )
    step = flows.run(later).steps[0]
    assert type(refused.result).__name__ == "CapabilityDisabled"
    assert step.status == "failed" and "plugin 'skipper' is disabled" in (step.error or "")
    assert core.executions_of("skipper", "off") == 0
