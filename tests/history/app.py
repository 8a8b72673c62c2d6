"""The Celery app of the history test: its workers, producers and admins load it.

Three toggled plugins (:data:`PLUGINS`), each with a capability the producers
dispatch (:data:`JOBS`), and a workflow ``hist`` whose steps belong to the same
plugins::

    wf_prep (alpha) -> [ wf_left (beta) | wf_right (gamma, step policy fail) ] -> wf_done (alpha)

``wf_right``'s capability is declared ``on_disabled="skip"`` while its step's
policy is ``fail``: the runtime must decide from one snapshot under the step's
policy (a step recorded ``succeeded`` whose body never ran is a G4 violation).

The first statement of every capability body records ``body_start`` (capability,
plugin, worker hostname, pid, task id, and the dispatch ``op`` or workflow ``tag``
from the payload); ``body_end`` is recorded when the body returns. A task a worker
refuses with ``CapabilityDisabled`` records ``worker_refused`` (from Celery's
``task_failure`` signal), so the run shows the worker-side check at work.

Configured from ``PH_CONF`` (tests/harness/conf.py); the event log from
``PH_HISTORY_DIR``/``PH_HISTORY_PROC``; the worker's hostname from
``PH_HISTORY_HOSTNAME`` (the orchestrator names each worker).
"""

from __future__ import annotations

import os
import random
import time
from typing import Any

from celery import Celery, current_task, signals

from pluginhost import CapabilityDisabled, PluginHost
from tests.harness import conf_from_env
from tests.history.events import EventLog
from workflows import Parallel, Step, Workflow, Workflows

app = Celery("history")
app.conf.update(conf_from_env())
host = PluginHost(app)
flows = Workflows(host)
log = EventLog.from_env()

HOSTNAME_ENV = "PH_HISTORY_HOSTNAME"
HOSTNAME = os.environ.get(HOSTNAME_ENV, "")

PLUGINS = ("alpha", "beta", "gamma")
#: Capabilities the producers dispatch: slug -> plugin.
JOBS = {"alpha_job": "alpha", "beta_job": "beta", "gamma_job": "gamma"}
#: Workflow step capabilities: slug -> plugin.
STEPS = {"wf_prep": "alpha", "wf_left": "beta", "wf_right": "gamma", "wf_done": "alpha"}
#: Every capability of the app: slug -> plugin.
CAPABILITIES = {**JOBS, **STEPS}

WORKFLOW = "hist"
HIST = Workflow(
    WORKFLOW,
    steps=[
        Step("wf_prep"),
        Parallel(Step("wf_left"), Step("wf_right", on_disabled="fail")),
        Step("wf_done"),
    ],
)


def _fields(slug: str, payload: dict[str, Any]) -> dict[str, Any]:
    request = getattr(current_task, "request", None)
    return {
        "slug": slug,
        "plugin": CAPABILITIES[slug],
        "hostname": HOSTNAME,
        "task_id": getattr(request, "id", None),
        "op": payload.get("op"),
        "tag": payload.get("tag"),
    }


def _declare(slug: str, pause_ms: tuple[float, float], **options: Any) -> None:
    low, high = pause_ms

    def body(payload: dict[str, Any]) -> dict[str, Any]:
        log.emit("body_start", **_fields(slug, payload))  # the first statement of the body
        time.sleep(random.uniform(low, high) / 1000)
        log.emit("body_end", **_fields(slug, payload))
        return {slug: payload.get("tag") or payload.get("op")}

    body.__name__ = slug
    host.register_capability(slug, body, plugin=CAPABILITIES[slug], **options)


for _slug in JOBS:
    _declare(_slug, (2.0, 15.0))
for _slug in STEPS:
    _declare(_slug, (40.0, 120.0), **({"on_disabled": "skip"} if _slug == "wf_right" else {}))


@signals.task_failure.connect(weak=False)
def _refused(sender: Any = None, task_id: str | None = None, exception: BaseException | None = None, **_: Any) -> None:
    if isinstance(exception, CapabilityDisabled):
        name = getattr(sender, "name", "")
        log.emit("worker_refused", task=name, task_id=task_id, hostname=HOSTNAME)


@signals.worker_ready.connect(weak=False)
def _ready(sender: Any = None, **_: Any) -> None:
    log.emit("worker_ready", hostname=HOSTNAME)


@signals.worker_process_init.connect(weak=False)
def _child(**_: Any) -> None:
    log.emit("pool_process_start", hostname=HOSTNAME)
