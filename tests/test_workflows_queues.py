"""A workflow step runs where and how its capability would run on its own: on the
capability's queue (its ``queue=`` option or the app's ``task_routes`` for its
task name), with its rate limit, time limits and priority; the history, the
live check and the policies are those of any step.

The queue claims run on real workers against real brokers (Redis and RabbitMQ,
store on PostgreSQL); the task options are checked in process, where the step
messages go through kombu's in-memory transport.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kombu
import pytest
from celery import Celery, signals
from celery.exceptions import SoftTimeLimitExceeded

from pluginhost import PluginHost
from tests import harness
from tests.apps import queues_app
from workflows import Step, Workflow, Workflows

# Celery 5.7 deprecates the ``queue`` and ``priority`` task options (for task_routes);
# they still apply, and capabilities declared with them keep them in workflows.
pytestmark = pytest.mark.filterwarnings("ignore:\\s*The '(queue|priority)' task attribute is deprecated")
BROKERS = pytest.mark.parametrize("backend", ["redis", "amqp"], indirect=True)


@pytest.fixture
def conf(app_conf: dict[str, Any]) -> dict[str, Any]:
    return queues_app.conf_for(app_conf)


@pytest.fixture
def qapp(conf: dict[str, Any]) -> Iterator[queues_app.QueuesApp]:
    """tests.apps.queues_app built for this test (in this process: the producer)."""
    built = queues_app.make(conf)
    built.host.with_store(conf["pluginhost_store"])
    built.host.sync()
    yield built
    built.host.store.close()
    harness.reset_app(built.app)
    harness.delete_broker_objects(conf, [built.heavy_queue])


def _queued_tasks(app: Celery, queue: str) -> list[str]:
    """The task names of the messages waiting in ``queue`` (all put back unacknowledged)."""
    names: list[str] = []
    with app.connection_for_write() as conn:
        bound = kombu.Queue(queue, no_declare=True).bind(conn.default_channel)
        held = []
        while (message := bound.get(no_ack=False)) is not None:
            held.append(message)
            names.append(str(message.headers["task"]))
        for message in held:
            message.requeue()
    return names


def _statuses(flows: Workflows, run_id: str) -> dict[str, str]:
    run = flows.run(run_id)
    assert run is not None
    return {s.slug: s.status for s in run.steps}


@BROKERS
def test_a_step_routed_to_heavy_runs_only_on_a_worker_consuming_heavy(
    qapp: queues_app.QueuesApp, workers: Any, conf: dict[str, Any]
) -> None:
    """With only a worker of the default queue, the light steps run and the heavy
    ones (routed by ``queue=`` in a chord, by ``task_routes`` in the chain, and a
    first step sent without a capability task) wait in the heavy queue, pending; a
    worker consuming the heavy queue runs them, and only it does."""
    flows, host = qapp.flows, qapp.host
    workers("tests.apps.queues_app", conf=conf, pool="prefork", name="light")
    res = flows.start("heavy_flow", {"tag": "q"})
    first = host.run_capability("run_heavy_first", {"tag": "gated"})
    harness.wait_until(
        lambda: _statuses(flows, res.id)["light_b"] == "succeeded", 30, what="the light branch of the chord"
    )
    time.sleep(1.0)  # time enough for the light worker to take the heavy steps, if it would
    assert _statuses(flows, res.id) == {
        "light_a": "succeeded",
        "heavy": "pending",
        "light_b": "succeeded",
        "routed": "pending",
        "light_c": "pending",
    }
    assert _statuses(flows, first.id) == {"heavy": "pending", "light_c": "pending"}
    assert sorted(_queued_tasks(qapp.app, qapp.heavy_queue)) == ["workflows.step.heavy", "workflows.step.heavy"]

    workers("tests.apps.queues_app", conf=conf, pool="solo", name="heavy", queues=[qapp.heavy_queue])
    out = res.get(timeout=60)
    assert out["light_a_on"].startswith("light@") and out["light_b_on"].startswith("light@")
    assert out["heavy_on"].startswith("heavy@") and out["routed_on"].startswith("heavy@")
    assert out["light_c_on"].startswith("light@")
    gated = first.get(timeout=60)
    assert gated["heavy_on"].startswith("heavy@") and gated["light_c_on"].startswith("light@")
    for run_id in (res.id, first.id):
        run = flows.run(run_id)
        assert run is not None and run.status == "succeeded"
        assert all(s.status == "succeeded" and s.attempts == 1 and s.plugin_version == 1 for s in run.steps)


@BROKERS
def test_a_heavy_step_disabled_while_it_waits_in_its_queue_is_skipped(
    qapp: queues_app.QueuesApp, workers: Any, conf: dict[str, Any]
) -> None:
    """The live check applies on the heavy queue's worker: a step queued there
    while its plugin was enabled is skipped (its policy) once disabled, and the
    next heavy step, routed by ``task_routes``, runs there."""
    flows, host = qapp.flows, qapp.host
    workers("tests.apps.queues_app", conf=conf, pool="solo", name="light")
    res = flows.start("heavy_flow", {"tag": "off"})
    harness.wait_until(lambda: _statuses(flows, res.id)["light_b"] == "succeeded", 30, what="the light branch")
    host.disable("heavy")
    workers("tests.apps.queues_app", conf=conf, pool="prefork", name="heavy", queues=[qapp.heavy_queue])
    out = res.get(timeout=60)
    assert "heavy_on" not in out and out["routed_on"].startswith("heavy@")
    run = flows.run(res.id)
    assert run is not None and run.status == "succeeded"
    steps = {s.slug: s for s in run.steps}
    assert steps["heavy"].status == "skipped" and steps["heavy"].error == "plugin 'heavy' is disabled"
    assert [steps[s].status for s in ("light_a", "light_b", "routed", "light_c")] == ["succeeded"] * 4


@pytest.mark.parametrize("backend", ["redis"], indirect=True)
def test_a_capabilitys_soft_time_limit_stops_its_step_as_it_stops_its_own_runs(
    qapp: queues_app.QueuesApp, workers: Any, conf: dict[str, Any]
) -> None:
    """``slow`` has a 0.5 s soft time limit: its run on its own and its workflow
    step, each sleeping 3 s, both end with SoftTimeLimitExceeded; the step's run
    fails and records it."""
    workers("tests.apps.queues_app", conf=conf, pool="prefork", name="light")
    own = qapp.host.run_capability("slow", {"sleep_s": 3})
    step = qapp.flows.start("slow_flow", {"sleep_s": 3})
    for res in (own, step):
        with pytest.raises(SoftTimeLimitExceeded):
            res.get(timeout=30)
    run = harness.wait_finished(qapp.flows, step.id)
    assert run.status == "failed" and "SoftTimeLimitExceeded" in (run.error or "")
    assert [(s.slug, s.status, s.attempts) for s in run.steps] == [("slow", "failed", 1)]


@pytest.mark.parametrize("backend", ["redis"], indirect=True)
def test_a_step_message_of_the_previous_version_still_runs(
    qapp: queues_app.QueuesApp, workers: Any, conf: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rolling upgrade: steps queued as ``workflows.step`` messages (the name
    every step had before steps got their capability's task options) still run."""
    rt = qapp.flows.runtime
    monkeypatch.setattr(rt, "step_task_for", lambda slug: None)  # the producer compiles as before
    res = qapp.flows.start("heavy_flow", {"tag": "old"})
    assert _queued_tasks(qapp.app, conf["task_default_queue"]) == ["workflows.step"]
    workers("tests.apps.queues_app", conf=conf, pool="solo", name="light")
    out = res.get(timeout=60)
    assert out["heavy_on"].startswith("light@")  # inline in the generic step task, as before
    assert set(_statuses(qapp.flows, res.id).values()) == {"succeeded"}


# -- task options, in process ------------------------------------------------------


@pytest.fixture
def memory_app(tmp_path: Path) -> Iterator[Celery]:
    app = Celery("options", set_as_current=False, broker="memory://", backend="cache+memory://")
    app.conf.update(pluginhost_store=f"sqlite:///{tmp_path / 'store.db'}", task_default_queue="default")
    yield app
    harness.reset_app(app)


def test_a_capabilitys_task_options_reach_its_step_task(memory_app: Celery) -> None:
    app = memory_app
    app.conf.task_routes = {"pluginhost.capability.routed": {"queue": "heavy", "priority": 3}}
    host = PluginHost(app)
    flows = Workflows(host)
    host.register_capability(
        "limited",
        lambda ctx: None,
        queue="heavy",
        rate_limit="10/m",
        time_limit=30,
        soft_time_limit=20,
        priority=7,
    )
    host.register_capability("routed", lambda ctx: None)
    host.register_capability("plain", lambda ctx: None)
    host.sync()
    flows.define(Workflow("opts", steps=[Step("limited"), Step("routed", timeout=5), Step("plain")]))
    published: list[dict[str, Any]] = []

    def seen(sender: str, headers: dict[str, Any], routing_key: str, properties: dict[str, Any], **_: Any) -> None:
        published.append({"task": sender, "queue": routing_key, "priority": properties.get("priority"), **headers})

    signals.before_task_publish.connect(seen, weak=False)
    try:
        _, canvas = flows.prepare("opts", {})
        canvas.apply_async()  # the producer sends the first link
        steps = list(canvas.tasks)
        # and a worker the next ones, with the previous step's context and priority=None
        for sig in steps:
            sig.apply_async(() if sig is steps[0] else ({},), priority=None)
    finally:
        signals.before_task_publish.disconnect(seen)

    limited = app.tasks["workflows.step.limited"]
    assert (limited.rate_limit, limited.time_limit, limited.soft_time_limit) == ("10/m", 30, 20)
    assert [s.task for s in steps] == ["workflows.step.limited", "workflows.step.routed", "workflows.step.plain"]
    assert "slug" not in steps[1].kwargs  # the task names the capability: the message need not
    sent = {(p["task"], p["queue"], p["priority"], tuple(p["timelimit"])) for p in published}
    assert sent == {
        ("workflows.step.limited", "heavy", 7, (30, 20)),
        ("workflows.step.routed", "heavy", 3, (None, 5)),  # Step(timeout=) is the soft limit
        ("workflows.step.plain", "default", None, (None, None)),
    }
    assert app.tasks["workflows.step"].name == "workflows.step"  # messages of the previous version
