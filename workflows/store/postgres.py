"""The workflow store on PostgreSQL: every call on one connection discipline.

Each thread keeps one psycopg connection of its own, outside any pool, in
autocommit: a call is one server-side prepared statement (one round trip, one
commit); the few writes of several statements (``define``, ``reset_for_resume``)
run in an explicit transaction on the same connection. Through SQLAlchemy (pool
checkout with a pre-ping, statement compilation, result rows, a transaction)
each step write cost 1-2.5 ms on the benchmark machine, while the statement
itself takes 0.15-0.35 ms.

The connections are not the engine's: one that SQLAlchemy's pool handed back
after a thread ended would carry autocommit into the transactions of
migrations and of users' direct SQL (``tests/test_workflows_store.py``). A
thread's connection is closed when the thread ends; a forked child leaves its
parent's alone (and never closes them: that would end the parent's sessions).

A step's outcome is sent without waiting for its answer (``post_step``) when a
later task records it again: the step returns it with its context
(``outcome.py``), and the next step's running mark (or the parallel stage's
merge) writes it in the same statement, where it changes nothing if the first
write landed. The answer is read before the connection's next statement. So a
step costs one round trip the worker waits for, and an outcome is never only in
a lost write: until the next task has recorded it, it travels in that task's
message.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import select
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any, TypeVar

from sqlalchemy import Engine

from ..errors import RunNotFound, WorkflowNotFound
from .base import Claim, ClaimAsk, Layout, WorkflowStore, first_line, refuse, resume_point, unreachable
from .outcome import Outcome
from .records import (
    CANCELLABLE_RUN_STATES,
    DONE,
    FINISHED_RUN_STATES,
    OPEN_RUN_STATES,
    STEP_LEASE_S,
    StepRun,
    WorkflowRun,
)
from .schema import RUN_COLUMNS, STEP_COLUMNS

T = TypeVar("T")
log = logging.getLogger("workflows")


def _sql_list(values: tuple[str, ...]) -> str:
    return "(" + ", ".join(f"'{v}'" for v in values) + ")"


_OPEN = _sql_list(OPEN_RUN_STATES)
_DONE = _sql_list(DONE)
_RUN_COLUMNS = ", ".join(RUN_COLUMNS)
_STEP_COLUMNS = ", ".join(STEP_COLUMNS)

# The claim (the running mark), only in a run that is pending or running. A
# pending step is claimed; a running one only
# when its owner is this session (it finished with it: one task at a time per
# connection), has no session any more (its process died: PostgreSQL ends the
# backend when the client's socket closes), is unknown, or claimed it before
# ``stale_before`` (the lease; see WorkflowStore). The owner is the claiming
# connection's backend pid; a pid that a new backend reuses looks alive, which
# only delays a takeover until the lease ends. The OR keeps the
# pg_stat_activity probe off the common path (a pending step).
#
# The running mark does not wait for the WAL flush (set_config(..., true) sets
# synchronous_commit for this statement's own transaction only): a PostgreSQL
# server crash can lose it, which leaves the step pending with its message
# unacknowledged (redelivered). Outcomes are durable where they are first
# written; one that this statement carries because its own write failed is
# durable from the next durable commit (the run's last write at the latest).
_BEGIN_STEP = f"""
WITH s AS (
    UPDATE workflows_steps
    SET status = 'running', attempts = attempts + 1, started_at = %(now)s, worker = %(worker)s,
        error = NULL, owner = pg_backend_pid()::text, task_id = %(task_id)s
    WHERE run_id = %(run_id)s AND position = %(position)s
      AND (status = 'pending' OR (status = 'running' AND (
            owner IS NULL OR owner = pg_backend_pid()::text OR started_at < %(stale_before)s
            OR NOT EXISTS (
                SELECT 1 FROM pg_stat_activity a WHERE a.pid::text = workflows_steps.owner
            )
      )))
      AND EXISTS (
            SELECT 1 FROM workflows_runs WHERE id = %(run_id)s AND status IN {_OPEN}
      )
      AND set_config('synchronous_commit', 'off', true) IS NOT NULL
    RETURNING position, stage, slug, status, attempts, output, task_id
), r AS (
    UPDATE workflows_runs SET status = 'running', started_at = %(now)s
    WHERE id = %(run_id)s AND status = 'pending' AND %(first)s AND EXISTS (SELECT 1 FROM s)
)
SELECT position, stage, slug, status, attempts, output, task_id FROM s
"""

# An outcome of an earlier step, recorded again by the task that carries it (a
# no-op where the step's own write landed). One such CTE per carried outcome:
# plain primary-key updates (an unnest() join here was replanned on every call,
# which cost more than the write).
_CARRIED = """
c{i} AS (
    UPDATE workflows_steps
    SET status = %(c{i}_status)s, output = %(c{i}_output)s::json, error = %(c{i}_error)s,
        plugin_version = %(c{i}_version)s, finished_at = %(c{i}_finished)s
    WHERE run_id = %(run_id)s AND position = %(c{i}_position)s AND status IN ('pending', 'running')
)"""


@functools.lru_cache(maxsize=64)
def _carrying(n: int, statement: str) -> str:
    """``statement`` (which may start with WITH) preceded by ``n`` carried outcomes."""
    ctes = ", ".join(_CARRIED.format(i=i).strip() for i in range(n))
    rest = statement.strip()
    return f"WITH {ctes}, {rest.removeprefix('WITH ')}" if rest.startswith("WITH ") else f"WITH {ctes} {rest}"


# The row of a step the claim did not take, with its run's state (a step of a
# failed or succeeded run is never claimed).
_STEP_ROW = """
SELECT s.position, s.stage, s.slug, s.status, s.attempts, s.output, s.task_id, r.status
FROM workflows_steps s JOIN workflows_runs r ON r.id = s.run_id
WHERE s.run_id = %(run_id)s AND s.position = %(position)s
"""

_FINISH_STEP = """
UPDATE workflows_steps
SET status = %(status)s, output = %(output)s::json, error = %(error)s,
    plugin_version = %(plugin_version)s, finished_at = %(now)s
WHERE run_id = %(run_id)s AND position = %(position)s
"""

# The run's success (a cancelled run stays cancelled); the workflow's name, NULL
# if the run is gone.
_FINISH_RUN_PARTS = """
u AS (
    UPDATE workflows_runs
    SET status = 'succeeded', context = %(context)s::json, output = %(context)s::json, error = NULL,
        finished_at = coalesce(finished_at, %(now)s)
    WHERE id = %(run_id)s AND status <> 'cancelled'
    RETURNING name
)
SELECT coalesce((SELECT name FROM u), (SELECT name FROM workflows_runs WHERE id = %(run_id)s))
"""
_FINISH_RUN = "WITH " + _FINISH_RUN_PARTS.strip()

# The last step's outcome and the run's success in one statement.
_FINISH_LAST_STEP = f"WITH s AS ({_FINISH_STEP.strip()}), {_FINISH_RUN_PARTS.strip()}"


# ``post_step``'s statement, prepared once per connection and sent with libpq's
# asynchronous calls (text parameters). Durable (synchronous_commit is on).
_POST_STEP_NAME = b"workflows_post_step"
_POST_STEP = """
PREPARE workflows_post_step (text, text, text, bigint, timestamptz, text, int) AS
UPDATE workflows_steps
SET status = $1, output = $2::json, error = $3, plugin_version = $4, finished_at = $5
WHERE run_id = $6 AND position = $7 AND status IN ('pending', 'running')
"""

# The pending steps of the run inserted by CTE ``r``, as a VALUES list (one
# statement text per step count: an unnest() of array parameters was planned
# again on every call). Parameters: ``_layout_params``.
_INSERT_STEPS = """
INSERT INTO workflows_steps (run_id, position, stage, slug, status, attempts)
SELECT r.id, x.position, x.stage, x.slug, 'pending', 0
FROM r, (VALUES {values}) AS x(position, stage, slug)
"""

# The run and its pending steps in one statement; no row inserted when the run
# id exists already (a redelivered start).
_CREATE_RUN = """
WITH r AS (
    INSERT INTO workflows_runs (id, name, version, status, input, context, created_at, key)
    VALUES (%(run_id)s, %(name)s, %(version)s, 'pending', %(input)s::json, %(input)s::json, %(now)s, %(key)s)
    ON CONFLICT (id) DO NOTHING
    RETURNING id
)
{insert_steps}
"""

_NEWEST = """
SELECT version, created_at FROM workflows_definitions
WHERE name = %(name)s ORDER BY version DESC LIMIT 1
"""

# The same, only if the definition the caller parsed is still the newest one:
# returns the newest (version, created_at) and how many runs were inserted.
_CREATE_NEWEST_RUN = f"""
WITH d AS ({_NEWEST.strip()}),
r AS (
    INSERT INTO workflows_runs (id, name, version, status, input, context, created_at, key)
    SELECT %(run_id)s, %(name)s, d.version, 'pending', %(input)s::json, %(input)s::json, %(now)s, %(key)s
    FROM d WHERE d.version = %(version)s AND d.created_at = %(stored_at)s
    ON CONFLICT (id) DO NOTHING
    RETURNING id
), s AS ({{insert_steps}})
SELECT d.version, d.created_at, (SELECT count(*) FROM r) FROM d
"""


@functools.lru_cache(maxsize=128)
def _with_steps(statement: str, steps: int) -> str:
    """``statement`` with its ``{insert_steps}`` for ``steps`` steps."""
    values = ", ".join(f"(%(p{i})s::int, %(g{i})s::int, %(s{i})s::text)" for i in range(steps))
    return statement.format(insert_steps=_INSERT_STEPS.format(values=values).strip())


def _layout_params(layout: list[tuple[int, int, str]]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for i, (position, stage, slug) in enumerate(layout):
        params.update({f"p{i}": position, f"g{i}": stage, f"s{i}": slug})
    return params


_RETRY_STEP = """
UPDATE workflows_steps SET status = 'pending', error = %(error)s, finished_at = %(now)s
WHERE run_id = %(run_id)s AND position = %(position)s
"""

_RELEASE_STEP = """
UPDATE workflows_steps SET status = 'pending'
WHERE run_id = %(run_id)s AND position = %(position)s AND status = 'running'
"""

# The failed step, the later stages' pending steps cancelled and the run failed
# (keeping a first error and end time; a succeeded run stays succeeded), in one
# statement: the workflow's name, and whether the step exists.
_FAIL_RUN = """
WITH st AS (
    SELECT stage FROM workflows_steps WHERE run_id = %(run_id)s AND position = %(position)s
), f AS (
    UPDATE workflows_steps
    SET status = 'failed', error = %(error)s, plugin_version = %(plugin_version)s, finished_at = %(now)s
    WHERE run_id = %(run_id)s AND position = %(position)s
), c AS (
    UPDATE workflows_steps SET status = 'cancelled', finished_at = %(now)s
    WHERE run_id = %(run_id)s AND status = 'pending' AND stage > (SELECT stage FROM st)
), r AS (
    UPDATE workflows_runs
    SET status = 'failed', error = coalesce(error, %(error)s), finished_at = coalesce(finished_at, %(now)s)
    WHERE id = %(run_id)s AND status NOT IN ('succeeded', 'cancelled') AND EXISTS (SELECT 1 FROM st)
    RETURNING name
)
SELECT coalesce((SELECT name FROM r), (SELECT name FROM workflows_runs WHERE id = %(run_id)s)),
       EXISTS (SELECT 1 FROM st)
"""

_DEFINITION_NEWEST = """
SELECT version, definition FROM workflows_definitions
WHERE name = %(name)s ORDER BY version DESC LIMIT 1
"""
_DEFINITION_VERSION = """
SELECT version, definition FROM workflows_definitions WHERE name = %(name)s AND version = %(version)s
"""
_HISTORY = """
SELECT version, created_at, actor FROM workflows_definitions WHERE name = %(name)s ORDER BY version DESC
"""
_LATEST_DEFINITIONS = """
SELECT DISTINCT ON (name) version, definition FROM workflows_definitions ORDER BY name, version DESC
"""
_INSERT_DEFINITION = """
INSERT INTO workflows_definitions (name, version, definition, created_at, actor)
VALUES (%(name)s, %(version)s, %(definition)s::json, %(now)s, %(actor)s)
"""
# Writers of one workflow's definitions queue on this lock (``define``).
_DEFINE_LOCK = "SELECT pg_advisory_xact_lock(hashtext('workflows_definitions:' || %(name)s))"

_GET_RUN = f"SELECT {_RUN_COLUMNS} FROM workflows_runs WHERE id = %(run_id)s"
_GET_STEPS = f"SELECT {_STEP_COLUMNS} FROM workflows_steps WHERE run_id = %(run_id)s ORDER BY position"

_TAKE_FOR_RESUME = """
UPDATE workflows_runs SET status = 'running', error = NULL, finished_at = NULL
WHERE id = %(run_id)s AND status = 'failed'
RETURNING input
"""
_RUN_STATUS = "SELECT status FROM workflows_runs WHERE id = %(run_id)s"
_RESUME_ROWS = """
SELECT position, stage, status, output FROM workflows_steps WHERE run_id = %(run_id)s ORDER BY position
"""
_REOPEN_STEPS = """
UPDATE workflows_steps SET status = 'pending', finished_at = NULL
WHERE run_id = %(run_id)s AND status IN ('failed', 'cancelled', 'running')
"""

_CANCEL_RUN = f"""
UPDATE workflows_runs SET status = 'cancelled', cancelled_by = %(actor)s, finished_at = %(now)s
WHERE id = %(run_id)s AND status IN {_sql_list(CANCELLABLE_RUN_STATES)}
RETURNING id
"""
_CANCEL_WAITS = """
UPDATE workflows_waits SET status = 'cancelled', woke_at = %(now)s
WHERE run_id = %(run_id)s AND status IN ('waiting', 'claimed')
"""
_CANCEL_PENDING_STEPS = """
UPDATE workflows_steps SET status = 'cancelled', finished_at = %(now)s
WHERE run_id = %(run_id)s AND status = 'pending'
"""
_CANCEL_RUNNING_STEPS = """
UPDATE workflows_steps SET status = 'cancelled', finished_at = %(now)s
WHERE run_id = %(run_id)s AND status = 'running'
"""
_RUNNING_TASKS = "SELECT task_id FROM workflows_steps WHERE run_id = %(run_id)s AND status = 'running'"

_STALE_STEPS = f"""
SELECT s.run_id, s.position, s.slug FROM workflows_steps s JOIN workflows_runs r ON r.id = s.run_id
WHERE s.status = 'running' AND s.started_at < %(cutoff)s AND r.status IN {_OPEN}
"""
_STALLED_STEPS = f"""
WITH first_open AS (
    SELECT s.run_id, min(s.position) AS position
    FROM workflows_steps s JOIN workflows_runs r ON r.id = s.run_id
    WHERE r.status IN {_OPEN} AND r.created_at < %(cutoff)s AND s.status NOT IN {_DONE}
      AND r.id NOT IN (
          SELECT run_id FROM workflows_steps
          WHERE status = 'running' OR started_at >= %(cutoff)s OR finished_at >= %(cutoff)s
      )
      AND r.id NOT IN (
          SELECT run_id FROM workflows_waits WHERE claimed_at >= %(cutoff)s OR woke_at >= %(cutoff)s
      )
    GROUP BY s.run_id
)
SELECT s.run_id, s.position, s.slug FROM workflows_steps s
JOIN first_open f ON f.run_id = s.run_id AND f.position = s.position
"""
_PRUNE = f"""
DELETE FROM workflows_runs WHERE status IN {_sql_list(FINISHED_RUN_STATES)} AND finished_at < %(cutoff)s
"""  # the steps go with their run (ON DELETE CASCADE)

# How long reading the answer of an outcome sent without waiting may take
# before the connection is given up (the next task records the outcome anyway).
_POST_ANSWER_TIMEOUT_S = 10.0
# A dead peer (a partition that drops packets) is noticed in ~3 s, not hours.
_KEEPALIVE = {"keepalives": 1, "keepalives_idle": 1, "keepalives_interval": 1, "keepalives_count": 2}
#: Connections a forked child inherited: kept referenced, so they are neither
#: closed (that would end the parent's sessions) nor collected with a warning.
_INHERITED: list[Any] = []


class _Session:
    """One thread's connection; closed with the thread (in the process that opened it)."""

    __slots__ = ("conn", "pid", "pending", "post_prepared", "__weakref__")

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.pid = os.getpid()
        self.pending: Any = None  # the libpq connection of an outcome whose answer is unread
        self.post_prepared = False

    def close(self) -> None:
        conn, self.conn, self.pending = self.conn, None, None
        if conn is None:
            return
        if self.pid != os.getpid():
            _INHERITED.append(conn)
            return
        try:
            conn.close()
        except Exception:  # noqa: BLE001 - already gone
            pass

    def __del__(self) -> None:
        self.close()


class PgWorkflowStore(WorkflowStore):
    """The workflow tables on PostgreSQL, one kept connection per thread.

    ``synchronous_commit=False`` (setting ``pluginhost_workflows_synchronous_commit``):
    history writes skip the WAL flush wait; a PostgreSQL *server* crash can then
    lose the last ~0.6 s of step updates, which the sweeper reports (steps left
    running). The running mark never waits for it (see ``_BEGIN_STEP``).
    """

    def __init__(
        self,
        engine: Engine,
        *,
        step_lease_s: float = STEP_LEASE_S,
        synchronous_commit: bool = True,
        connect_timeout_s: float = 2.0,
    ) -> None:
        super().__init__(engine, step_lease_s=step_lease_s)
        self._conninfo = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        self._options: dict[str, Any] = {"connect_timeout": max(2, round(connect_timeout_s)), **_KEEPALIVE}
        if not synchronous_commit:
            self._options["options"] = "-c synchronous_commit=off"
        self._local = threading.local()
        self._pid = os.getpid()

    def after_fork(self) -> None:
        super().after_fork()
        self._session()  # drops what the parent's threads held

    def close(self) -> None:
        session = getattr(self._local, "session", None)
        if session is not None:
            session.close()
            self._local.session = None

    # -- definitions -----------------------------------------------------------

    def define(self, name: str, definition: dict[str, Any], actor: str | None) -> int:
        def write(conn: Any) -> int:
            with conn.transaction():
                conn.execute(_DEFINE_LOCK, {"name": name})
                latest = conn.execute(_DEFINITION_NEWEST, {"name": name}, prepare=True).fetchone()
                if latest is not None and latest[1] == definition:
                    return int(latest[0])
                version = (int(latest[0]) if latest else 0) + 1
                params = {"name": name, "version": version, "definition": json.dumps(definition)}
                conn.execute(_INSERT_DEFINITION, {**params, "now": _now(), "actor": actor}, prepare=True)
                return version

        return self._run(write)

    def definition(self, name: str, version: int | None = None) -> tuple[int, dict[str, Any]] | None:
        if version is None:
            row = self._fetch(_DEFINITION_NEWEST, {"name": name})
        else:
            row = self._fetch(_DEFINITION_VERSION, {"name": name, "version": version})
        return None if row is None else (int(row[0]), row[1])

    def newest(self, name: str) -> tuple[int, datetime] | None:
        row = self._fetch(_NEWEST, {"name": name})
        return None if row is None else (int(row[0]), row[1])

    def history(self, name: str) -> list[tuple[int, datetime, str | None]]:
        return [(int(v), at, actor) for v, at, actor in self._fetch_all(_HISTORY, {"name": name})]

    def latest_definitions(self) -> list[tuple[int, dict[str, Any]]]:
        return [(int(v), d) for v, d in self._fetch_all(_LATEST_DEFINITIONS, {})]

    # -- runs ------------------------------------------------------------------

    def create_run(
        self, run_id: str, name: str, version: int, input: dict[str, Any], layout: Layout, key: str | None = None
    ) -> bool:
        steps = list(layout)
        params = {
            "run_id": run_id,
            "name": name,
            "version": version,
            "input": json.dumps(input),
            "now": _now(),
            "key": key,
            **_layout_params(steps),
        }
        return self._execute(_with_steps(_CREATE_RUN, len(steps)), params) > 0

    def create_newest_run(
        self,
        run_id: str,
        name: str,
        version: int,
        stored_at: datetime,
        input: dict[str, Any],
        layout: Layout,
        key: str | None = None,
    ) -> tuple[tuple[int, datetime] | None, bool]:
        steps = list(layout)
        params = {
            "run_id": run_id,
            "name": name,
            "version": version,
            "stored_at": stored_at,
            "input": json.dumps(input),
            "now": _now(),
            "key": key,
            **_layout_params(steps),
        }
        row = self._fetch(_with_steps(_CREATE_NEWEST_RUN, len(steps)), params)
        return (None, False) if row is None else ((int(row[0]), row[1]), int(row[2]) > 0)

    def _claim(self, ask: ClaimAsk) -> Claim:
        params = {name: value for name, value in ask._asdict().items() if name != "carried"}
        if ask.carried:
            row = self._fetch(_carrying(len(ask.carried), _BEGIN_STEP), {**params, **_carried_params(ask.carried)})
        else:
            row = self._fetch(_BEGIN_STEP, params)
        if row is not None:
            return Claim(_step_row(row), True, "running")  # the claim's condition: the run is open
        found = self._fetch(_STEP_ROW, params)
        return Claim(None, False, None) if found is None else Claim(_step_row(found), False, found[7])

    def release_step(self, run_id: str, position: int) -> None:
        self._execute(_RELEASE_STEP, {"run_id": run_id, "position": position})

    def _finish_step(self, run_id: str, outcome: Outcome, run_output: dict[str, Any] | None) -> str | None:
        params = {
            "run_id": run_id,
            "position": outcome.position,
            "status": outcome.status,
            "error": outcome.error,
            "output": None if outcome.output is None else json.dumps(outcome.output),
            "plugin_version": outcome.plugin_version,
            "now": outcome.finished_at,
        }
        if run_output is None:
            self._execute(_FINISH_STEP, params)
            return None
        params["context"] = json.dumps(run_output)
        return self._name(_FINISH_LAST_STEP, params)

    def post_step(self, run_id: str, outcome: Outcome) -> None:
        """Sent without waiting for the answer (read before this connection's
        next statement)."""
        values = [
            outcome.status.encode(),
            None if outcome.output is None else json.dumps(outcome.output).encode(),
            None if outcome.error is None else outcome.error.encode(),
            None if outcome.plugin_version is None else str(outcome.plugin_version).encode(),
            outcome.finished_at.isoformat().encode(),
            run_id.encode(),
            str(outcome.position).encode(),
        ]
        try:
            session = self._session()  # drains an earlier answer; (re)connects if needed
            if not session.post_prepared:
                from psycopg.errors import DuplicatePreparedStatement

                try:
                    session.conn.execute(_POST_STEP)
                except DuplicatePreparedStatement:  # prepared on this session before
                    pass
                session.post_prepared = True
            pgconn = session.conn.pgconn
            pgconn.send_query_prepared(_POST_STEP_NAME, values)
            deadline = time.monotonic() + _POST_ANSWER_TIMEOUT_S
            while pgconn.flush():  # 1: not all sent yet (a nonblocking connection)
                _wait(pgconn.socket, deadline, write=True)
            session.pending = pgconn
        except Exception as exc:  # noqa: BLE001 - the outcome is carried on; say why it was not sent
            log.warning(
                "step %d of run %s: outcome not sent (the next task records it): %s",
                outcome.position,
                run_id,
                first_line(exc),
            )
            self._drop()

    def _finish_stage(self, run_id: str, carried: list[Outcome], output: dict[str, Any]) -> str:
        params = {"run_id": run_id, "context": json.dumps(output), "now": _now(), **_carried_params(carried)}
        return self._name(_carrying(len(carried), _FINISH_RUN), params)

    def retry_step(self, run_id: str, position: int, error: str) -> None:
        self._execute(_RETRY_STEP, {"run_id": run_id, "position": position, "error": error, "now": _now()})

    def fail_run(self, run_id: str, position: int, error: str, plugin_version: int | None = None) -> str:
        params = {"run_id": run_id, "position": position, "error": error, "plugin_version": plugin_version}
        row = self._fetch(_FAIL_RUN, {**params, "now": _now()})
        if row is None or not row[1]:
            raise WorkflowNotFound(f"run {run_id!r} has no step at position {position}")
        return str(row[0])

    def finish_run(self, run_id: str, output: dict[str, Any]) -> str:
        return self._name(_FINISH_RUN, {"run_id": run_id, "context": json.dumps(output), "now": _now()})

    def cancel_run(self, run_id: str, actor: str | None, *, running: bool = False) -> list[str]:
        params = {"run_id": run_id, "actor": actor, "now": _now()}

        def write(conn: Any) -> list[str]:
            with conn.transaction():
                taken = conn.execute(_CANCEL_RUN, params, prepare=True).fetchone()
                if taken is None:
                    status = conn.execute(_RUN_STATUS, params, prepare=True).fetchone()
                    refuse(run_id, status and status[0], only="unfinished", action="cancelled", unless="cancelled")
                else:
                    conn.execute(_CANCEL_PENDING_STEPS, params, prepare=True)
                    conn.execute(_CANCEL_WAITS, params, prepare=True)
                rows = conn.execute(_RUNNING_TASKS, params, prepare=True).fetchall()
                if running:
                    conn.execute(_CANCEL_RUNNING_STEPS, params, prepare=True)
            return [str(t) for (t,) in rows if t]

        return self._run(write)

    def get_run(self, run_id: str) -> WorkflowRun | None:
        def read(conn: Any) -> WorkflowRun | None:
            with conn.transaction():  # the run and its steps from one snapshot
                row = conn.execute(_GET_RUN, {"run_id": run_id}, prepare=True).fetchone()
                if row is None:
                    return None
                found = conn.execute(_GET_STEPS, {"run_id": run_id}, prepare=True).fetchall()
            run = dict(zip(RUN_COLUMNS, row))
            return WorkflowRun.model_validate({**run, "steps": [dict(zip(STEP_COLUMNS, s)) for s in found]})

        return self._run(read)

    def list_runs(self, name: str | None, status: str | None, limit: int) -> list[WorkflowRun]:
        where = [w for w, v in (("name = %(name)s", name), ("status = %(status)s", status)) if v is not None]
        sql = f"SELECT {_RUN_COLUMNS} FROM workflows_runs"
        sql += (" WHERE " + " AND ".join(where)) if where else ""
        sql += " ORDER BY created_at DESC LIMIT %(limit)s"
        rows = self._fetch_all(sql, {"name": name, "status": status, "limit": limit})
        return [WorkflowRun.model_validate(dict(zip(RUN_COLUMNS, r))) for r in rows]

    def reset_for_resume(self, run_id: str) -> tuple[int, dict[str, Any], dict[int, dict[str, Any]]]:
        params = {"run_id": run_id}

        def write(conn: Any) -> tuple[int, dict[str, Any], dict[int, dict[str, Any]]]:
            with conn.transaction():
                taken = conn.execute(_TAKE_FOR_RESUME, params, prepare=True).fetchone()
                if taken is None:
                    status = conn.execute(_RUN_STATUS, params, prepare=True).fetchone()
                    refuse(run_id, status and status[0], only="failed", action="resumed")
                    raise AssertionError("refuse() raises for a run that is not failed")
                rows = conn.execute(_RESUME_ROWS, params, prepare=True).fetchall()
                conn.execute(_REOPEN_STEPS, params, prepare=True)
            return resume_point(taken[0], [tuple(r) for r in rows])

        return self._run(write)

    def stale_steps(self, older_than_s: float) -> list[tuple[str, int, str]]:
        return self._positions(_STALE_STEPS, older_than_s)

    def stalled_steps(self, older_than_s: float) -> list[tuple[str, int, str]]:
        return self._positions(_STALLED_STEPS, older_than_s)

    def prune(self, older_than_s: float) -> int:
        return self._execute(_PRUNE, {"cutoff": _now() - timedelta(seconds=older_than_s)})

    # -- plumbing --------------------------------------------------------------

    def _positions(self, sql: str, older_than_s: float) -> list[tuple[str, int, str]]:
        rows = self._fetch_all(sql, {"cutoff": _now() - timedelta(seconds=older_than_s)})
        return [(str(r), int(p), str(s)) for r, p, s in rows]

    def _name(self, sql: str, params: dict[str, Any]) -> str:
        row = self._fetch(sql, params)
        if row is None or row[0] is None:
            raise RunNotFound(f"workflow run {params['run_id']!r} is gone from the store")
        return str(row[0])

    def _fetch(self, sql: str, params: dict[str, Any]) -> Any:
        return self._run(lambda conn: conn.execute(sql, params, prepare=True).fetchone())

    def _fetch_all(self, sql: str, params: dict[str, Any]) -> list[Any]:
        return list(self._run(lambda conn: conn.execute(sql, params, prepare=True).fetchall()))

    def _execute(self, sql: str, params: dict[str, Any]) -> int:
        return int(self._run(lambda conn: conn.execute(sql, params, prepare=True).rowcount))

    def _run(self, fn: Callable[[Any], T]) -> T:
        """``fn(connection)`` on this thread's connection; a kept connection that
        died since its last use (an outage that is over, a server restart) is
        replaced once. Statements here are idempotent but for ``attempts``,
        which such a retry can count twice."""
        from psycopg import Error, InterfaceError, OperationalError

        for attempt in (1, 2):
            kept = getattr(self._local, "session", None) is not None and self._pid == os.getpid()
            try:
                return fn(self._session().conn)
            except Error as exc:
                lost = isinstance(exc, (OperationalError, InterfaceError))  # the connection, not the statement
                if lost:
                    self._drop()
                if not lost or not kept or attempt == 2:
                    raise unreachable(exc) from None
        raise AssertionError("unreachable")

    def _session(self) -> _Session:
        if self._pid != os.getpid():  # a forked child: the parent's connections are not ours
            self._local = threading.local()
            self._pid = os.getpid()
        session: _Session | None = getattr(self._local, "session", None)
        if session is not None and session.pending is not None:
            self._drain(session)
            session = getattr(self._local, "session", None)
        if session is None:
            import psycopg

            try:
                conn = psycopg.connect(self._conninfo, autocommit=True, **self._options)
            except Exception as exc:
                raise unreachable(exc) from None
            session = self._local.session = _Session(conn)
        return session

    def _drain(self, session: _Session) -> None:
        """Read the answer of the outcome ``post_step`` sent (it has usually
        arrived by now). A failed write is logged; a connection that does not
        answer in time is given up."""
        pgconn, session.pending = session.pending, None
        from psycopg import pq

        try:
            deadline = time.monotonic() + _POST_ANSWER_TIMEOUT_S
            while True:
                while pgconn.is_busy():
                    _wait(pgconn.socket, deadline)
                    pgconn.consume_input()
                result = pgconn.get_result()
                if result is None:
                    return
                if result.status != pq.ExecStatus.COMMAND_OK:
                    message = (result.error_message or b"").decode(errors="replace").strip()
                    log.warning(
                        "a step outcome sent without waiting was not written (the next task records it): %s", message
                    )
        except Exception as exc:  # noqa: BLE001 - a broken connection: replaced on next use
            log.warning(
                "no answer to a step outcome sent without waiting (the next task records it): %s", first_line(exc)
            )
            self._drop()

    def _drop(self) -> None:
        session = getattr(self._local, "session", None)
        self._local.session = None
        if session is not None:
            session.close()


def _step_row(row: Any) -> StepRun:
    position, stage, slug, status, attempts, output, task_id = row[:7]
    return StepRun.model_construct(
        position=position, stage=stage, slug=slug, status=status, attempts=attempts, output=output, task_id=task_id
    )


def _carried_params(carried: list[Outcome]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for i, o in enumerate(carried):
        params.update(
            {
                f"c{i}_position": o.position,
                f"c{i}_status": o.status,
                f"c{i}_output": None if o.output is None else json.dumps(o.output),
                f"c{i}_error": o.error,
                f"c{i}_version": o.plugin_version,
                f"c{i}_finished": o.finished_at,
            }
        )
    return params


def _wait(sock: int, deadline: float, write: bool = False) -> None:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("PostgreSQL did not answer")
    select.select([] if write else [sock], [sock] if write else [], [], left)


def _now() -> datetime:
    return datetime.now(timezone.utc)
