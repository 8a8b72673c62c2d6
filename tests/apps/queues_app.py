"""The app of test_workflows_queues.py: workflow steps whose capabilities are
routed to a queue of their own, ``<task_default_queue>-heavy``.

``heavy`` is sent there by its ``queue=`` task option, ``routed`` by the app's
``task_routes`` (matched on the capability task's name); the ``light_*``
capabilities stay on the default queue. Each returns the worker it ran on.

The app is built by :func:`make` from a test's settings, because the heavy
queue's name is per test and a task option is fixed when the capability is
declared. A worker loading this module builds it from ``PH_CONF``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from celery import Celery, current_task

from pluginhost import PluginHost
from tests.harness import PH_CONF_ENV, conf_from_env, register_transport_for
from workflows import Parallel, Step, Workflow, WorkflowCapability, Workflows

#: light_a, then heavy beside light_b (a chord), then routed, then light_c.
FLOW = Workflow(
    "heavy_flow",
    steps=[
        Step("light_a"),
        Parallel(Step("heavy"), Step("light_b")),
        Step("routed"),
        Step("light_c"),
    ],
)
#: A heavy first step, for a run sent by WorkflowCapability.dispatch (its first stage carries a gate).
HEAVY_FIRST = Workflow("heavy_first", steps=[Step("heavy"), Step("light_c")])
#: One step of ``slow``, a capability with a 0.5 s soft time limit.
SLOW = Workflow("slow_flow", steps=[Step("slow")])


def heavy_queue(conf: dict[str, Any]) -> str:
    return f"{conf.get('task_default_queue', 'celery')}-heavy"


def conf_for(conf: dict[str, Any]) -> dict[str, Any]:
    """A test's settings plus the route of ``routed`` to the heavy queue."""
    return {**conf, "task_routes": {"pluginhost.capability.routed": {"queue": heavy_queue(conf)}}}


@dataclass
class QueuesApp:
    app: Celery
    host: PluginHost
    flows: Workflows
    heavy_queue: str


def _ran_on(slug: str) -> Any:
    def fn(ctx: dict[str, Any]) -> dict[str, Any]:
        return {f"{slug}_on": current_task.request.hostname}

    fn.__name__ = slug
    return fn


def _slow(ctx: dict[str, Any]) -> dict[str, Any]:
    time.sleep(float(ctx.get("sleep_s", 0)))
    return {"slow_on": current_task.request.hostname}


def make(conf: dict[str, Any]) -> QueuesApp:
    register_transport_for(conf)
    app = Celery("queues", set_as_current=False)
    app.conf.update(conf)
    host = PluginHost(app)
    flows = Workflows(host)  # before the capabilities, as an app module may do
    heavy = heavy_queue(conf)
    for slug in ("light_a", "light_b", "light_c", "routed"):
        host.register_capability(slug, _ran_on(slug))
    host.register_capability("heavy", _ran_on("heavy"), queue=heavy)
    host.register_capability("slow", _slow, soft_time_limit=0.5)
    host.register_capability("run_heavy_first", WorkflowCapability(host, "heavy_first"))
    flows.declare(FLOW)
    flows.declare(HEAVY_FIRST)
    flows.declare(SLOW)
    return QueuesApp(app, host, flows, heavy)


if os.environ.get(PH_CONF_ENV):  # a worker: ``celery -A tests.apps.queues_app``
    _built = make(conf_from_env())
    app, host, flows = _built.app, _built.host, _built.flows
