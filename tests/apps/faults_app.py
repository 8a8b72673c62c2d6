"""The app the fault-injection tests' workers load (tests/test_faults.py).

One workflow, ``faulty``: ``prepare -> [fetch | score] -> store`` (a chain with a
chord in the middle). Each step sleeps ``step_s`` seconds (default 0.2) and
records every execution in ``fault_executions`` (in the store database): a row
at the start, with the pool process's pid, and its finish time at the end. So a
test can tell which pool process is inside a step right now (to kill it there),
and count how often a capability function really ran.

``hold``: ``{"slug": seconds}`` in the input makes that step's *first* execution
for the run's ``tag`` sleep that long, so a test can catch it mid-step; later
executions (a redelivery, a resume) do not hold.

Configured from ``PH_CONF`` (see tests/harness/conf.py), like tests/apps/core.py.
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery
from sqlalchemy import Column, Float, Integer, MetaData, String, Table, func, insert, select, update

from pluginhost import PluginHost
from tests.harness import conf_from_env
from workflows import Parallel, Step, Workflow, Workflows

app = Celery("faults")
app.conf.update(conf_from_env())
host = PluginHost(app)
flows = Workflows(host)  # registers the workflow tasks on workers

meta = MetaData()
executions = Table(
    "fault_executions",
    meta,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("slug", String(64), nullable=False),
    Column("tag", String(200), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("started", Float, nullable=False),
    Column("finished", Float, nullable=True),
)
_tables_ready: set[int] = set()

#: The output key each step adds to the context.
OUTPUT_KEYS = {"prepare": "prepared", "fetch": "fetched", "score": "scored", "store": "stored"}

FAULTY = Workflow(
    "faulty",
    steps=[Step("prepare"), Parallel(Step("fetch"), Step("score")), Step("store")],
)


def engine() -> Any:
    """The store's engine, with ``fault_executions`` created on first use."""
    eng = host.store.engine  # type: ignore[attr-defined]
    if id(eng) not in _tables_ready:
        meta.create_all(eng)
        _tables_ready.add(id(eng))
    return eng


def _begin(slug: str, tag: str) -> tuple[int, int]:
    """Record an execution's start; returns (its row id, executions before it)."""
    with engine().begin() as conn:
        before = conn.execute(
            select(func.count()).select_from(executions).where(executions.c.slug == slug, executions.c.tag == tag)
        ).scalar_one()
        row_id = conn.execute(
            insert(executions)
            .values(slug=slug, tag=tag, pid=os.getpid(), started=time.time())
            .returning(executions.c.id)
        ).scalar_one()
    return int(row_id), int(before)


def _end(row_id: int) -> None:
    with engine().begin() as conn:
        conn.execute(update(executions).where(executions.c.id == row_id).values(finished=time.time()))


def execution_count(slug: str | None = None, tag: str | None = None) -> int:
    """How many times step functions ran (started), optionally for one slug / tag."""
    q = select(func.count()).select_from(executions)
    if slug is not None:
        q = q.where(executions.c.slug == slug)
    if tag is not None:
        q = q.where(executions.c.tag == tag)
    with engine().connect() as conn:
        return int(conn.execute(q).scalar_one())


def finished_count(slug: str, tag: str) -> int:
    """How many executions of ``slug`` for ``tag`` returned."""
    q = (
        select(func.count())
        .select_from(executions)
        .where(executions.c.slug == slug, executions.c.tag == tag, executions.c.finished.is_not(None))
    )
    with engine().connect() as conn:
        return int(conn.execute(q).scalar_one())


def busy_pids() -> set[int]:
    """Pids of pool processes inside a step function right now (started, not finished)."""
    with engine().connect() as conn:
        return {int(p) for p in conn.execute(select(executions.c.pid).where(executions.c.finished.is_(None))).scalars()}


def _run_step(slug: str, ctx: dict[str, Any]) -> dict[str, Any]:
    tag = str(ctx.get("tag", ""))
    row_id, before = _begin(slug, tag)
    hold = float((ctx.get("hold") or {}).get(slug, 0)) if before == 0 else 0.0
    time.sleep(hold or float(ctx.get("step_s", 0.2)))
    _end(row_id)
    return {OUTPUT_KEYS[slug]: tag}


@host.capability("prepare")
def prepare(ctx: dict[str, Any]) -> dict[str, Any]:
    return _run_step("prepare", ctx)


@host.capability("fetch")
def fetch(ctx: dict[str, Any]) -> dict[str, Any]:
    return _run_step("fetch", ctx)


@host.capability("score")
def score(ctx: dict[str, Any]) -> dict[str, Any]:
    return _run_step("score", ctx)


@host.capability("store")
def store(ctx: dict[str, Any]) -> dict[str, Any]:
    return _run_step("store", ctx)
