"""The per-step writes on PostgreSQL, without SQLAlchemy on the hot path.

Every step of every run writes its history twice (running, then its outcome)
and every start inserts a run with its steps. Through SQLAlchemy (pool
checkout with a pre-ping, statement compilation, result rows, a transaction)
each write cost 1-2.5 ms on the benchmark machine, while the statement itself
takes 0.15-0.35 ms. Here each write is one server-side prepared statement on a
psycopg connection kept per thread in autocommit: one round trip, one commit.

Same tables, same semantics as the SQLAlchemy versions in ``store.py``, which
SQLite uses.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import Engine

from pluginhost import StoreUnavailable

# The running mark does not wait for the WAL flush (set_config(..., true) sets
# synchronous_commit for this statement's own transaction only): a PostgreSQL
# server crash can lose it, which leaves the step pending with its message
# unacknowledged (redelivered). Outcomes below are durable.
_BEGIN_STEP = """
WITH s AS (
    UPDATE workflows_steps
    SET status = 'running', attempts = attempts + 1, started_at = %(now)s, worker = %(worker)s, error = NULL
    WHERE run_id = %(run_id)s AND position = %(position)s AND status IN ('pending', 'running')
      AND set_config('synchronous_commit', 'off', true) IS NOT NULL
    RETURNING position, stage, slug, status, attempts, output
), r AS (
    UPDATE workflows_runs SET status = 'running', started_at = %(now)s
    WHERE id = %(run_id)s AND status = 'pending' AND %(first)s AND EXISTS (SELECT 1 FROM s)
)
SELECT position, stage, slug, status, attempts, output FROM s
"""

_STEP_ROW = """
SELECT position, stage, slug, status, attempts, output FROM workflows_steps
WHERE run_id = %(run_id)s AND position = %(position)s
"""

_FINISH_STEP = """
UPDATE workflows_steps
SET status = %(status)s, output = %(output)s::json, error = %(error)s,
    plugin_version = %(plugin_version)s, finished_at = %(now)s
WHERE run_id = %(run_id)s AND position = %(position)s
"""

_FINISH_RUN = """
UPDATE workflows_runs
SET status = 'succeeded', context = %(context)s::json, output = %(context)s::json, error = NULL,
    finished_at = coalesce(finished_at, %(now)s)
WHERE id = %(run_id)s
RETURNING name
"""

# The last step's outcome and the run's success in one statement.
_FINISH_LAST_STEP = f"WITH s AS ({_FINISH_STEP}) {_FINISH_RUN}"

# The run and its pending steps in one statement; no row inserted when the run
# id exists already (a redelivered start).
_CREATE_RUN = """
WITH r AS (
    INSERT INTO workflows_runs (id, name, version, status, input, context, created_at)
    VALUES (%(run_id)s, %(name)s, %(version)s, 'pending', %(input)s::json, %(input)s::json, %(now)s)
    ON CONFLICT (id) DO NOTHING
    RETURNING id
)
INSERT INTO workflows_steps (run_id, position, stage, slug, status, attempts)
SELECT r.id, x.position, x.stage, x.slug, 'pending', 0
FROM r, unnest(%(positions)s::int[], %(stages)s::int[], %(slugs)s::text[]) AS x(position, stage, slug)
"""

_NEWEST = """
SELECT version, created_at FROM workflows_definitions
WHERE name = %(name)s ORDER BY version DESC LIMIT 1
"""

StepRow = tuple[int, int, str, str, int, "dict[str, Any] | None"]


class PgHotPath:
    """The hot workflow writes, on one kept connection per thread."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._local = threading.local()
        self._pid = os.getpid()

    def begin_step(self, run_id: str, position: int, worker: str | None, first: bool, now: datetime) -> StepRow | None:
        params = {"run_id": run_id, "position": position, "worker": worker, "first": first, "now": now}
        row = self._fetch(_BEGIN_STEP, params)
        return row if row is not None else self._fetch(_STEP_ROW, params)

    def finish_step(
        self,
        run_id: str,
        position: int,
        status: str,
        output: dict[str, Any] | None,
        error: str | None,
        plugin_version: int | None,
        now: datetime,
        run_output: dict[str, Any] | None = None,
    ) -> str | None:
        """Record a step's outcome; with ``run_output``, also the run's success
        (returns the workflow's name then)."""
        params = {
            "run_id": run_id, "position": position, "status": status, "error": error,
            "output": None if output is None else json.dumps(output),
            "plugin_version": plugin_version, "now": now,
        }
        if run_output is None:
            self._execute(_FINISH_STEP, params)
            return None
        params["context"] = json.dumps(run_output)
        return self._name(_FINISH_LAST_STEP, params)

    def finish_run(self, run_id: str, output: dict[str, Any], now: datetime) -> str:
        return self._name(_FINISH_RUN, {"run_id": run_id, "context": json.dumps(output), "now": now})

    def create_run(
        self, run_id: str, name: str, version: int, input: dict[str, Any],
        layout: Iterable[tuple[int, int, str]], now: datetime,
    ) -> bool:
        positions, stages, slugs = (list(col) for col in zip(*layout))
        params = {
            "run_id": run_id, "name": name, "version": version, "input": json.dumps(input), "now": now,
            "positions": positions, "stages": stages, "slugs": slugs,
        }
        return self._execute(_CREATE_RUN, params) > 0

    def newest(self, name: str) -> tuple[int, datetime] | None:
        row = self._fetch(_NEWEST, {"name": name})
        return None if row is None else (int(row[0]), row[1])

    # -- plumbing --------------------------------------------------------------

    def _name(self, sql: str, params: dict[str, Any]) -> str:
        row = self._fetch(sql, params)
        if row is None:
            raise StoreUnavailable(f"workflow run {params['run_id']!r} is gone from the store")
        return str(row[0])

    def _fetch(self, sql: str, params: dict[str, Any]) -> Any:
        return self._run(lambda cur: cur.execute(sql, params, prepare=True).fetchone())

    def _execute(self, sql: str, params: dict[str, Any]) -> int:
        return int(self._run(lambda cur: cur.execute(sql, params, prepare=True).rowcount))

    def _run(self, fn: Any) -> Any:
        from psycopg import Error, InterfaceError, OperationalError

        for attempt in (1, 2):
            kept = getattr(self._local, "cursor", None) is not None and self._pid == os.getpid()
            try:
                return fn(self._cursor())
            except Error as exc:
                lost = isinstance(exc, (OperationalError, InterfaceError))  # the connection, not the statement
                if lost:
                    self._drop()
                # A kept connection that died since its last use (an outage that
                # is over, a server restart): once more on a new one. Statements
                # here are idempotent but for ``attempts``, which such a retry
                # can count twice.
                if not lost or not kept or attempt == 2:
                    raise StoreUnavailable(f"workflow store unreachable: {_reason(exc)}") from None
        raise AssertionError("unreachable")

    def _cursor(self) -> Any:
        if self._pid != os.getpid():  # a forked child: the parent's connections are not ours
            self._local = threading.local()
            self._pid = os.getpid()
        cursor = getattr(self._local, "cursor", None)
        if cursor is None:
            try:
                raw = self.engine.raw_connection()
            except Exception as exc:
                raise StoreUnavailable(f"workflow store unreachable: {_reason(getattr(exc, 'orig', exc))}") from None
            driver: Any = raw.driver_connection
            driver.autocommit = True
            self._local.raw, cursor = raw, driver.cursor()
            self._local.cursor = cursor
        return cursor

    def _drop(self) -> None:
        raw = getattr(self._local, "raw", None)
        self._local.raw = self._local.cursor = None
        if raw is not None:
            try:
                raw.invalidate()
            except Exception:  # already gone
                pass


def _reason(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
