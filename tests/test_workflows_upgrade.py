"""The workflows schema upgrade on a populated database, on SQLite and PostgreSQL.

A store is built with the previous migrations (pluginhost at its head, with
plugins and audit rows; workflows at w0001, with definitions, a succeeded run, a
failed run and a run still pending, written as rows of that schema), then
upgraded to the newest migration the way a deployment does (``migrate()``).
Nothing may be lost, and the failed run from before the upgrade is resumed on a
real worker after it.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, insert, select, text

from workflows.store import MIGRATIONS, definitions, open_workflow_store, runs, steps

#: The workflows revision before this branch's migration.
PREVIOUS = "w0001"
TABLES = (
    "workflows_signals",
    "workflows_waits",
    "workflows_steps",
    "workflows_runs",
    "workflows_definitions",
    "workflows_alembic_version",
)
#: tests/apps/core.py FLOW: (position, stage, slug) and what each step returns.
LAYOUT = [(0, 0, "step_a"), (1, 1, "step_b"), (2, 1, "step_c"), (3, 2, "step_d"), (4, 3, "step_e")]
OUTPUTS = [{"a": 1, "order": ["a"]}, {"b": 2, "shared": "b"}, {"c": 3, "shared": "c"}, {"d": 4, "order": ["a", "d"]}]


def _migrate_to(engine: Engine, revision: str) -> None:
    """The workflows tables as the migrations up to ``revision`` leave them."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def _columns(engine: Engine, table: str) -> set[str]:
    from sqlalchemy import inspect

    return {c["name"] for c in inspect(engine).get_columns(table)}


def _populate(engine: Engine, definition: dict[str, Any]) -> dict[str, str]:
    """Rows of the w0001 schema (its columns only), as the code of that schema
    left them: a succeeded run, a run whose last step failed, a pending run."""
    now = datetime.now(timezone.utc)
    ids = {"ok": "run-ok", "bad": "run-bad", "waiting": "run-waiting"}
    inputs = {"ok": {"tag": "up-ok"}, "bad": {"tag": "up-bad", "e_fail": True}, "waiting": {"tag": "up-wait"}}
    with engine.begin() as conn:
        conn.execute(insert(definitions).values(
            name="flow", version=1, definition=definition, created_at=now - timedelta(days=2), actor="before",
        ))  # fmt: skip
        for key, run_id in ids.items():
            done = {"ok": 5, "bad": 4, "waiting": 0}[key]
            merged = {**inputs[key]}
            for output in OUTPUTS[:done]:
                merged.update(output)
            status = {"ok": "succeeded", "bad": "failed", "waiting": "pending"}[key]
            conn.execute(insert(runs).values(
                id=run_id, name="flow", version=1, status=status, input=inputs[key], context=inputs[key],
                output={**merged, "e": 1} if key == "ok" else None,
                error="RuntimeError: step_e needs level 2" if key == "bad" else None,
                created_at=now - timedelta(days=1), started_at=None if key == "waiting" else now,
                finished_at=None if key == "waiting" else now,
            ))  # fmt: skip
            for position, stage, slug in LAYOUT:
                finished = position < done
                failed = key == "bad" and position == 4
                conn.execute(insert(steps).values(
                    run_id=run_id, position=position, stage=stage, slug=slug,
                    status="succeeded" if finished else ("failed" if failed else "pending"),
                    attempts=1 if finished or failed else 0,
                    output=(OUTPUTS + [{"e": 1}])[position] if finished else None,
                    error="RuntimeError: step_e needs level 2" if failed else None,
                    plugin_version=1 if finished or failed else None, worker="old@host" if finished or failed else None,
                    started_at=now if finished or failed else None, finished_at=now if finished or failed else None,
                ))  # fmt: skip
    return ids


def _rows(engine: Engine, columns: set[str]) -> dict[str, list[dict[str, Any]]]:
    """Every row of the workflows tables, in the columns given (those of w0001)."""
    out = {}
    with engine.connect() as conn:
        for table, order in ((definitions, "version"), (runs, "id"), (steps, "run_id, position")):
            cols = [c for c in table.c if c.name in columns]
            query = select(*cols).order_by(*(table.c[name.strip()] for name in order.split(",")))
            out[table.name] = [dict(r._mapping) for r in conn.execute(query)]
    return out


@pytest.mark.parametrize("backend", ["embedded", "redis"], indirect=True)
def test_the_upgrade_keeps_every_row_and_a_failed_run_resumes_after_it(
    app_conf: dict[str, Any], configure_app: Callable[[Any], Any], workers: Any
) -> None:
    """Asserted: after the upgrade every row of every table is as it was (the new
    step columns empty), plugins and audit unchanged; the failed run resumes from
    its failed step (only ``step_e`` runs again) and succeeds; the pending run's
    steps are still there to run; a new run records its steps' claim."""
    from tests.apps import core

    url = app_conf["pluginhost_store"]
    engine = create_engine(url)
    with engine.begin() as conn:
        for table in TABLES:
            conn.execute(text(f"DROP TABLE IF EXISTS {table}"))
    _migrate_to(engine, PREVIOUS)
    old_columns = {t: _columns(engine, t) for t in ("workflows_definitions", "workflows_runs", "workflows_steps")}
    assert "owner" not in old_columns["workflows_steps"]

    configure_app(core.app)
    host = core.host.with_store(url)
    host.sync()  # the pluginhost tables: at their head, populated
    host.disable("skipper", actor="before")
    host.configure("step_e", {"level": 1}, actor="before")
    plugins_before = [p.model_dump() for p in host.list()]
    audit_before = [a.model_dump() for a in host.audit(limit=1000)]
    ids = _populate(engine, core.FLOW.model_dump(mode="json"))
    columns = set().union(*old_columns.values())
    before = _rows(engine, columns)

    open_workflow_store(engine).migrate()  # the upgrade

    assert {"owner", "task_id"} <= _columns(engine, "workflows_steps")
    assert _rows(engine, columns) == before
    with engine.connect() as conn:
        claimed = "SELECT count(*) FROM workflows_steps WHERE owner IS NOT NULL OR task_id IS NOT NULL"
        assert conn.execute(text(claimed)).scalar() == 0
    assert [p.model_dump() for p in host.list()] == plugins_before
    assert [a.model_dump() for a in host.audit(limit=1000)] == audit_before
    flows = core.flows
    assert sorted(r.id for r in flows.runs(name="flow")) == sorted(ids.values())

    host.configure("step_e", {"level": 2}, actor="after")  # the cause of the failure, fixed
    workers("tests.apps.core", pool="solo")
    out = flows.resume(ids["bad"]).get(timeout=60)
    run = flows.run(ids["bad"])
    assert (run.status, run.error, [s.status for s in run.steps]) == ("succeeded", None, ["succeeded"] * 5)
    assert [s.attempts for s in run.steps] == [1, 1, 1, 1, 2]
    expected = {"tag": "up-bad", "e_fail": True}
    for output in OUTPUTS:
        expected.update(output)
    assert out == {**expected, "e": 2} == run.output
    ran = [core.executions_of(slug, "up-bad") for _, _, slug in LAYOUT]
    assert ran == [0, 0, 0, 0, 1]
    waiting = flows.run(ids["waiting"])
    assert (waiting.status, [s.status for s in waiting.steps]) == ("pending", ["pending"] * 5)

    fresh = flows.start("flow", {"tag": "up-new"})
    assert fresh.get(timeout=60)["e"] == 2
    claimed = flows.run(fresh.id).steps
    assert all(s.owner and s.task_id for s in claimed), [(s.owner, s.task_id) for s in claimed]
    host.store.close()
    engine.dispose()


@pytest.mark.parametrize("database", ["sqlite", "postgres"])
def test_the_migrated_schema_is_the_one_the_code_declares(
    database: str, tmp_path: Any, request: pytest.FixtureRequest
) -> None:
    """The migrations are the history that builds the tables; ``schema.py`` is
    the one definition the code uses. A column added to one and not the other
    is a difference here (types, nullability, keys), not a surprise on a user's
    database."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from workflows.store import metadata

    url = f"sqlite:///{tmp_path / 'schema.db'}" if database == "sqlite" else request.getfixturevalue("empty_pg_url")
    engine = create_engine(url)
    try:
        open_workflow_store(engine).migrate()
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            diff = [d for d in compare_metadata(context, metadata) if _is_workflows(d)]
        assert diff == []
    finally:
        engine.dispose()


def _is_workflows(diff: Any) -> bool:
    """Differences in the workflows tables (the database also holds pluginhost's)."""
    item = diff[0] if isinstance(diff, list) else diff
    for part in item[1:]:
        name = getattr(part, "name", None) or getattr(getattr(part, "table", None), "name", None)
        if isinstance(part, str) and part.startswith("workflows_"):
            return True
        if isinstance(name, str) and name.startswith("workflows_") and name != "workflows_alembic_version":
            return True
    return False
