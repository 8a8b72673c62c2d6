"""A worker app for green pools (gevent): a capability that dispatches another from
inside its task, so every task runs the producer-side store check in its own greenlet."""

from __future__ import annotations

from typing import Any

from celery import Celery

from pluginhost import PluginHost
from tests.harness import conf_from_env

app = Celery("green")
app.conf.update(conf_from_env())
host = PluginHost(app)


@host.capability("leaf")
def leaf(payload: dict[str, Any]) -> dict[str, Any]:
    return payload


@host.capability("relay")
def relay(payload: dict[str, Any]) -> str:
    return host.run_capability("leaf", payload).id
