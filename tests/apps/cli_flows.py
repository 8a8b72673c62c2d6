"""A pluginhost app with a few capabilities, for the ``pluginhost workflows`` CLI tests.

Workers and CLI subprocesses get its settings from ``PH_CONF``
(:func:`tests.harness.conf_from_env`); the test process points it at each test's
settings itself.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from pluginhost import CapabilityContext, PluginHost
from tests.harness import conf_from_env
from workflows import Workflows

app = Celery("cli_flows")
app.conf.update(conf_from_env())
host = PluginHost(app)
flows = Workflows(host)  # registers the workflow tasks on workers


@host.capability("greet")
def greet(payload: dict[str, Any]) -> dict[str, Any]:
    return {"greeting": f"hello {payload.get('name', 'nobody')}"}


@host.capability("mail", on_disabled="skip")
def mail(payload: dict[str, Any]) -> dict[str, Any]:
    return {"mailed": payload["greeting"]}


@host.capability("provision")
def provision(payload: dict[str, Any]) -> dict[str, Any]:
    return {"workspace": f"ws-{payload.get('name', 'nobody')}"}


@host.capability("flaky")
def flaky(payload: dict[str, Any], ctx: CapabilityContext) -> dict[str, Any]:
    """Fails while its plugin's config says ``{"fail": true}``."""
    if ctx.config.get("fail"):
        raise RuntimeError("flaky is configured to fail")
    return {"flaky": "ok"}
