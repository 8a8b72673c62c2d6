"""Faults never lose a queued run or a workflow step silently: every run ends in a
recorded state (succeeded, or failed and resumable).

Real workers (tests/harness/), real RabbitMQ, Redis and PostgreSQL on 127.0.0.1.
Faults injected: SIGKILL of whole workers and of single prefork children mid-step,
duplicate and concurrent delivery of a step message, a worker lost on Redis (whose
unacked message only comes back after ``visibility_timeout``), and restarts of the
broker itself. A test that restarts its broker starts a private one
(tests/servers.py), never the machine's shared servers.

The workflow is ``faulty`` from tests/apps/faults_app.py:
``prepare -> [fetch | score] -> store``; every step execution is recorded in
``fault_executions``. The counts each test prints (``FAULTS ...`` lines, shown with
``pytest -s`` or ``-rP``) are the figures quoted in the README.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from celery.canvas import _chain, chord
from sqlalchemy import select

from tests import harness
from tests.harness import wait_until
from tests.servers import PrivateRabbitMQ, PrivateRedis
from workflows.compile import build
from workflows.runtime import STEP_TASK_PREFIX
from workflows.store import runs as runs_table
from workflows.store import steps as steps_table

APP = "tests.apps.faults_app"
PLUGINHOST = str(Path(sys.executable).with_name("pluginhost"))
FINISHED = harness.RUN_FINISHED


# -- fixtures and helpers ---------------------------------------------------------


@pytest.fixture
def faults(app_conf: dict[str, Any], configure_app: Callable[[Any], Any]) -> Iterator[ModuleType]:
    """tests.apps.faults_app in this process, on this test's broker and store."""
    from tests.apps import faults_app as module

    configure_app(module.app)
    module.host.with_store(app_conf["pluginhost_store"])
    module.host.sync()
    module.flows.define(module.FAULTY)
    module.engine()  # fault_executions exists before any worker writes to it
    yield module
    module.host.store.close()


def start_workers(workers: harness.WorkerFactory, count: int, **kwargs: Any) -> list[harness.Worker]:
    """Start ``count`` workers at once (their start-up overlaps), then wait for each."""
    started = [workers(APP, wait=False, **kwargs) for _ in range(count)]
    for worker in started:
        worker.wait_ready(90)
    return started


def start_runs(faults: ModuleType, count: int, prefix: str, **input: Any) -> list[str]:
    return [faults.flows.start("faulty", {"tag": f"{prefix}{i}", **input}).id for i in range(count)]


def run_statuses(faults: ModuleType, run_ids: Iterable[str] | None = None) -> dict[str, str]:
    """Run id -> status, in one query."""
    q = select(runs_table.c.id, runs_table.c.status)
    if run_ids is not None:
        q = q.where(runs_table.c.id.in_(list(run_ids)))
    with faults.engine().connect() as conn:
        return {r.id: r.status for r in conn.execute(q)}


def step_rows(faults: ModuleType, run_ids: Iterable[str] | None = None) -> list[Any]:
    q = select(steps_table).order_by(steps_table.c.run_id, steps_table.c.position)
    if run_ids is not None:
        q = q.where(steps_table.c.run_id.in_(list(run_ids)))
    with faults.engine().connect() as conn:
        return list(conn.execute(q))


def step_progress(faults: ModuleType) -> tuple[Any, ...]:
    """A fingerprint of every step row: it changes whenever any step moves."""
    return tuple((r.run_id, r.position, r.status, r.attempts) for r in step_rows(faults))


def wait_all_finished(faults: ModuleType, run_ids: list[str], timeout_s: float) -> dict[str, str]:
    """Wait until every one of the runs is succeeded or failed (or the time is up); return their statuses."""
    seen: dict[str, str] = {}

    def all_finished() -> bool:
        seen.clear()
        seen.update(run_statuses(faults, run_ids))
        return all(s in FINISHED for s in seen.values())

    wait_until(all_finished, timeout_s, 0.2)
    return dict(seen)


def wait_quiet(faults: ModuleType, quiet_s: float, timeout_s: float) -> None:
    """Wait until no step row has changed for ``quiet_s`` seconds (bounded by ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    last, since = step_progress(faults), time.monotonic()
    while time.monotonic() - since < quiet_s and time.monotonic() < deadline:
        time.sleep(0.25)
        now = step_progress(faults)
        if now != last:
            last, since = now, time.monotonic()


def settle_and_resume(faults: ModuleType, run_ids: list[str], timeout_s: float) -> dict[str, Any]:
    """Wait for every run; what has not finished by then is handed to the sweeper
    (as an operator's cron would) so it ends failed; resume the failed ones once;
    return what happened. ``lost`` counts runs in no recorded final state."""
    first = wait_all_finished(faults, run_ids, timeout_s)
    swept: list[str] = []
    if any(s not in FINISHED for s in first.values()):
        swept = sweep_when_quiet(faults, run_ids)["swept"]
        first = run_statuses(faults, run_ids)
    failed = sorted(i for i, s in first.items() if s == "failed")
    errors = {i: faults.flows.run(i).error for i in failed}
    for run_id in failed:
        faults.flows.resume(run_id)
    final = wait_all_finished(faults, run_ids, timeout_s) if failed else first
    return {
        "first": first,
        "failed": failed,
        "swept": swept,
        "errors": errors,
        "final": final,
        "succeeded_first_time": sum(s == "succeeded" for s in first.values()),
        "lost": sorted(i for i, s in final.items() if s != "succeeded"),
    }


def sweep_when_quiet(faults: ModuleType, run_ids: list[str], quiet_s: float = 3.0) -> dict[str, Any]:
    """Once no step has moved for ``quiet_s``, run the sweeper as an operator's cron
    would (``sweep(older_than_s=quiet_s)``); return what it saw and what is still
    unfinished afterwards (a run lost without a trace)."""
    wait_quiet(faults, quiet_s=quiet_s, timeout_s=90)
    untouched = run_statuses(faults, run_ids)
    swept = faults.flows.sweep(older_than_s=quiet_s)
    after = run_statuses(faults, run_ids)
    stuck = {i: (s, [r.status for r in step_rows(faults, [i])]) for i, s in after.items() if s not in FINISHED}
    return {"untouched": untouched, "swept": swept, "stuck": stuck}


def assert_complete(faults: ModuleType, run_ids: list[str]) -> None:
    """Each run succeeded, every step row succeeded, none is left running, and the
    final context holds every step's output (no parallel branch dropped)."""
    rows = step_rows(faults, run_ids)
    assert [r for r in rows if r.status == "running"] == []
    by_run: dict[str, list[Any]] = {}
    for r in rows:
        by_run.setdefault(r.run_id, []).append(r)
    for run_id in run_ids:
        run = faults.flows.run(run_id)
        assert run is not None and run.status == "succeeded", (
            run_id,
            run and run.status,
            run and run.error,
        )
        assert [(r.position, r.status) for r in by_run[run_id]] == [
            (0, "succeeded"),
            (1, "succeeded"),
            (2, "succeeded"),
            (3, "succeeded"),
        ]
        tag = run.input["tag"]
        assert {k: run.output.get(k) for k in faults.OUTPUT_KEYS.values()} == dict.fromkeys(
            faults.OUTPUT_KEYS.values(), tag
        ), (run_id, run.output)


def report(name: str, **counts: Any) -> None:
    print(f"\nFAULTS {name}: " + ", ".join(f"{k}={v}" for k, v in counts.items()))


def step_messages(faults: ModuleType, run_id: str) -> dict[int, tuple[tuple[Any, ...], dict[str, Any]]]:
    """Position -> (args after the context, kwargs) of each step task, taken from the
    canvas workflows/compile.py builds for the run (what its messages carry)."""
    run = faults.flows.run(run_id)
    canvas = build(faults.flows.runtime, faults.FAULTY, run_id, run.input)
    found: dict[int, tuple[tuple[Any, ...], dict[str, Any]]] = {}

    def walk(sig: Any) -> None:
        if isinstance(sig, (_chain, chord)):
            for task in sig.tasks:
                walk(task)
            if isinstance(sig, chord) and sig.body is not None:
                walk(sig.body)
        elif sig.task.startswith(STEP_TASK_PREFIX):
            args = tuple(sig.args)
            found[int(args[-1])] = (args[-2:], dict(sig.kwargs))

    walk(canvas)
    return found


def strand_run(faults: ModuleType, worker: harness.Worker, slug: str, tag: str) -> str:
    """Start a run that holds in ``slug``; SIGKILL its worker there; return the run id."""
    run_id = faults.flows.start("faulty", {"tag": tag, "step_s": 0.05, "hold": {slug: 120}}).id
    position = list(faults.OUTPUT_KEYS).index(slug)

    def held_alone() -> bool:
        steps = faults.flows.run(run_id).steps
        others = [s.status for s in steps[:position] if s.slug != slug]
        return faults.execution_count(slug, tag) == 1 and set(others) <= {"succeeded"}

    wait_until(held_alone, 30, what=f"{slug} of {tag} to start, after the steps before it")
    worker.kill()
    row = faults.flows.run(run_id).steps[position]
    assert (row.slug, row.status, row.attempts) == (slug, "running", 1)
    return run_id


def back_or_replaced(
    workers: harness.WorkerFactory,
    live: list[harness.Worker],
    conf: dict[str, Any],
    timeout_s: float,
) -> int:
    """After a broker restart: wait until each worker answers a ping again. A worker
    that exited instead is replaced, as its supervisor would (docker-compose.yml:
    ``restart: unless-stopped``); returns how many exited. One that neither answers
    nor exits fails the test."""
    crashed = 0
    for index, worker in enumerate(list(live)):
        try:
            worker.wait_ready(timeout_s)
        except harness.WorkerError:
            if worker.running:
                raise
            crashed += 1
            print(f"\n{worker.hostname} exited after the broker restart:\n{worker.log_tail(8)}")
            worker.kill()  # reap what is left of its group
            live[index] = workers(APP, conf=conf, concurrency=2)
    return crashed


# -- 1. workers and pool children SIGKILLed mid-step (RabbitMQ) ----------------------


@pytest.mark.parametrize("backend", ["amqp"], indirect=True)
def test_sigkilled_workers_and_pool_children_lose_no_run(faults: ModuleType, workers: harness.WorkerFactory) -> None:
    """Fault: 20 SIGKILLs while ~30 workflow runs execute on two prefork workers
    (concurrency 2) over RabbitMQ: 4 kill a whole worker (main process and pool; a
    replacement is started each time), 16 kill one pool child, each chosen while it is
    inside a step function.

    Asserted: every run ends succeeded, or in a recorded state from which it is
    resumed: failed, or left ``running`` with no progress and then failed by the
    sweeper (``sweep``); after one ``resume`` all succeed: 0 runs lost; no step row
    is left ``running``; every final context holds the output
    of all four steps. Steps are at-least-once: a killed step runs again (RabbitMQ
    redelivers the unacked message at once), so executions may exceed steps.
    """
    rng = random.Random(20)
    live = start_workers(workers, 2, concurrency=2)
    ready = {w.hostname for w in live}
    step_s = 0.25
    run_ids = start_runs(faults, 24, "k", step_s=step_s)
    plan = ["child"] * 16 + ["worker"] * 4
    rng.shuffle(plan)
    kills: Counter[str] = Counter()
    started = time.monotonic()

    def busy_children() -> list[tuple[harness.Worker, int]]:
        if all(s in FINISHED for s in run_statuses(faults, run_ids).values()):
            run_ids.extend(start_runs(faults, 6, f"k{len(run_ids)}-", step_s=step_s))  # keep work in flight
        busy = faults.busy_pids()
        return [(w, pid) for w in live for pid in w.children() if pid in busy]

    while sum(kills.values()) < len(plan):
        what = plan[sum(kills.values())]
        for w in live:  # a worker is killed only once it is up
            if w.hostname not in ready:
                w.wait_ready(90)
                ready.add(w.hostname)
        try:
            found = wait_until(busy_children, 30, what="a pool child inside a step")
        except AssertionError:
            states = Counter((r.status, r.slug) for r in step_rows(faults, run_ids))
            raise AssertionError(
                f"no step executing after {dict(kills)} kills: {dict(states)}, "
                f"runs {Counter(run_statuses(faults, run_ids).values())}"
            ) from None
        victim, pid = rng.choice(found)
        if what == "worker":
            victim.kill()
            live.remove(victim)
            live.append(workers(APP, concurrency=2, wait=False))
        else:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue  # it exited meanwhile: pick another
        kills[what] += 1
        time.sleep(rng.uniform(0.2, 0.6))
    kill_s = time.monotonic() - started

    outcome = settle_and_resume(faults, run_ids, timeout_s=120)
    rows = step_rows(faults, run_ids)
    report(
        "worker-kill",
        kills=sum(kills.values()),
        worker_kills=kills["worker"],
        child_kills=kills["child"],
        runs=len(run_ids),
        succeeded_first_time=outcome["succeeded_first_time"],
        resumed=len(outcome["failed"]),
        lost=len(outcome["lost"]),
        steps_run_again=sum(r.attempts > 1 for r in rows),
        executions=faults.execution_count(),
        steps=len(rows),
        kill_phase_s=round(kill_s, 1),
    )
    assert sum(kills.values()) == 20
    assert outcome["lost"] == [], outcome
    assert_complete(faults, run_ids)


# -- 2. duplicate delivery ------------------------------------------------------------


@pytest.mark.parametrize("backend", ["redis"], indirect=True)
def test_a_redelivered_finished_step_reuses_its_recorded_output(
    faults: ModuleType, workers: harness.WorkerFactory
) -> None:
    """Fault: after a run succeeded, each of its step messages is delivered again
    (the context it got and the args and kwargs workflows/compile.py gives it: what
    a broker redelivers when an ack is lost).

    Asserted: each duplicate returns the recorded output (not a new one); the step
    rows (status, attempts, output, timings) are unchanged, and so are the run's
    status and output; every capability function ran exactly once.
    """
    workers(APP, concurrency=1)
    flows, rt = faults.flows, faults.flows.runtime
    run_id = flows.start("faulty", {"tag": "dup", "step_s": 0.05}).id
    assert wait_all_finished(faults, [run_id], 60) == {run_id: "succeeded"}
    before = flows.run(run_id)
    messages = step_messages(faults, run_id)
    assert sorted(messages) == [0, 1, 2, 3]

    context = dict(before.input)  # what each step received: the input and earlier stages' outputs
    for stage in faults.FAULTY.stages():
        positions = [p for p, row in enumerate(before.steps) if row.slug in {s.slug for s in stage}]
        for position in positions:
            args, kwargs = messages[position]
            step_task = rt.step_task_for(before.steps[position].slug)
            again = step_task.apply_async(args=(context, *args), kwargs=kwargs)
            result = again.get(timeout=30)
            parts = [result] if isinstance(result, dict) else [p for p in result if isinstance(p, dict)]
            returned = {k: v for part in parts for k, v in part.items()}
            assert returned.items() >= before.steps[position].output.items(), (position, result)
        for position in positions:
            context.update(before.steps[position].output)

    after = flows.run(run_id)
    assert [s.model_dump() for s in after.steps] == [s.model_dump() for s in before.steps]
    assert (after.status, after.output, after.error) == (before.status, before.output, before.error)
    assert [faults.execution_count(slug, "dup") for slug in faults.OUTPUT_KEYS] == [1, 1, 1, 1]
    report("duplicate-after-finish", run_finished_at_moved=after.finished_at != before.finished_at)


@pytest.mark.parametrize("backend", ["redis"], indirect=True)
def test_a_step_delivered_twice_while_it_runs_runs_once_and_the_run_succeeds(
    faults: ModuleType,
    workers: harness.WorkerFactory,
    app_conf: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Fault: the first step's message (with the rest of the chain in it) is
    published twice back to back, to two workers that each take one message at a
    time, while the first delivery holds the step for 1.5 s.

    What happens: the second delivery finds the row ``running`` under a live owner
    (the first delivery's database session), so it does not run the capability: it
    looks again later, finds the step finished and sends nothing (the first
    delivery sent the rest of the chain). A running step is taken over only when
    its owner died or its claim is older than ``pluginhost_workflows_step_lease_s``.

    Asserted: the run ends succeeded with exactly one succeeded row per step and the
    outputs of all steps; every step ran once, with one attempt.
    """
    conf = {**app_conf, "worker_prefetch_multiplier": 1}
    start_workers(workers, 2, conf=conf, concurrency=1)
    amqp = faults.app.amqp
    send = amqp.send_task_message
    doubled: list[str] = []

    def send_twice(producer: Any, name: str, message: Any, **kwargs: Any) -> Any:
        result = send(producer, name, message, **kwargs)
        if name.startswith(STEP_TASK_PREFIX) and not doubled:
            doubled.append(message.headers["id"])
            send(producer, name, message, **kwargs)  # the very same message, again
        return result

    monkeypatch.setattr(amqp, "send_task_message", send_twice)
    run_id = faults.flows.start("faulty", {"tag": "twice", "step_s": 0.05, "hold": {"prepare": 1.5}}).id
    monkeypatch.undo()
    assert len(doubled) == 1

    assert wait_all_finished(faults, [run_id], 60) == {run_id: "succeeded"}
    assert_complete(faults, [run_id])
    time.sleep(1.5)  # the waiting duplicate looks again (0.5 s, then 1 s) and ends
    run = faults.flows.run(run_id)
    executions = [faults.execution_count(slug, "twice") for slug in faults.OUTPUT_KEYS]
    assert ([s.attempts for s in run.steps], executions) == ([1, 1, 1, 1], [1, 1, 1, 1])
    report("duplicate-while-running", attempts=[s.attempts for s in run.steps], executions=executions)


# -- 3. a worker lost on Redis: the sweeper ---------------------------------------------


@pytest.fixture
def lost_message_conf(app_conf: dict[str, Any]) -> dict[str, Any]:
    """Redis broker whose unacked messages come back only after an hour."""
    return {**app_conf, "broker_transport_options": {"visibility_timeout": 3600}}


@pytest.mark.parametrize("backend", ["redis"], indirect=True)
def test_a_step_lost_with_its_worker_is_swept_failed_and_resumes(
    faults: ModuleType, workers: harness.WorkerFactory, lost_message_conf: dict[str, Any]
) -> None:
    """Fault: on Redis, the worker running a parallel branch (``score``) is SIGKILLed;
    its unacked message is held back for ``visibility_timeout`` (an hour), so nothing
    runs the step again and its row stays ``running``.

    Asserted: the row is ``running`` after the kill; ``flows.sweep(older_than_s=1)``
    returns the run's id and marks it failed, naming the lost step (the step failed,
    the later step cancelled); ``flows.resume`` on a new worker completes it, running
    only the lost step again, with every step's output in the final context.
    """
    flows = faults.flows
    w1 = workers(APP, conf=lost_message_conf, concurrency=2)  # fetch runs beside score
    run_id = strand_run(faults, w1, "score", "swept")
    assert flows.sweep(older_than_s=30) == []  # not stale yet
    time.sleep(1.1)
    assert flows.sweep(older_than_s=1) == [run_id]
    run = flows.run(run_id)
    assert run.status == "failed"
    assert "step 'score' lost" in run.error and "worker died" in run.error
    assert [s.status for s in run.steps] == ["succeeded", "succeeded", "failed", "cancelled"]
    assert flows.sweep(older_than_s=1) == []  # reported once

    workers(APP, conf=lost_message_conf, concurrency=1)
    flows.resume(run_id)
    assert wait_all_finished(faults, [run_id], 60) == {run_id: "succeeded"}
    assert_complete(faults, [run_id])
    assert [faults.execution_count(slug, "swept") for slug in faults.OUTPUT_KEYS] == [1, 1, 2, 1]


@pytest.mark.parametrize("backend", ["redis"], indirect=True)
def test_cli_sweep_prints_the_run_whose_worker_died(
    faults: ModuleType, workers: harness.WorkerFactory, lost_message_conf: dict[str, Any]
) -> None:
    """Fault: as above, the worker dies inside the last step (``store``).

    Asserted: ``pluginhost workflows sweep --older-than 1`` (the real script) prints
    the run id and exits 0, the run is failed, and ``pluginhost workflows resume RUN
    --wait`` on a new worker completes it.
    """
    w1 = workers(APP, conf=lost_message_conf, concurrency=1)
    run_id = strand_run(faults, w1, "store", "cli")
    time.sleep(1.1)
    env = {
        **os.environ,
        harness.PH_CONF_ENV: json.dumps(lost_message_conf),
        "PLUGINHOST_APP": f"{APP}:app",
        "PYTHONPATH": str(harness.REPO_ROOT),
    }

    def ph(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [PLUGINHOST, "workflows", *args], env=env, cwd=harness.REPO_ROOT,
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip

    swept = ph("sweep", "--older-than", "1")
    assert (swept.returncode, swept.stdout, swept.stderr) == (0, f"{run_id}\n", "")
    assert faults.flows.run(run_id).status == "failed"

    workers(APP, conf=lost_message_conf, concurrency=1)
    resumed = ph("resume", run_id, "--wait", "--timeout", "60")
    assert resumed.returncode == 0, (resumed.stdout, resumed.stderr)
    assert_complete(faults, [run_id])


@pytest.mark.parametrize("backend", ["redis"], indirect=True)
def test_a_lost_chord_callback_is_swept_and_resume_keeps_both_branches(
    faults: ModuleType, workers: harness.WorkerFactory, app_conf: dict[str, Any]
) -> None:
    """Fault: the message of a parallel stage's merge (the chord callback) is lost
    by the broker: the worker stops consuming (``cancel_consumer``) while the last
    branch finishes, and the queue's list is deleted from Redis, as a Redis restart
    does. Both branches are recorded succeeded, the merge never runs, and the run
    waits forever: ``running``, its last step ``pending``, no step ``running``.

    Asserted: ``sweep(older_than_s=1)`` reports the run (failed at the step after the
    stage, resumable); ``resume`` completes it with *both* branches' outputs in the
    final context (rebuilt from the recorded outputs) and no step runs twice.
    """
    import redis

    flows, queue = faults.flows, app_conf["task_default_queue"]
    worker = workers(APP, concurrency=2)
    run_id = flows.start("faulty", {"tag": "nomerge", "step_s": 0.05, "hold": {"score": 1.5}}).id
    wait_until(
        lambda: faults.execution_count("score", "nomerge") and faults.finished_count("fetch", "nomerge"),
        30,
        what="score to start after fetch finished",
    )
    control = faults.app.control
    assert control.cancel_consumer(queue, destination=[worker.hostname], reply=True, timeout=5)
    wait_until(lambda: faults.finished_count("score", "nomerge"), 30, what="score to finish")
    client = redis.Redis.from_url(app_conf["broker_url"])
    try:
        wait_until(lambda: client.keys(f"{queue}*"), 10, what="the merge message in the queue")
        client.delete(*client.keys(f"{queue}*"))  # the broker loses it
    finally:
        client.close()
    assert control.add_consumer(queue, destination=[worker.hostname], reply=True, timeout=5)
    time.sleep(1.2)
    run = flows.run(run_id)
    assert (run.status, [s.status for s in run.steps]) == (
        "running",
        ["succeeded"] * 3 + ["pending"],
    )

    assert flows.sweep(older_than_s=1) == [run_id], "a run whose next message was lost is not reported"
    assert flows.run(run_id).status == "failed"
    flows.resume(run_id)
    assert wait_all_finished(faults, [run_id], 60) == {run_id: "succeeded"}
    assert_complete(faults, [run_id])  # fetched and scored are in the final context
    assert [faults.execution_count(slug, "nomerge") for slug in faults.OUTPUT_KEYS] == [1, 1, 1, 1]


# -- 4. RabbitMQ restarted under load --------------------------------------------------


@pytest.fixture
def private_rabbitmq(tmp_path: Path) -> Iterator[PrivateRabbitMQ]:
    """A RabbitMQ node of this test's own (the machine's node is shared); stopped at teardown."""
    problem = PrivateRabbitMQ.available()
    if problem:
        pytest.skip(problem)
    node = PrivateRabbitMQ(tmp_path / "rabbitmq")
    try:
        node.start(timeout_s=90)
        yield node
    finally:
        node.stop(timeout_s=30)


@pytest.mark.parametrize("backend", ["amqp"], indirect=True)
def test_rabbitmq_restart_loses_no_run(
    private_rabbitmq: PrivateRabbitMQ,
    faults: ModuleType,
    workers: harness.WorkerFactory,
    app_conf: dict[str, Any],
) -> None:
    """Fault: the RabbitMQ node is stopped and started again (a full node restart,
    10-25 s down depending on load) while runs are queued and steps execute on two
    prefork workers. Queues are durable and messages persistent (Celery's defaults);
    unacked messages go back to their queue. One run's parallel stage is timed to
    complete while the node is down: its last branch (``score``, held 6 s) returns
    during the outage, so its chord callback (the stage's merge) is published (or
    retried) against a dead broker.

    Asserted: the workers reconnect on their own and the producer too (a run started
    after the restart succeeds). Then, once nothing moves, the sweeper runs
    (``sweep(older_than_s=3)``, as an operator's cron would): no run is left
    ``pending``/``running``; every failed one succeeds on ``resume``: 0 lost, no step
    row left ``running``, every step's output in each final context.
    """
    conf = {**app_conf, "broker_url": private_rabbitmq.url()}
    harness.configure_app(faults.app, conf)  # reset again by configure_app's teardown
    live = start_workers(workers, 2, conf=conf, concurrency=2)
    chord_run = faults.flows.start("faulty", {"tag": "outage", "step_s": 0.05, "hold": {"score": 6.0}}).id
    wait_until(
        lambda: faults.execution_count("score", "outage") == 1 and faults.finished_count("fetch", "outage"),
        30,
        what="the held branch to start after the other one finished",
    )
    run_ids = start_runs(faults, 20, "rmq", step_s=0.3)
    wait_until(lambda: faults.finished_count("prepare", "rmq0"), 30, what="steps of the new runs to finish")
    before = Counter(run_statuses(faults, run_ids).values())

    stopped_at = time.monotonic()
    private_rabbitmq.stop()
    branch_returned_while_down = not faults.finished_count("score", "outage")
    wait_until(
        lambda: faults.finished_count("score", "outage"),
        30,
        what="the held branch to return, broker down",
    )
    time.sleep(1.0)  # the chord callback's first publish attempts meet a dead broker
    private_rabbitmq.start(timeout_s=90)
    down = time.monotonic() - stopped_at
    reconnect_started = time.monotonic()
    for worker in live:
        worker.wait_ready(120)
    reconnect_s = time.monotonic() - reconnect_started

    after = faults.flows.start("faulty", {"tag": "after", "step_s": 0.05}).id
    everything = [chord_run, *run_ids, after]
    assert wait_all_finished(faults, [after], 60) == {after: "succeeded"}
    swept = sweep_when_quiet(faults, everything)
    report(
        "rabbitmq-restart",
        runs=len(everything),
        before_restart=dict(before),
        down_s=round(down, 1),
        branch_returned_while_down=branch_returned_while_down,
        workers_back_s=round(reconnect_s, 1),
        succeeded_without_help=sum(s == "succeeded" for s in swept["untouched"].values()),
        swept=dict(Counter(swept["untouched"][i] for i in swept["swept"])),
        stuck_after_sweep=len(swept["stuck"]),
    )
    assert swept["stuck"] == {}, f"runs still pending/running after sweep (not reported): {swept['stuck']}"
    outcome = settle_and_resume(faults, everything, timeout_s=90)
    report(
        "rabbitmq-restart-resume",
        resumed=len(outcome["failed"]),
        lost=len(outcome["lost"]),
        errors=outcome["errors"],
    )
    assert outcome["lost"] == [], outcome
    assert_complete(faults, everything)


# -- 5. Redis restarted (it keeps nothing on disk) ----------------------------------------


@pytest.mark.parametrize("backend", ["redis"], indirect=True)
def test_redis_restart_reports_the_runs_it_lost(
    private_redis: PrivateRedis,
    faults: ModuleType,
    workers: harness.WorkerFactory,
    app_conf: dict[str, Any],
) -> None:
    """Fault: the Redis broker (no persistence, like the machine's) is SIGKILLed and
    started again 1 s later, empty, while runs are queued and steps execute. Queued
    and reserved messages are gone. (The result backend stays on the machine's Redis,
    so the fault is the broker's alone.)

    Asserted: the workers and the producer reconnect (a run started after the restart
    succeeds); the runs whose messages were lost are *reported*: after
    ``flows.sweep(older_than_s=...)`` every run is succeeded or failed, none is left
    ``pending`` or ``running``; each failed one succeeds on ``resume`` with every
    step's output in its final context.
    """
    conf = {**app_conf, "broker_url": private_redis.url()}
    harness.configure_app(faults.app, conf)  # reset again by configure_app's teardown
    live = start_workers(workers, 2, conf=conf, concurrency=2)
    run_ids = start_runs(faults, 16, "red", step_s=0.3)

    def between_steps() -> bool:
        """A step executes, and some run waits (queued) for its next step."""
        waiting = {r.run_id for r in step_rows(faults) if r.status == "succeeded"} - {
            r.run_id for r in step_rows(faults) if r.status == "running"
        }
        return bool(faults.busy_pids()) and any(s == "running" for i, s in run_statuses(faults, waiting).items())

    wait_until(between_steps, 30, what="a run waiting for its next step while others execute")
    before = Counter(run_statuses(faults, run_ids).values())

    private_redis.kill()
    time.sleep(1.0)
    private_redis.start(timeout_s=30)
    crashed = back_or_replaced(workers, live, conf, timeout_s=60)

    after = faults.flows.start("faulty", {"tag": "after", "step_s": 0.05}).id
    assert wait_all_finished(faults, [after], 60) == {after: "succeeded"}

    swept = sweep_when_quiet(faults, [*run_ids, after])
    report(
        "redis-restart",
        runs=len(run_ids) + 1,
        before_restart=dict(before),
        workers_crashed=crashed,
        succeeded_without_help=sum(s == "succeeded" for s in swept["untouched"].values()),
        unfinished_before_sweep=sum(s not in FINISHED for s in swept["untouched"].values()),
        swept=dict(Counter(swept["untouched"][i] for i in swept["swept"])),
        stuck_after_sweep=len(swept["stuck"]),
    )
    assert swept["stuck"] == {}, (
        f"runs still pending/running after sweep (message lost, not reported): {swept['stuck']}"
    )

    outcome = settle_and_resume(faults, [*run_ids, after], timeout_s=90)
    report("redis-restart-resume", resumed=len(outcome["failed"]), lost=len(outcome["lost"]))
    assert outcome["lost"] == [], outcome
    assert_complete(faults, [*run_ids, after])
