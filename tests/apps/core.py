"""The app the integration tests' workers load: pluginhost capabilities and a
workflow, configured from ``PH_CONF`` (see tests/harness/conf.py).

Every capability run that reaches its function records one row in
``test_executions`` (in the store database), so tests count executions in the
store rather than trusting results. A row's ``at`` is when the worker began
handling that delivery (``task_prerun``, before pluginhost's check), not when
the row was written: the write waits for a connection (tens of milliseconds in a
newly forked child), and a row stamped then looks like a run that started after
a ``disable()`` whose acknowledgement it preceded.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

from celery import Celery, current_task, signals
from pydantic import BaseModel
from sqlalchemy import Column, Float, Integer, MetaData, String, Table, func, insert, select

from pluginhost import CapabilityContext, PluginHost
from tests.harness import conf_from_env
from workflows import Parallel, Sleep, Step, WaitFor, Workflow, WorkflowCapability, Workflows

app = Celery("core")
app.conf.update(conf_from_env())
host = PluginHost(app)
flows = Workflows(host)

meta = MetaData()
executions = Table(
    "test_executions",
    meta,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("slug", String(64), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("host", String(200), nullable=False),
    Column("tag", String(200), nullable=True),
    Column("at", Float, nullable=False),
)
_tables_ready: set[int] = set()


def _engine() -> Any:
    engine = host.store.engine  # type: ignore[attr-defined]
    if id(engine) not in _tables_ready:
        # pluginhost_write: take SQLite's write lock up front (BEGIN IMMEDIATE), and
        # on PostgreSQL a transaction lock, so processes creating the tables at once
        # wait instead of failing (CREATE TABLE IF NOT EXISTS races on PostgreSQL)
        with engine.connect() as conn:
            conn = conn.execution_options(pluginhost_write=True)
            if engine.dialect.name == "postgresql":
                conn.exec_driver_sql("SELECT pg_advisory_xact_lock(7311)")
            meta.create_all(conn)
            conn.commit()
        _tables_ready.add(id(engine))
    return engine


@signals.task_prerun.connect
def _stamp_start(task: Any = None, **_: Any) -> None:
    if task is not None:
        task.request.test_started_at = time.time()


def record(slug: str, tag: Any = None) -> None:
    request = current_task.request if current_task else None
    at = getattr(request, "test_started_at", None) or time.time()
    with _engine().begin() as conn:
        conn.execute(
            insert(executions).values(
                slug=slug,
                pid=os.getpid(),
                host=socket.gethostname(),
                tag=None if tag is None else str(tag),
                at=at,
            )
        )


def executions_of(slug: str, tag: Any = None) -> int:
    with _engine().connect() as conn:
        q = select(func.count()).select_from(executions).where(executions.c.slug == slug)
        if tag is not None:
            q = q.where(executions.c.tag == str(tag))
        return int(conn.execute(q).scalar_one())


def execution_rows(slug: str) -> list[dict[str, Any]]:
    with _engine().connect() as conn:
        return [dict(r._mapping) for r in conn.execute(select(executions).where(executions.c.slug == slug))]


class Settings(BaseModel):
    colour: str = "blue"
    level: int = 1


class Named(BaseModel):
    name: str


@host.capability("work", config_model=Settings, label_en="Work", label_ar="عمل")
def work(payload: dict[str, Any], ctx: CapabilityContext) -> dict[str, Any]:
    record("work", payload.get("tag"))  # at the start: "a run started" is what tests count
    time.sleep(float(payload.get("sleep", 0)))
    return {"pid": os.getpid(), "config": ctx.config.model_dump(), "plugin_version": ctx.plugin.version}


@host.capability("pure")
def pure(payload: dict[str, Any]) -> dict[str, Any]:
    """Touches no database: runs even while the store is unreachable."""
    return {"pid": os.getpid(), "echo": payload}


@host.capability("named", input_model=Named)
def named(payload: Named) -> str:
    record("named")
    return f"hello {payload.name}"


class Contact(BaseModel):
    name: str
    email: str


@host.capability("two_fields", plugin="named", input_model=Contact)
def two_fields(payload: Contact) -> str:
    record("two_fields")
    return payload.email


@host.capability("skipper", on_disabled="skip")
def skipper(payload: dict[str, Any]) -> str:
    record("skipper", payload.get("tag"))
    return "ran"


@host.capability("deferrer", on_disabled="defer")
def deferrer(payload: dict[str, Any]) -> str:
    record("deferrer", payload.get("tag"))
    return "ran"


@host.capability("failing", autoretry_for=(RuntimeError,), max_retries=2, default_retry_delay=0.05)
def failing(payload: dict[str, Any]) -> str:
    record("failing", payload.get("tag"))
    raise RuntimeError("always fails")


# -- workflow steps -------------------------------------------------------------


@host.capability("step_a", label_en="Step A", label_ar="الخطوة أ")
def step_a(ctx: dict[str, Any]) -> dict[str, Any]:
    time.sleep(float(ctx.get("a_sleep", 0)))
    record("step_a", ctx.get("tag"))
    return {"a": 1, "order": [*ctx.get("order", []), "a"]}


@host.capability("step_b")
def step_b(ctx: dict[str, Any]) -> dict[str, Any]:
    time.sleep(float(ctx.get("b_sleep", 0)))
    record("step_b", ctx.get("tag"))
    return {"b": 2, "shared": "b"}


@host.capability("step_c")
def step_c(ctx: dict[str, Any]) -> dict[str, Any]:
    record("step_c", ctx.get("tag"))
    return {"c": 3, "shared": "c"}


@host.capability("step_d")
def step_d(ctx: dict[str, Any]) -> dict[str, Any]:
    time.sleep(float(ctx.get("d_sleep", 0)))
    record("step_d", ctx.get("tag"))
    if ctx.get("d_fail_until", 0) > executions_of("step_d", ctx.get("tag")) - 1:
        raise ValueError("step_d is not ready yet")
    return {"d": 4, "order": [*ctx.get("order", []), "d"]}


@host.capability("step_e", config_model=Settings)
def step_e(ctx: dict[str, Any], cfg: CapabilityContext) -> dict[str, Any]:
    record("step_e", ctx.get("tag"))
    if ctx.get("e_fail") and cfg.config.level < 2:
        raise RuntimeError("step_e needs level 2")
    return {"e": cfg.config.level}


FLOW = Workflow(
    "flow",
    steps=[
        Step("step_a"),
        Parallel(Step("step_b"), Step("step_c")),
        Step("step_d", retries=1, retry_backoff=0.05),
        Step("step_e"),
    ],
)

# One stage each: their canvas is a chord, or one task, with no chain around it.
FAN = Workflow("fan", steps=[Parallel(Step("step_b"), Step("step_c"))])
SINGLE = Workflow("single", steps=[Step("step_a")])

# Waits: a sleep between two steps; a signal wait with a timeout, keyed by email.
SLEEPY = Workflow("sleepy", steps=[Step("step_a"), Sleep(2), Step("step_c", on_disabled="skip")])
VERIFY = Workflow(
    "verify",
    key="email",
    steps=[
        Step("step_a"),
        WaitFor("verified", timeout=30, on_timeout="continue"),
        Step("step_c", when="signals.verified == 'received'"),
        Step("step_d", when="signals.verified == 'timed_out'"),
    ],
)

host.register_capability("run_flow", WorkflowCapability(host, "flow"))
host.register_capability("run_fan", WorkflowCapability(host, "fan"))
host.register_capability("run_nap", WorkflowCapability(host, "nap_first"))
NAP_FIRST = Workflow("nap_first", steps=[Sleep(1), Step("step_c")])
