"""A user-onboarding service on pluginhost.

Six capabilities write real rows into the store database (no network), composed
into the ``onboarding`` workflow:

    create_account -> welcome_email
      -> wait for the signal "email_verified" (at most 3 days)
      -> send_reminder        only if the wait timed out
      -> provision_workspace  only on the pro plan
      -> sleep 1 day -> send_tips -> notify_crm

The waits hold no worker and no broker message: a run that waits is a row in
the store. ``flows.signal_by_key("onboarding", key=email, name="email_verified")``
(the workflow's key is the input's ``email``) sends a verified run on. The two
durations come from ``ONBOARDING_VERIFY_TIMEOUT`` and ``ONBOARDING_TIPS_AFTER``
(``"3d"`` and ``"1d"`` unless set; the README demo uses seconds).

Configuration comes from the environment; without any, everything runs on the
embedded default under ``$PLUGINHOST_DATA`` (default ``.pluginhost``):

    PLUGINHOST_BROKER_URL      e.g. redis://127.0.0.1:6379/0 or amqp://guest:guest@127.0.0.1//
    PLUGINHOST_RESULT_BACKEND  e.g. redis://127.0.0.1:6379/0
    PLUGINHOST_STORE           e.g. postgresql+psycopg://postgres@127.0.0.1/app

Start a worker with ``celery -A examples.onboarding.app worker``.
"""

from __future__ import annotations

import os
import time
from datetime import datetime, timezone
from typing import Any, Literal

from celery import Celery
from pydantic import BaseModel, Field
from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    insert,
    select,
)

from pluginhost import CapabilityContext, PluginHost
from pluginhost.embedded import embedded_conf
from workflows import Sleep, Step, WaitFor, Workflow, WorkflowCapability, Workflows

app = Celery("onboarding")
if os.environ.get("PLUGINHOST_BROKER_URL"):
    app.conf.update(
        broker_url=os.environ["PLUGINHOST_BROKER_URL"],
        result_backend=os.environ.get("PLUGINHOST_RESULT_BACKEND", "redis://127.0.0.1:6379/0"),
        pluginhost_store=os.environ.get("PLUGINHOST_STORE", "sqlite:///pluginhost.db"),
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
    )
else:
    app.conf.update(embedded_conf(os.environ.get("PLUGINHOST_DATA", ".pluginhost")))
app.conf.task_default_queue = os.environ.get("PLUGINHOST_QUEUE", "onboarding")

host = PluginHost(app)
flows = Workflows(host)

# Each step sleeps a little (ONBOARDING_STEP_DELAY seconds, default 0.2) so that
# a demo can toggle a step while runs are in flight.
DELAY_S = float(os.environ.get("ONBOARDING_STEP_DELAY", "0.2"))
VERIFY_TIMEOUT = os.environ.get("ONBOARDING_VERIFY_TIMEOUT", "3d")
TIPS_AFTER = os.environ.get("ONBOARDING_TIPS_AFTER", "1d")

meta = MetaData()
accounts = Table(
    "onboarding_accounts",
    meta,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("email", String(320), nullable=False),
    Column("name", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)
outbox = Table(
    "onboarding_outbox",
    meta,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("account_id", Integer, nullable=False),
    Column("to_addr", String(320), nullable=False),
    Column("subject", Text, nullable=False),
    Column("body", Text, nullable=False),
)
workspaces = Table(
    "onboarding_workspaces",
    meta,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("account_id", Integer, nullable=False),
    Column("slug", String(128), nullable=False),
    Column("plan", String(32), nullable=False),
)
crm_events = Table(
    "onboarding_crm_events",
    meta,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("account_id", Integer, nullable=False),
    Column("event", String(64), nullable=False),
    Column("payload", JSON, nullable=False),
)
_tables_ready: set[int] = set()


def _engine() -> Any:
    engine = host.store.engine  # type: ignore[attr-defined]
    if id(engine) not in _tables_ready:
        # pluginhost_write: take SQLite's write lock up front (BEGIN IMMEDIATE),
        # so worker processes creating the tables at once wait instead of failing
        with engine.connect() as conn:
            meta.create_all(conn.execution_options(pluginhost_write=True))
            conn.commit()
        _tables_ready.add(id(engine))
    return engine


class NewUser(BaseModel):
    email: str = Field(pattern=r"^[^@\s]+@[^@\s]+$")
    name: str = "friend"
    plan: Literal["free", "pro"] = "free"


class EmailConfig(BaseModel):
    sender: str = "welcome@example.com"
    subject: str = "Welcome aboard"


class WorkspaceConfig(BaseModel):
    region: str = "eu-west"


@host.capability("create_account", input_model=NewUser, sort=10, label_en="Create account", label_ar="إنشاء حساب")
def create_account(user: NewUser) -> dict[str, Any]:
    time.sleep(DELAY_S)
    with _engine().begin() as conn:
        account_id = conn.execute(
            insert(accounts).values(email=user.email, name=user.name, created_at=datetime.now(timezone.utc))
        ).inserted_primary_key[0]
    return {"account_id": account_id, "email": user.email, "name": user.name, "plan": user.plan}


@host.capability("welcome_email", config_model=EmailConfig, sort=20, label_en="Welcome e-mail", label_ar="بريد الترحيب")
def welcome_email(ctx_in: dict[str, Any], ctx: CapabilityContext) -> dict[str, Any]:
    time.sleep(DELAY_S)
    with _engine().begin() as conn:
        conn.execute(
            insert(outbox).values(
                account_id=ctx_in["account_id"],
                to_addr=ctx_in["email"],
                subject=ctx.config.subject,
                body=f"Hello {ctx_in.get('name', 'friend')}, from {ctx.config.sender}",
            )
        )
    return {"welcome_sent": True}


def _mail(account_id: int, to: str, subject: str, body: str) -> None:
    with _engine().begin() as conn:
        conn.execute(insert(outbox).values(account_id=account_id, to_addr=to, subject=subject, body=body))


@host.capability("send_reminder", sort=25, label_en="Verification reminder", label_ar="تذكير بالتحقق")
def send_reminder(ctx_in: dict[str, Any]) -> dict[str, Any]:
    time.sleep(DELAY_S)
    _mail(ctx_in["account_id"], ctx_in["email"], "Please verify your address", "One click and you are in.")
    return {"reminder_sent": True}


@host.capability(
    "provision_workspace",
    config_model=WorkspaceConfig,
    sort=30,
    label_en="Provision workspace",
    label_ar="تجهيز مساحة العمل",
)
def provision_workspace(ctx_in: dict[str, Any], ctx: CapabilityContext) -> dict[str, Any]:
    time.sleep(DELAY_S)
    slug = f"ws-{ctx_in['account_id']}-{ctx.config.region}"
    with _engine().begin() as conn:
        conn.execute(insert(workspaces).values(account_id=ctx_in["account_id"], slug=slug, plan=ctx_in["plan"]))
    return {"workspace": slug}


@host.capability("send_tips", sort=35, label_en="Tips e-mail", label_ar="بريد النصائح")
def send_tips(ctx_in: dict[str, Any]) -> dict[str, Any]:
    time.sleep(DELAY_S)
    _mail(ctx_in["account_id"], ctx_in["email"], "Three tips for your first week", "1. Invite your team ...")
    return {"tips_sent": True}


@host.capability("notify_crm", sort=40, label_en="Notify CRM", label_ar="إبلاغ نظام العملاء")
def notify_crm(ctx_in: dict[str, Any]) -> dict[str, Any]:
    time.sleep(DELAY_S)
    with _engine().begin() as conn:
        conn.execute(
            insert(crm_events).values(
                account_id=ctx_in["account_id"],
                event="signed_up",
                payload={"email": ctx_in["email"], "workspace": ctx_in.get("workspace")},
            )
        )
    return {"crm_notified": True}


ONBOARDING = Workflow(
    "onboarding",
    key="email",
    steps=[
        Step("create_account", on_disabled="fail"),
        Step("welcome_email"),
        WaitFor("email_verified", timeout=VERIFY_TIMEOUT, on_timeout="continue"),
        Step("send_reminder", when="signals.email_verified == 'timed_out'"),
        Step("provision_workspace", when="plan == 'pro'"),
        Sleep(TIPS_AFTER, name="tips_delay"),
        Step("send_tips"),
        Step("notify_crm", on_disabled="skip", retries=2, retry_backoff=0.2),
    ],
)

host.register_capability(
    "onboard", WorkflowCapability(host, "onboarding"), label_en="Onboard a user", label_ar="تهيئة مستخدم جديد", sort=0
)


def rows(table: Table) -> list[dict[str, Any]]:
    """Every row of one of the example's tables (for demos and tests)."""
    with _engine().connect() as conn:
        return [dict(r._mapping) for r in conn.execute(select(table))]
