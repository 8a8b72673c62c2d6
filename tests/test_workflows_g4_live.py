"""G4 under faults, on real workers: a repeated start runs the run's recorded
version and input; a repeated finished step sends nothing; a step whose pool
process was SIGKILLed is taken over at once; a disabled step follows the step's
policy, not the capability's.

Real Celery workers (tests/harness/) on Redis or RabbitMQ, PostgreSQL store.
Executions are counted by their side effect (a row per capability run, in the
store database: tests/apps/core.py, tests/apps/faults_app.py).
"""

from __future__ import annotations

import os
import re
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import pytest

from tests.harness import wait_finished, wait_until
from workflows import Parallel, Step, Workflow
from workflows.runtime import STEP_TASK_PREFIX

FAULTS = "tests.apps.faults_app"


@pytest.fixture
def faults(app_conf: dict[str, Any], configure_app: Callable[[Any], Any]) -> Iterator[ModuleType]:
    """tests.apps.faults_app in this process, on this test's broker and store."""
    from tests.apps import faults_app as module

    configure_app(module.app)
    module.host.with_store(app_conf["pluginhost_store"])
    module.host.sync()
    module.flows.define(module.FAULTY)
    module.engine()
    yield module
    module.host.store.close()


# -- item 5: a repeated start ------------------------------------------------------------

V1 = Workflow("g4ver", steps=[Step("step_a"), Step("step_b")])
V2 = Workflow("g4ver", steps=[Step("step_c")])


@pytest.mark.parametrize("backend", ["redis"], indirect=True)
def test_a_repeated_start_runs_the_recorded_version_and_input(core: ModuleType, workers: Any) -> None:
    """Fault: a start records its run, then its process dies before the canvas is
    sent (or its message is delivered again); meanwhile the workflow is defined
    again. The start is repeated with the same run id: ``start(task_id=...)``,
    and a redelivered ``WorkflowCapability`` task (``run_capability(...,
    task_id=...)``, the same message id a redelivery has).

    Asserted: each run executes the version and the input it recorded: the steps
    of version 1 under their own rows, the first input, no step of version 2 run."""
    workers("tests.apps.core", pool="prefork", concurrency=2)
    flows = core.flows
    assert flows.define(V1) == 1
    run_id, _ = flows.prepare("g4ver", {"tag": "v1-input"})  # recorded; its canvas never sent
    cap_run = str(uuid.uuid4())
    flows.prepare("flow", {"tag": "cap-input"}, run_id=cap_run)  # WorkflowCapability recorded it, then died
    assert flows.define(V2) == 2
    assert flows.define(Workflow("flow", steps=[Step("step_c"), Step("step_a")])) == 2

    out = flows.start("g4ver", {"tag": "new-input"}, task_id=run_id).get(timeout=60)
    cap_out = core.host.run_capability("run_flow", {"tag": "new-cap-input"}, task_id=cap_run).get(timeout=60)

    run = flows.run(run_id)
    assert (run.version, run.status) == (1, "succeeded")
    assert [(s.slug, s.status, s.attempts) for s in run.steps] == [
        ("step_a", "succeeded", 1),
        ("step_b", "succeeded", 1),
    ]
    assert out == {"tag": "v1-input", "a": 1, "order": ["a"], "b": 2, "shared": "b"}
    assert core.executions_of("step_c", "v1-input") == core.executions_of("step_c", "new-input") == 0

    run = flows.run(cap_run)
    assert (run.version, run.status, run.input) == (1, "succeeded", {"tag": "cap-input"})
    assert [s.slug for s in run.steps] == ["step_a", "step_b", "step_c", "step_d", "step_e"]
    assert cap_out["tag"] == "cap-input" and cap_out["e"] == 1 and cap_out["order"] == ["a", "d"]
    assert [core.executions_of(slug, "cap-input") for slug in ("step_a", "step_b", "step_c", "step_d", "step_e")] == [
        1
    ] * 5


# -- item 6: a repeated finished step -----------------------------------------------------


@pytest.mark.parametrize("backend", ["redis"], indirect=True)
def test_a_repeated_finished_step_does_not_run_the_next_step_again(
    faults: ModuleType, workers: Any, app_conf: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fault: the first step's message (with the rest of the run in it) is
    published again, byte for byte, after the step finished and while the next
    stage runs (``fetch`` held 3 s): what a broker redelivers when an ack is lost.

    Asserted: the duplicate sends nothing: each step ran once (counted by side
    effect) with one attempt, and the run succeeds with every output."""
    workers(FAULTS, conf={**app_conf, "worker_prefetch_multiplier": 1}, concurrency=3)
    amqp = faults.app.amqp
    send = amqp.send_task_message
    captured: list[tuple[str, Any, dict[str, Any]]] = []

    def capture(producer: Any, name: str, message: Any, **kwargs: Any) -> Any:
        if name.startswith(STEP_TASK_PREFIX) and not captured:
            captured.append((name, message, kwargs))
        return send(producer, name, message, **kwargs)

    monkeypatch.setattr(amqp, "send_task_message", capture)
    run_id = faults.flows.start("faulty", {"tag": "again", "step_s": 0.05, "hold": {"fetch": 3.0}}).id
    monkeypatch.undo()
    assert len(captured) == 1
    wait_until(
        lambda: faults.execution_count("fetch", "again") == 1 and faults.finished_count("score", "again") == 1
        and faults.finished_count("fetch", "again") == 0,
        30, what="fetch to be held after prepare and score finished",
    )  # fmt: skip

    name, message, kwargs = captured[0]
    with faults.app.producer_or_acquire() as producer:
        send(producer, name, message, **kwargs)  # the first step, delivered again

    run = wait_finished(faults.flows, run_id)
    time.sleep(1.5)  # what a duplicate would run, it runs by now (steps take 0.05 s)
    run = faults.flows.run(run_id)
    assert run.status == "succeeded"
    executions = [faults.execution_count(slug, "again") for slug in faults.OUTPUT_KEYS]
    assert ([s.attempts for s in run.steps], executions) == ([1, 1, 1, 1], [1, 1, 1, 1])
    assert {k: run.output[k] for k in faults.OUTPUT_KEYS.values()} == dict.fromkeys(
        faults.OUTPUT_KEYS.values(), "again"
    )


@pytest.mark.parametrize("backend", ["redis"], indirect=True)
def test_another_canvas_of_a_finished_run_reuses_every_output_and_completes(faults: ModuleType, workers: Any) -> None:
    """A second canvas of a run (a repeated start after the run finished, or a
    delivery left over from before a resume) meets steps that another message
    finished: it is not a repeat of those messages, so it must not be dropped;
    it reuses each recorded output and goes on with its own continuation
    (its chord completes, its merge runs).

    Asserted: the second canvas resolves to the run's output; every step ran
    once, with one attempt; the run is unchanged."""
    from workflows.compile import build

    workers(FAULTS, concurrency=2)
    flows = faults.flows
    run_id = flows.start("faulty", {"tag": "canvas", "step_s": 0.05}).id
    before = wait_finished(flows, run_id)
    assert before.status == "succeeded"
    again = build(flows.runtime, faults.FAULTY, run_id, before.input).apply_async()  # a new id for its last task
    assert again.get(timeout=30) == before.output
    after = flows.run(run_id)
    assert [s.model_dump() for s in after.steps] == [s.model_dump() for s in before.steps]
    assert [faults.execution_count(slug, "canvas") for slug in faults.OUTPUT_KEYS] == [1, 1, 1, 1]


@pytest.mark.parametrize("backend", ["amqp"], indirect=True)
def test_a_step_whose_pool_process_was_sigkilled_is_taken_over_at_once(faults: ModuleType, workers: Any) -> None:
    """Fault: the pool process running a step is SIGKILLed (its worker lives on);
    RabbitMQ gets the message back at once (``reject_on_worker_lost``).

    Asserted: the redelivered step is not refused for a ``running`` row: its
    owner's database session died with the process, so the step is taken over
    (a second attempt, a second execution) within seconds and the run succeeds."""
    worker = workers(FAULTS, concurrency=2)
    run_id = faults.flows.start("faulty", {"tag": "killed", "step_s": 0.05, "hold": {"fetch": 120}}).id
    pid = wait_until(
        lambda: faults.execution_count("fetch", "killed") == 1 and faults.finished_count("score", "killed") == 1
        and faults.busy_pids() & set(worker.children()),
        30, what="fetch to be held in a pool process, score done",
    ).pop()  # fmt: skip
    os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    run = wait_finished(faults.flows, run_id, 30)
    taken_over_s = time.monotonic() - killed_at
    assert run.status == "succeeded", run.error
    assert [s.attempts for s in run.steps] == [1, 2, 1, 1]
    assert faults.execution_count("fetch", "killed") == 2
    assert taken_over_s < 15, taken_over_s


# -- item 7: the step's policy decides ----------------------------------------------------

POLICY = Workflow("g4policy", steps=[Step("skipper", on_disabled="fail"), Step("step_c")])
SKIPPING = Workflow("g4skipping", steps=[Parallel(Step("skipper"), Step("step_c"))])


@pytest.mark.parametrize("backend", ["redis"], indirect=True)
def test_a_disabled_step_follows_the_steps_policy_not_the_capabilitys(core: ModuleType, workers: Any) -> None:
    """The capability is declared ``on_disabled="skip"``; with its plugin
    disabled, a step whose policy is ``fail`` fails the run (the error names the
    plugin), and a step whose policy is ``skip`` is recorded skipped; the body
    runs in neither."""
    workers("tests.apps.core", pool="prefork")
    flows = core.flows
    flows.define(POLICY)
    flows.define(SKIPPING)
    core.host.disable("skipper", wait=True, timeout=5)
    failed = flows.start("g4policy", {"tag": "fail"})
    with pytest.raises(Exception, match="plugin 'skipper' is disabled"):
        failed.get(timeout=60)
    run = wait_finished(flows, failed.id)
    assert (run.status, [s.status for s in run.steps]) == ("failed", ["failed", "cancelled"])
    skipped = flows.start("g4skipping", {"tag": "skip"}).get(timeout=60)
    run = flows.run(flows.runs(name="g4skipping")[0].id)
    assert [s.status for s in run.steps] == ["skipped", "succeeded"] and skipped["c"] == 3
    assert core.executions_of("skipper") == 0


# -- G2 in a step: a view that is behind and cannot be loaded --------------------------------

STALE = Workflow("g4stale", steps=[Step("step_a"), Step("step_c")])


@pytest.fixture
def executions_table(core: ModuleType) -> None:
    """The table the capabilities record their runs in, created before
    ``nologin_role`` grants the worker's role its rights on the tables."""
    core.executions_of("step_a")


@pytest.mark.parametrize("backend", ["redis"], indirect=True)
@pytest.mark.parametrize("view_behind", [True, False], ids=["view-behind", "store-unreachable"])
def test_a_step_whose_process_cannot_reach_the_store_waits_and_is_not_lost(
    core: ModuleType,
    workers: Any,
    app_conf: dict[str, Any],
    executions_table: None,
    nologin_role: Any,
    view_behind: bool,
) -> None:
    """Fault: a run's first step is queued (ETA 2 s); the worker's database role
    then loses LOGIN (no new connection: a password rotation, ``max_connections``,
    a full pgbouncer pool). The pool process that meets the step
    (``--max-tasks-per-child 1``: no connection of its own) cannot open one.
    ``view-behind``: an admin changed another plugin meanwhile, so the process
    knows its plugin view is behind and cannot load it (G2).
    ``store-unreachable``: its view is current, its workflow store unreachable.

    Asserted: while it cannot connect, the step runs nothing and is not recorded
    (its row and the run stay pending, no body ran, the task did not fail); once
    LOGIN is back the step runs on the current view, once, and the run succeeds."""
    worker_url, set_login = nologin_role
    conf = {**app_conf, "pluginhost_store": worker_url, "pluginhost_stale_retry_s": 0.2}
    worker = workers("tests.apps.core", conf=conf, pool="prefork", concurrency=1, max_tasks_per_child=1)
    host, flows = core.host, core.flows
    flows.define(STALE)
    assert host.task("pure").delay({"n": 0}).get(timeout=20)["echo"] == {"n": 0}

    result = flows.start("g4stale", {"tag": "stale"}, countdown=2)
    assert host.refresh(wait=True, timeout=5) == [worker.hostname]  # the main process's revision reader is connected
    time.sleep(0.5)  # received: it waits in the worker for its ETA
    set_login(False)  # open connections keep working; no new one can be made
    if view_behind:
        assert worker.hostname in host.disable("pure", wait=True, timeout=5)
    ended = re.compile(r"Task workflows\.step\.step_a\[[^\]]+\] (ignored|raised|succeeded|retry)")
    wait_until(lambda: ended.search(worker.log_text()), 30, what="the step's first delivery to end")
    assert "raised unexpected" not in worker.log_text(), "the step failed instead of waiting"
    run = flows.run(result.id)
    assert (run.status, [(s.status, s.attempts) for s in run.steps]) == ("pending", [("pending", 0)] * 2), (
        f"a step that could not reach the store was recorded: {[(s.status, s.error) for s in run.steps]}"
    )
    assert (result.state, core.executions_of("step_a", "stale")) == ("PENDING", 0)

    set_login(True)
    out = result.get(timeout=60)
    run = flows.run(result.id)
    assert (run.status, [(s.status, s.attempts) for s in run.steps]) == ("succeeded", [("succeeded", 1)] * 2)
    assert out["a"] == 1 and out["c"] == 3
    assert [core.executions_of(slug, "stale") for slug in ("step_a", "step_c")] == [1, 1]
    expected = "cannot load revision" if view_behind else "sent again in"
    assert expected in worker.log_text()


# -- a step's retries are the step's, not Celery's default max_retries ----------------------

PATIENT = Workflow("g4patient", steps=[Step("step_d", retries=5, retry_backoff=0.01)])


@pytest.mark.parametrize("backend", ["redis"], indirect=True)
def test_a_step_retries_as_often_as_its_policy_says_past_celerys_default(core: ModuleType, workers: Any) -> None:
    """A step declared ``retries=5`` whose body fails four times (more than
    Celery's default ``max_retries`` of 3, which ``task.retry(max_retries=None)``
    falls back to) is retried by the step's own count and succeeds on the fifth
    attempt."""
    workers("tests.apps.core", pool="solo")
    flows = core.flows
    flows.define(PATIENT)
    out = flows.start("g4patient", {"tag": "patient", "d_fail_until": 4}).get(timeout=60)
    run = wait_finished(flows, flows.runs(name="g4patient")[0].id)
    assert (run.status, run.steps[0].attempts, out["d"]) == ("succeeded", 5, 4)
    assert core.executions_of("step_d", "patient") == 5


# -- G2/G3 in a step: a disable acknowledged while the step waits for its claim -----------

LATE = Workflow("g4late", steps=[Step("step_a", on_disabled="skip"), Step("step_c")])


@pytest.mark.parametrize("backend", ["redis"], indirect=True)
def test_a_disable_acknowledged_while_a_step_waits_for_its_claim_is_obeyed(
    core: ModuleType, workers: Any, app_conf: dict[str, Any]
) -> None:
    """Found by the 30-minute history soak: a step body started 17.6 ms after its
    worker acknowledged the disable. Fault: another connection holds the step's row
    (a lock, as a long transaction or a migration would), so the step's claim waits;
    meanwhile ``disable(wait=True)`` returns with this worker's acknowledgement. When
    the lock goes, the step must follow its policy (skip) and its body must not run."""
    from sqlalchemy import create_engine, text

    worker = workers("tests.apps.core", pool="prefork", concurrency=1)
    host, flows = core.host, core.flows
    flows.define(LATE)
    assert host.task("pure").delay({"n": 0}).get(timeout=20)["echo"] == {"n": 0}
    run_id, canvas = flows.prepare("g4late", {"tag": "late"})
    engine = create_engine(app_conf["pluginhost_store"])
    conn = engine.connect()
    try:
        conn.execute(text("BEGIN"))
        conn.execute(text("SELECT * FROM workflows_steps WHERE run_id = :r AND position = 0 FOR UPDATE"), {"r": run_id})
        result = canvas.apply_async()
        wait_until(
            lambda: "workflows.step" in worker.log_text() and "received" in worker.log_text(), 20, what="the step"
        )
        time.sleep(1.0)  # the step has looked at its plugin and waits for its claim
        assert worker.hostname in host.disable("step_a", wait=True, timeout=5)
    finally:
        conn.execute(text("ROLLBACK"))
        conn.close()
        engine.dispose()
    out = result.get(timeout=60)
    run = wait_finished(flows, run_id)
    assert [s.status for s in run.steps] == ["skipped", "succeeded"], [(s.status, s.error) for s in run.steps]
    assert core.executions_of("step_a", "late") == 0 and out["c"] == 3
