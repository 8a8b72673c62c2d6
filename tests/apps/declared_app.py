"""An app module written as the README shows it: capabilities and a workflow
declared at import, so it imports (and a worker starts) before its database exists."""

from __future__ import annotations

from typing import Any

from celery import Celery

from pluginhost import PluginHost
from tests.harness import conf_from_env
from workflows import Step, Workflow, WorkflowCapability, Workflows

app = Celery("declared")
app.conf.update(conf_from_env())
host = PluginHost(app)
flows = Workflows(host)


@host.capability("hello")
def hello(payload: dict[str, Any]) -> dict[str, Any]:
    return {"greeting": f"hello {payload.get('name', 'you')}"}


flows.declare(Workflow("greeting", steps=[Step("hello")]))
host.register_capability("greet_flow", WorkflowCapability(host, "greeting"))
