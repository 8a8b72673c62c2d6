"""A small app whose plugins hold secrets: ``welcome_email`` has a config model
with a secret-named field and a ``SecretStr`` field, ``webhook`` has none (its
secret-looking keys are secrets by name). Settings come from ``PH_CONF`` (see
tests/harness/conf.py); the CLI tests run ``pluginhost --app tests.apps.secrets_app:app``.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from pydantic import BaseModel, SecretStr

from pluginhost import CapabilityContext, PluginHost
from tests.harness import conf_from_env

app = Celery("secrets")
app.conf.update(conf_from_env())
host = PluginHost(app)


class EmailConfig(BaseModel):
    sender: str = "noreply@example.com"
    port: int = 25
    api_key: str = "default-key"
    smtp_password: SecretStr | None = None


@host.capability("welcome_email", config_model=EmailConfig, label_en="Welcome e-mail")
def welcome_email(payload: dict[str, Any], ctx: CapabilityContext) -> dict[str, Any]:
    password = ctx.config.smtp_password
    return {"sender": ctx.config.sender, "has_password": bool(password and password.get_secret_value())}


@host.capability("webhook")
def webhook(payload: dict[str, Any], ctx: CapabilityContext) -> dict[str, Any]:
    return {"url": ctx.config.get("url")}
