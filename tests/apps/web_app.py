"""The app behind the web console tests: a few capabilities (one with a secret in
its config, one that fails on demand) and a workflow, also exposed as a capability
with an input model, configured from ``PH_CONF`` (see tests/harness/conf.py)."""

from __future__ import annotations

from typing import Any, Literal

from celery import Celery
from pydantic import BaseModel

from pluginhost import CapabilityContext, PluginHost
from tests.harness import conf_from_env
from workflows import Parallel, Step, Workflow, WorkflowCapability, Workflows

app = Celery("web_app")
app.conf.update(conf_from_env())
host = PluginHost(app)
flows = Workflows(host)  # registers the workflow tasks on workers


class MailerConfig(BaseModel):
    smtp_host: str = "mail.example.com"
    smtp_port: int = 25
    smtp_password: str = "hunter2"


#: The greet plugin's row; the workflow capability below shares the plugin, so the same seed.
GREET_SEED: dict[str, Any] = {"label_en": "Greeting", "label_ar": "تحية", "sort": 10}


@host.capability("greet", **GREET_SEED)
def greet(payload: dict[str, Any]) -> dict[str, Any]:
    return {"greeting": f"hello {payload.get('name', 'nobody')}"}


@host.capability("mailer", config_model=MailerConfig, label_en="Mailer", label_ar="البريد", sort=20)
def mailer(payload: dict[str, Any], ctx: CapabilityContext) -> dict[str, Any]:
    return {"mailed_via": ctx.config.smtp_host}


@host.capability("report", label_en="Report", label_ar="تقرير", sort=30)
def report(payload: dict[str, Any]) -> dict[str, Any]:
    return {"reported": True}


@host.capability("flaky", label_en="Flaky step", label_ar="خطوة متقلبة", sort=40)
def flaky(payload: dict[str, Any], ctx: CapabilityContext) -> dict[str, Any]:
    """Fails while its plugin's config says ``{"fail": true}``."""
    if ctx.config.get("fail"):
        raise RuntimeError("flaky is configured to fail")
    return {"flaky": "ok"}


WELCOME = Workflow(
    "welcome",
    steps=[
        Step("greet"),
        Parallel(Step("mailer"), Step("report", on_disabled="skip")),
        Step("flaky", on_disabled="fail"),
    ],
)


class WelcomeInput(BaseModel):
    """What a welcome run starts from (the console builds its start form from this)."""

    name: str
    age: int | None = None
    score: float | None = None
    plan: Literal["free", "pro"] = "free"
    newsletter: bool = False
    tags: list[str] = []


# On the greet plugin: the console's plugin tables stay the four above.
host.register_capability(
    "welcome_run", WorkflowCapability(host, "welcome"), plugin="greet", input_model=WelcomeInput, **GREET_SEED
)
