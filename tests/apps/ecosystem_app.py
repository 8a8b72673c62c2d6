"""The app behind the README's "Celery ecosystem" section: capabilities as celery
beat, a chord and ``celery inspect`` see them. Configured from ``PH_CONF``.

Each body that runs creates one file in ``$ECO_RUNS`` (named after its slug), so
a test counts executions without trusting results.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

from celery import Celery

from pluginhost import CapabilityContext, PluginHost
from tests.harness import conf_from_env

app = Celery("ecosystem")
app.conf.update(conf_from_env())
app.conf.pluginhost_defer_interval = 0.2
host = PluginHost(app)


def ran(slug: str) -> None:
    folder = os.environ.get("ECO_RUNS")
    if folder:
        (Path(folder) / f"{slug}-{uuid.uuid4().hex}").touch()


def send_report(payload: dict[str, Any], ctx: CapabilityContext) -> dict[str, Any]:
    ran(ctx.task.name.rsplit(".", 1)[-1])
    return {"report": "sent"}


# As the README shows: the same function twice on one plugin, `fail` for callers
# and `skip` for celery beat.
host.register_capability("report", send_report)
host.register_capability("report_tick", send_report, plugin="report", on_disabled="skip")


@host.capability("feed", on_disabled="defer")
def feed(payload: dict[str, Any]) -> dict[str, Any]:
    ran("feed")
    return {"feed": "pulled"}


@host.capability("count")
def count(payload: dict[str, Any]) -> dict[str, Any]:
    return {"n": payload.get("n", 0)}


@host.capability("total")
def total(payload: dict[str, Any]) -> dict[str, Any]:
    return {"total": sum(result["n"] for result in payload["results"])}


@app.task(name="ecosystem.collect")
def collect(results: list[Any]) -> dict[str, Any]:
    """A chord callback that hands a capability a JSON object."""
    return {"results": results}


TICK_S = 0.3
app.conf.beat_schedule = {
    "report": {"task": "pluginhost.capability.report", "schedule": TICK_S, "args": [{}]},
    "report-tick": {"task": "pluginhost.capability.report_tick", "schedule": TICK_S, "args": [{}]},
    "feed": {"task": "pluginhost.capability.feed", "schedule": TICK_S, "args": [{}]},
}
