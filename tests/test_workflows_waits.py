"""Durable waits and signals: ``Sleep``, ``WaitFor``, ``Workflows.signal``.

A sleeping or waiting run holds no worker slot and no broker message: its
wake-up is a row in the store that the workers' wakers claim. Tested on the
store alone (both engines; claims raced by separate processes) and with real
workers (a wake-up after every worker was SIGKILLed, signals before, during and
after a wait, timeouts, cancel while asleep, a step disabled while runs sleep).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from sqlalchemy import create_engine, update

from tests.harness import run_cli, wait_until
from workflows import (
    InvalidSignal,
    InvalidWorkflow,
    RunNotFound,
    Sleep,
    Step,
    WaitFor,
    Workflow,
)
from workflows.store import WorkflowStore, open_workflow_store
from workflows.store.schema import waits as waits_table
from workflows.store.waits import WaitStore

ROOT = Path(__file__).resolve().parents[1]
LAYOUT = [(0, 0, "a"), (1, 2, "b")]  # stage 1 is the wait


# -- definitions ---------------------------------------------------------------


def test_durations_parse_and_round_trip_through_json() -> None:
    wf = Workflow(
        "w",
        steps=[Step("a"), Sleep("3d"), WaitFor("ok", timeout="90s", on_timeout="skip"), Sleep(1.5), Step("b")],
    )
    assert [getattr(s, "duration", None) for s in wf.steps] == [None, 259200.0, None, 1.5, None]
    assert wf.steps[2].timeout == 90.0  # type: ignore[union-attr]
    again = Workflow.parse(json.dumps(wf.model_dump(mode="json")))
    assert again == wf
    assert wf.stages() == [[wf.steps[0]], [], [], [], [wf.steps[4]]]
    assert wf.wait_for("ok") == (2, wf.steps[2])


@pytest.mark.parametrize(
    "steps, message",
    [
        ([Step("a"), {"type": "sleep", "duration": "soon"}], "sleep duration must be seconds"),
        ([Step("a"), {"type": "sleep", "duration": 0}], "more than 0"),
        ([Step("a"), {"type": "sleep", "duration": "400d"}], "at most 366 days"),
        ([Step("a"), {"type": "wait", "signal": "Bad Name"}], "signal name"),
        ([Step("a"), {"type": "wait", "signal": "ok", "on_timeout": "retry"}], "on_timeout"),
        ([Step("a"), WaitFor("ok"), WaitFor("ok")], "waited for more than once"),
        ([Sleep("1h")], "at least one step"),
    ],
)
def test_bad_waits_are_refused_at_definition(steps: list[Any], message: str) -> None:
    with pytest.raises(InvalidWorkflow, match=message):
        Workflow.parse({"name": "w", "steps": [s if isinstance(s, dict) else s.model_dump() for s in steps]})


# -- the store -------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgres"])
def stores(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[WorkflowStore, WaitStore]]:
    url = f"sqlite:///{tmp_path / 'flows.db'}" if request.param == "sqlite" else request.getfixturevalue("empty_pg_url")
    engine = create_engine(url)
    store = open_workflow_store(engine)
    store.migrate()
    yield store, WaitStore(engine, lease_s=5.0)
    store.close()
    engine.dispose()


def _reach(waits: WaitStore, run_id: str, *, kind: str = "sleep", seconds: float | None = 0.01, **kw: Any) -> Any:
    return waits.reach(
        run_id,
        1,
        kind=kind,
        signal=kw.get("signal"),
        on_timeout=kw.get("on_timeout"),
        seconds=seconds,
        context={"at": "wait"},
        carried=[],
    )


def _new_run(store: WorkflowStore, key: str | None = None) -> str:
    run_id = str(uuid.uuid4())
    store.create_run(run_id, "flow", 1, {}, LAYOUT, key)
    store.begin_step(run_id, 0, "w1", first=True)
    store.finish_step(run_id, 0, "succeeded", output={"a": 1})
    return run_id


def test_a_due_wait_is_claimed_once_and_again_only_after_its_lease(stores: tuple[WorkflowStore, WaitStore]) -> None:
    store, waits = stores
    run_id = _new_run(store)
    row = _reach(waits, run_id, seconds=0.3)
    assert (row.status, row.kind, row.outcome) == ("waiting", "sleep", None)
    assert store.get_run(run_id).status == "sleeping"  # type: ignore[union-attr]
    assert waits.claim_due("early") == []  # not due yet
    assert _reach(waits, run_id, seconds=100).wake_at == row.wake_at  # a repeated delivery keeps the due time
    time.sleep(0.35)
    (wake,) = waits.claim_due("one")
    assert (wake.run_id, wake.stage, wake.outcome, wake.context) == (run_id, 1, "slept", {"at": "wait"})
    assert store.get_run(run_id).status == "running"  # type: ignore[union-attr]
    assert waits.claim_due("two") == []  # claimed: nobody else takes it within the lease
    # the claimer died before sending: once the lease has passed, another claims it
    with waits.engine.begin() as conn:
        conn.execute(update(waits_table).values(claimed_at=wake_claimed_long_ago()))
    (again,) = waits.claim_due("two")
    assert again.run_id == run_id
    waits.sent(again)
    assert waits.claim_due("three") == []
    (done,), _ = waits.timeline(run_id)
    assert (done.status, done.outcome, done.claimed_by) == ("done", "slept", "two") and done.woke_at


def wake_claimed_long_ago() -> Any:
    from datetime import datetime, timezone

    return datetime.now(timezone.utc) - timedelta(seconds=60)


def _at_stage_1(workflow: str, version: int) -> int:
    return 1  # LAYOUT's wait


def test_signals_before_during_and_after_a_wait(stores: tuple[WorkflowStore, WaitStore]) -> None:
    store, waits = stores
    early = _new_run(store)
    assert waits.deliver(early, _at_stage_1, "ok", {"by": "mail"}, "ops", "signaller") is None  # kept for the wait
    row = _reach(waits, early, kind="signal", signal="ok", seconds=None)  # the kept signal: due at once
    assert (row.outcome, store.get_run(early).status) == ("received", "waiting")  # type: ignore[union-attr]
    (wake,) = waits.claim_due("w", run_id=early, stage=1)
    assert (wake.outcome, wake.payload) == ("received", {"by": "mail"})
    waits.sent(wake)
    _, (sig,) = waits.timeline(early)
    assert (sig.name, sig.payload_keys, sig.actor) == ("ok", ["by"], "ops") and sig.consumed_at

    during = _new_run(store)
    _reach(waits, during, kind="signal", signal="ok", seconds=None)  # no timeout: never due by time
    assert waits.claim_due("w") == []
    wake = waits.deliver(during, _at_stage_1, "ok", {"n": 1}, None, "signaller")  # claimed for the signaller at once
    assert wake is not None and (wake.run_id, wake.outcome, wake.payload) == (during, "received", {"n": 1})
    assert store.get_run(during).status == "running"  # type: ignore[union-attr]
    with pytest.raises(InvalidSignal, match="past its wait"):
        waits.deliver(during, _at_stage_1, "ok", {}, None, "signaller")  # a second one
    assert waits.claim_due("w") == []  # the signaller's claim: nobody else sends it

    late = _new_run(store)
    _reach(waits, late, kind="signal", signal="ok", seconds=0.01, on_timeout="fail")
    time.sleep(0.05)
    (wake,) = waits.claim_due("w")
    assert wake.outcome == "timed_out"
    with pytest.raises(InvalidSignal, match="it timed out"):
        waits.deliver(late, _at_stage_1, "ok", {}, None, "signaller")
    waits.end_after(wake, error="WaitTimedOut: no signal")
    run = store.get_run(late)
    assert run is not None and (run.status, run.error) == ("failed", "WaitTimedOut: no signal")
    assert [s.status for s in run.steps] == ["succeeded", "cancelled"]
    with pytest.raises(InvalidSignal, match="is failed"):
        waits.deliver(late, _at_stage_1, "ok", {}, None, "signaller")
    with pytest.raises(RunNotFound):
        waits.deliver("no-such-run", _at_stage_1, "ok", {}, None, "signaller")
    assert waits.timeline(late)[1] == []  # refused signals are not stored


def test_a_cancelled_sleeping_run_is_never_woken(stores: tuple[WorkflowStore, WaitStore]) -> None:
    store, waits = stores
    run_id = _new_run(store)
    _reach(waits, run_id, seconds=0.01)
    assert store.cancel_run(run_id, "ops") == []
    time.sleep(0.05)
    assert waits.claim_due("w") == []
    run = store.get_run(run_id)
    assert run is not None and [s.status for s in run.steps] == ["succeeded", "cancelled"]
    (row,), _ = waits.timeline(run_id)
    assert row.status == "cancelled"
    assert _reach(waits, run_id).status == "cancelled"  # a late wait delivery changes nothing


def test_runs_with_a_key_newest_first(stores: tuple[WorkflowStore, WaitStore]) -> None:
    store, waits = stores
    first = _new_run(store, key="a@example.com")
    time.sleep(0.01)
    second = _new_run(store, key="a@example.com")
    _new_run(store, key="b@example.com")
    assert waits.runs_with_key("flow", "a@example.com") == [second, first]
    store.cancel_run(second, "ops")
    assert waits.runs_with_key("flow", "a@example.com") == [first]


def _claim_in_process(url: str, claimer: str, queue: Any) -> None:
    engine = create_engine(url)
    waits = WaitStore(engine, lease_s=300.0)
    got: list[str] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        batch = waits.claim_due(claimer, limit=7)
        if not batch:
            break
        got.extend(w.run_id for w in batch)
    queue.put(got)
    engine.dispose()


@pytest.mark.parametrize("engine_name", ["postgres", "sqlite"])
def test_four_processes_claim_every_due_wait_exactly_once(
    engine_name: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = f"sqlite:///{tmp_path / 'race.db'}" if engine_name == "sqlite" else request.getfixturevalue("empty_pg_url")
    engine = create_engine(url)
    store = open_workflow_store(engine)
    store.migrate()
    waits = WaitStore(engine)
    run_ids = [_new_run(store) for _ in range(200)]
    for run_id in run_ids:
        _reach(waits, run_id, seconds=0.01)
    time.sleep(0.05)
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_claim_in_process, args=(url, f"p{i}", queue)) for i in range(4)]
    for p in procs:
        p.start()
    try:
        claimed = [queue.get(timeout=60) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    every = [r for got in claimed for r in got]
    assert sorted(every) == sorted(run_ids), "a wait claimed twice, or not at all"
    if engine_name == "postgres":
        assert sum(1 for got in claimed if got) >= 2, "SKIP LOCKED: claimers take different rows at once"
    store.close()
    engine.dispose()


# -- with real workers ---------------------------------------------------------------


def _define(core: ModuleType, *workflows: Workflow) -> None:
    for wf in workflows:
        core.flows.define(wf)


def _status(core: ModuleType, run_id: str) -> str:
    run = core.flows.run(run_id)
    return "" if run is None else str(run.status)


@pytest.mark.parametrize("backend", ["embedded", "redis"], indirect=True)
def test_a_sleeping_run_holds_no_message_and_wakes_on_time(
    core: ModuleType, workers: Any, app_conf: dict[str, Any]
) -> None:
    _define(core, core.SLEEPY)
    workers("tests.apps.core", pool="solo", conf={**app_conf, "pluginhost_workflows_wake_poll_s": 0.2})
    started = time.time()
    res = core.flows.start("sleepy", {"tag": "nap"})
    wait_until(lambda: _status(core, res.id) == "sleeping", timeout=30, what="run sleeping")
    assert core.executions_of("step_a", "nap") == 1 and core.executions_of("step_c", "nap") == 0
    assert _queued(core) == 0, "a sleeping run keeps no message in the queue"
    out = res.get(timeout=30)
    assert out["c"] == 3 and core.executions_of("step_c", "nap") == 1
    run = core.flows.run(res.id)
    (wait,) = run.waits
    assert wait.outcome == "slept" and wait.woke_at is not None
    assert wait.wake_at is not None and wait.woke_at >= wait.wake_at
    lateness = (wait.woke_at - wait.wake_at).total_seconds()
    assert lateness < 0.2 + 1.5, f"woke {lateness:.2f}s after its time"
    assert time.time() - started >= 2


def _queued(core: ModuleType) -> int:
    """Messages in the test's task queue (Redis: the list; elsewhere: not looked at)."""
    url = str(core.app.conf.broker_url)
    if not url.startswith("redis"):
        return 0
    import redis

    client = redis.Redis.from_url(url)
    try:
        return int(client.llen(core.app.conf.task_default_queue))
    finally:
        client.close()


@pytest.mark.parametrize("backend", ["redis"], indirect=True)
def test_a_run_sleeping_while_every_worker_is_killed_wakes_once(core: ModuleType, workers: Any) -> None:
    _define(core, core.SLEEPY)
    first = [workers("tests.apps.core", pool="prefork", concurrency=2) for _ in range(2)]
    res = core.flows.start("sleepy", {"tag": "killed"})
    wait_until(lambda: _status(core, res.id) == "sleeping", timeout=30, what="run sleeping")
    for worker in first:
        worker.kill()  # SIGKILL of the whole group: no warm shutdown, nothing acknowledged
    time.sleep(2.5)  # its wake-up time passes with no worker alive
    assert _status(core, res.id) == "sleeping"
    workers("tests.apps.core", pool="prefork", concurrency=2)
    workers("tests.apps.core", pool="solo")
    assert res.get(timeout=30)["c"] == 3
    time.sleep(1.5)  # a second wake-up would have run by now
    assert core.executions_of("step_a", "killed") == 1
    assert core.executions_of("step_c", "killed") == 1


@pytest.mark.parametrize("backend", ["redis"], indirect=True)
def test_signals_to_real_runs(core: ModuleType, workers: Any) -> None:
    _define(core, core.VERIFY)
    workers("tests.apps.core", pool="prefork", concurrency=2)
    # during the wait: the run goes on at once, with the payload in its context
    during = core.flows.start("verify", {"tag": "during", "email": "a@example.com"})
    wait_until(lambda: _status(core, during.id) == "waiting", timeout=30, what="run waiting")
    sent = time.monotonic()
    core.flows.signal(during.id, "verified", {"via": "link"}, actor="ops")
    out = during.get(timeout=30)
    assert time.monotonic() - sent < 5
    assert out["via"] == "link" and out["signals"] == {"verified": "received"} and out["c"] == 3
    assert core.executions_of("step_d", "during") == 0  # its condition was false
    # before the wait: kept, taken when the run gets there
    before = core.flows.start("verify", {"tag": "before", "email": "b@example.com", "a_sleep": 1})
    core.flows.signal(before.id, "verified", {"via": "early"})
    assert _status(core, before.id) in ("pending", "running")  # not at its wait yet
    assert before.get(timeout=30)["via"] == "early"
    # by key: two runs with the same key, the newest gets it
    old = core.flows.start("verify", {"tag": "old", "email": "c@example.com"})
    new = core.flows.start("verify", {"tag": "new", "email": "c@example.com"})
    wait_until(lambda: _status(core, new.id) == _status(core, old.id) == "waiting", timeout=30, what="both wait")
    assert core.flows.signal_by_key("verify", "c@example.com", "verified", {}).id == new.id
    assert new.get(timeout=30)["signals"] == {"verified": "received"}
    assert _status(core, old.id) == "waiting"
    # bad signals: nothing stored
    with pytest.raises(InvalidSignal, match="waits for no signal 'nope'"):
        core.flows.signal(old.id, "nope", {})
    with pytest.raises(InvalidSignal, match="JSON object"):
        core.flows.signal(old.id, "verified", ["not", "an", "object"])  # type: ignore[arg-type]
    with pytest.raises(InvalidSignal, match="signal name"):
        core.flows.signal(old.id, "Verified!", {})
    with pytest.raises(RunNotFound):
        core.flows.signal("no-such-run", "verified", {})
    with pytest.raises(RunNotFound):
        core.flows.signal_by_key("verify", "nobody@example.com", "verified", {})
    assert core.flows.run(old.id).signals == []
    # a cancelled run: refused
    core.flows.cancel(old.id, actor="ops")
    with pytest.raises(InvalidSignal, match="is cancelled"):
        core.flows.signal(old.id, "verified", {})
    # after a finished run: refused
    with pytest.raises(InvalidSignal, match="is succeeded"):
        core.flows.signal(during.id, "verified", {})


@pytest.mark.parametrize("backend", ["redis"], indirect=True)
@pytest.mark.parametrize("on_timeout", ["fail", "skip", "continue"])
def test_a_wait_that_times_out(core: ModuleType, workers: Any, app_conf: dict[str, Any], on_timeout: str) -> None:
    wf = Workflow(
        "timeout",
        steps=[Step("step_a"), WaitFor("verified", timeout=1, on_timeout=on_timeout), Step("step_d")],
    )
    _define(core, wf)
    workers("tests.apps.core", pool="solo", conf={**app_conf, "pluginhost_workflows_wake_poll_s": 0.2})
    res = core.flows.start("timeout", {"tag": on_timeout})
    wait_until(lambda: _status(core, res.id) not in ("", "pending", "running", "waiting"), timeout=30, what="end")
    run = core.flows.run(res.id)
    if on_timeout == "fail":
        assert run.status == "failed" and "WaitTimedOut" in (run.error or "")
        assert [s.status for s in run.steps] == ["succeeded", "cancelled"]
        with pytest.raises(Exception, match="before the wait's timeout"):
            res.get(timeout=10)
    elif on_timeout == "skip":
        assert run.status == "succeeded" and [s.status for s in run.steps] == ["succeeded", "skipped"]
        assert res.get(timeout=10)["signals"] == {"verified": "timed_out"}
    else:
        assert run.status == "succeeded" and [s.status for s in run.steps] == ["succeeded", "succeeded"]
        assert res.get(timeout=10)["d"] == 4
    assert run.waits[0].outcome == "timed_out"
    assert core.executions_of("step_d", on_timeout) == (1 if on_timeout == "continue" else 0)


@pytest.mark.parametrize("backend", ["redis"], indirect=True)
def test_cancel_of_a_sleeping_run_is_at_once_and_it_never_wakes(
    core: ModuleType, workers: Any, app_conf: dict[str, Any]
) -> None:
    _define(core, core.SLEEPY)
    workers("tests.apps.core", pool="solo", conf={**app_conf, "pluginhost_workflows_wake_poll_s": 0.2})
    res = core.flows.start("sleepy", {"tag": "cancel-asleep"})
    wait_until(lambda: _status(core, res.id) == "sleeping", timeout=30, what="run sleeping")
    run = core.flows.cancel(res.id, actor="ops")
    assert (run.status, run.cancelled_by) == ("cancelled", "ops")
    assert run.waits[0].status == "cancelled"
    assert core.flows.cancel(res.id, actor="other").cancelled_by == "ops"  # twice: idempotent
    time.sleep(3)  # past its wake-up time
    assert core.executions_of("step_c", "cancel-asleep") == 0
    assert _status(core, res.id) == "cancelled"


@pytest.mark.parametrize("backend", ["redis"], indirect=True)
def test_runs_asleep_before_a_disabled_step_skip_it_when_they_wake(
    core: ModuleType, workers: Any, app_conf: dict[str, Any]
) -> None:
    n = int(os.environ.get("PH_SLEEPERS", "1000"))
    wf = Workflow("nap", steps=[Sleep(25), Step("step_c", on_disabled="skip")])
    _define(core, wf)
    workers(
        "tests.apps.core", pool="prefork", concurrency=2, conf={**app_conf, "pluginhost_workflows_wake_poll_s": 0.5}
    )
    workers(
        "tests.apps.core", pool="prefork", concurrency=2, conf={**app_conf, "pluginhost_workflows_wake_poll_s": 0.5}
    )
    began = time.monotonic()
    asleep = [core.flows.start("nap", {"tag": "asleep"}) for _ in range(n)]
    wait_until(
        lambda: len(core.flows.runs(name="nap", status="sleeping", limit=10_000)) == n,
        timeout=120,
        interval=0.5,
        what=f"{n} runs asleep",
    )
    assert time.monotonic() - began < 25, "the first runs woke before the last fell asleep: sleep longer"
    core.host.disable(core.host.plugin_of("step_c"), actor="ops")
    wait_until(
        lambda: len(core.flows.runs(name="nap", status="succeeded", limit=10_000)) == n,
        timeout=180,
        interval=0.5,
        what=f"{n} runs woke and finished",
    )
    assert core.executions_of("step_c", "asleep") == 0
    sample = core.flows.run(asleep[0].id)
    assert sample.steps[0].status == "skipped" and "disabled" in (sample.steps[0].error or "")
    core.host.enable(core.host.plugin_of("step_c"), actor="ops")
    later = core.flows.start("nap", {"tag": "later"})
    assert later.get(timeout=60)["c"] == 3
    assert core.executions_of("step_c", "later") == 1


@pytest.mark.parametrize("backend", ["redis"], indirect=True)
def test_signal_through_the_cli(core: ModuleType, workers: Any, app_conf: dict[str, Any]) -> None:
    _define(core, core.VERIFY)
    workers("tests.apps.core", pool="solo")
    res = core.flows.start("verify", {"tag": "cli", "email": "cli@example.com"})
    wait_until(lambda: _status(core, res.id) == "waiting", timeout=30, what="run waiting")
    bad = _cli(app_conf, "workflows", "signal", res.id, "verified", "--payload", "[1]")
    assert bad.returncode != 0 and "JSON object" in bad.stderr
    ok = _cli(app_conf, "workflows", "signal", "verified", "--workflow", "verify", "--key", "cli@example.com")
    assert ok.returncode == 0, ok.stderr
    assert res.get(timeout=30)["signals"] == {"verified": "received"}
    shown = _cli(app_conf, "workflows", "run", res.id)
    assert "wait for verified" in shown.stdout and "signal verified" in shown.stdout


def _cli(conf: dict[str, Any], *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(conf, "tests.apps.core:app", *args)


def test_a_run_just_woken_from_a_long_sleep_is_not_swept_as_stalled(stores: tuple[WorkflowStore, WaitStore]) -> None:
    """A run whose last step finished days ago and that was claimed from its
    wait a moment ago is moving (its continuation is on its way), not lost."""
    store, waits = stores
    run_id = _new_run(store)
    _reach(waits, run_id, seconds=0.01)
    time.sleep(0.05)
    (wake,) = waits.claim_due("w")
    long_ago = wake_claimed_long_ago() - timedelta(days=3)
    from workflows.store.schema import runs as runs_table
    from workflows.store.schema import steps as steps_table

    with waits.engine.begin() as conn:  # it went to sleep three days ago
        conn.execute(update(runs_table).values(created_at=long_ago))
        conn.execute(
            update(steps_table).where(steps_table.c.position == 0).values(started_at=long_ago, finished_at=long_ago)
        )
    assert store.stalled_steps(3600) == []
    waits.sent(wake)
    assert store.stalled_steps(3600) == []  # woke (sent on) just now
    with waits.engine.begin() as conn:
        conn.execute(update(waits_table).values(claimed_at=long_ago, woke_at=long_ago))
    assert [r for r, _, _ in store.stalled_steps(3600)] == [run_id]  # an hour on, nothing moved: lost


# -- faults while runs sleep ---------------------------------------------------------


@pytest.mark.parametrize("backend", ["redis"], indirect=True)
def test_a_run_asleep_across_a_broker_restart_wakes_once(
    core: ModuleType, workers: Any, app_conf: dict[str, Any], private_redis: Any
) -> None:
    """The broker (Redis without persistence) is SIGKILLed while a run sleeps and
    comes back empty 3 s later, after the run's wake-up time: nothing of the run
    was in it, and the wake-up that could not be sent is tried again."""
    from tests import harness

    conf = {**app_conf, "broker_url": private_redis.url(), "pluginhost_workflows_wake_poll_s": 0.3}
    harness.configure_app(core.app, conf)
    _define(core, core.SLEEPY)
    workers("tests.apps.core", conf=conf, pool="prefork", concurrency=2)
    res = core.flows.start("sleepy", {"tag": "broker"})
    wait_until(lambda: _status(core, res.id) == "sleeping", timeout=30, what="run sleeping")
    private_redis.kill()
    time.sleep(3.0)  # its wake-up time passes while the broker is away
    private_redis.start(timeout_s=30)
    wait_until(lambda: _status(core, res.id) == "succeeded", timeout=60, interval=0.2, what="run woke and finished")
    time.sleep(1.0)
    assert core.executions_of("step_c", "broker") == 1
    (wait,) = core.flows.run(res.id).waits
    assert wait.status == "done" and wait.woke_at is not None


@pytest.mark.parametrize("backend", ["redis"], indirect=True)
def test_a_run_asleep_across_a_ten_second_store_outage_wakes_once(
    core: ModuleType, workers: Any, app_conf: dict[str, Any]
) -> None:
    """The store is cut off for 10 s (a proxy that resets every connection) over the
    run's wake-up time: the wakers' claims fail and are logged; once it is back the
    run wakes, late, once."""
    from sqlalchemy.engine import make_url

    from tests.tcpproxy import TcpProxy

    _define(core, core.SLEEPY)
    proxy = TcpProxy(("127.0.0.1", 5432))
    try:
        dbname = str(make_url(app_conf["pluginhost_store"]).database)
        conf = {**app_conf, "pluginhost_store": proxy.url(dbname), "pluginhost_workflows_wake_poll_s": 0.3}
        w = workers("tests.apps.core", conf=conf, pool="prefork", concurrency=2)
        res = core.flows.start("sleepy", {"tag": "outage"})
        wait_until(lambda: _status(core, res.id) == "sleeping", timeout=30, what="run sleeping")
        proxy.cut()
        time.sleep(10.0)
        assert _status(core, res.id) == "sleeping"  # the test reaches the store directly: not woken
        proxy.restore()
        wait_until(lambda: _status(core, res.id) == "succeeded", timeout=60, interval=0.2, what="run woke")
        time.sleep(1.0)
        assert core.executions_of("step_c", "outage") == 1
        assert "wake-ups not claimed" in w.log_text()
    finally:
        proxy.close()


def _reach_all(url: str, run_ids: list[str], start: Any) -> None:
    engine = create_engine(url)
    waits = WaitStore(engine)
    start.wait(30)
    for run_id in run_ids:
        _reach(waits, run_id, kind="signal", signal="ok", seconds=None)
    engine.dispose()


def _signal_all(url: str, run_ids: list[str], start: Any) -> None:
    engine = create_engine(url)
    waits = WaitStore(engine)
    start.wait(30)
    for run_id in run_ids:
        wake = waits.deliver(run_id, _at_stage_1, "ok", {"n": 1}, None, "signaller")
        if wake is not None:
            waits.sent(wake)
    engine.dispose()


def test_a_signal_racing_the_run_to_its_wait_is_never_missed(empty_pg_url: str) -> None:
    """One process brings 150 runs to their WaitFor while another signals them, at
    the same moment: each run's wait ends up received, whichever came first."""
    engine = create_engine(empty_pg_url)
    store = open_workflow_store(engine)
    store.migrate()
    waits = WaitStore(engine)
    run_ids = [_new_run(store) for _ in range(150)]
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    procs = [
        ctx.Process(target=_reach_all, args=(empty_pg_url, run_ids, start)),
        ctx.Process(target=_signal_all, args=(empty_pg_url, run_ids, start)),
    ]
    for p in procs:
        p.start()
    time.sleep(2)  # both connected and waiting
    start.set()
    try:
        for p in procs:
            p.join(timeout=60)
            assert p.exitcode == 0
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    outcomes = [waits.timeline(r)[0][0].outcome for r in run_ids]
    assert outcomes.count("received") == len(run_ids), f"{outcomes.count(None)} signals missed by their wait"
    store.close()
    engine.dispose()


@pytest.mark.parametrize("backend", ["redis"], indirect=True)
def test_a_workflow_capability_starting_with_a_wait_keeps_the_capability_tasks_check(
    core: ModuleType, workers: Any
) -> None:
    """A first stage that is a wait has no step to take over the capability
    task's check on the worker (G2): run_capability sends the capability task
    itself, and a disable that lands while it is queued refuses the run."""
    from pluginhost import CapabilityDisabled

    _define(core, core.NAP_FIRST)
    res = core.host.run_capability("run_nap", {"tag": "nap-gated"})  # queued, no worker yet
    assert core.flows.run(res.id) is None  # nothing recorded before the capability task runs
    core.host.disable("run_nap")
    workers("tests.apps.core", pool="solo")
    with pytest.raises(CapabilityDisabled, match="run_nap"):
        res.get(timeout=30)
    assert core.flows.run(res.id) is None and core.executions_of("step_c", "nap-gated") == 0
    core.host.enable("run_nap")
    ok = core.host.run_capability("run_nap", {"tag": "nap-ok"})
    assert ok.get(timeout=30)["c"] == 3
