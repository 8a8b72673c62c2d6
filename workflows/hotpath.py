"""The per-step writes on PostgreSQL, without SQLAlchemy on the hot path.

Every step of every run writes its history twice (running, then its outcome)
and every start inserts a run with its steps. Through SQLAlchemy (pool
checkout with a pre-ping, statement compilation, result rows, a transaction)
each write cost 1-2.5 ms on the benchmark machine, while the statement itself
takes 0.15-0.35 ms. Here each write is one server-side prepared statement on a
psycopg connection kept per thread in autocommit: one round trip, one commit.

A step's outcome is sent without waiting for its answer (``post_step``) when a
later task records it again: the step returns it with its context, and the
next step's running mark (or the parallel stage's merge) writes it in the same
statement, where it changes nothing if the first write landed. The answer is
read before the connection's next statement. So a step costs one round trip
the worker waits for, and an outcome is never only in a lost write: until the
next task has recorded it, it travels in that task's message.

Same tables, same semantics as the SQLAlchemy versions in ``store.py``, which
SQLite uses (there every write is waited for and nothing is carried).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import select
import threading
import time
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import Engine

from pluginhost import StoreUnavailable

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
_BEGIN_STEP = """
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
            SELECT 1 FROM workflows_runs WHERE id = %(run_id)s AND status IN ('pending', 'running')
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

_FINISH_RUN = """
UPDATE workflows_runs
SET status = 'succeeded', context = %(context)s::json, output = %(context)s::json, error = NULL,
    finished_at = coalesce(finished_at, %(now)s)
WHERE id = %(run_id)s
RETURNING name
"""

# The last step's outcome and the run's success in one statement.
_FINISH_LAST_STEP = f"WITH s AS ({_FINISH_STEP}) {_FINISH_RUN}"


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
    INSERT INTO workflows_runs (id, name, version, status, input, context, created_at)
    VALUES (%(run_id)s, %(name)s, %(version)s, 'pending', %(input)s::json, %(input)s::json, %(now)s)
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
    INSERT INTO workflows_runs (id, name, version, status, input, context, created_at)
    SELECT %(run_id)s, %(name)s, d.version, 'pending', %(input)s::json, %(input)s::json, %(now)s
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


# How long reading the answer of an outcome sent without waiting may take
# before the connection is given up (the next task records the outcome anyway).
_POST_ANSWER_TIMEOUT_S = 10.0

# (position, stage, slug, status, attempts, output, task_id, the run's status)
StepRow = tuple[int, int, str, str, int, "dict[str, Any] | None", "str | None", str]
#: A step's outcome as a task carries it: position, status, output, error,
#: plugin version, finished at (ISO 8601).
Outcome = list[Any]

log = logging.getLogger("workflows")


class PgHotPath:
    """The hot workflow writes, on one kept connection per thread."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._local = threading.local()
        self._pid = os.getpid()

    def begin_step(
        self,
        run_id: str,
        position: int,
        worker: str | None,
        first: bool,
        now: datetime,
        stale_before: datetime,
        task_id: str | None,
        carried: list[Outcome] | None = None,
    ) -> tuple[StepRow | None, bool]:
        """The step's row and whether this call claimed it (see ``_BEGIN_STEP``)."""
        params = {
            "run_id": run_id,
            "position": position,
            "worker": worker,
            "first": first,
            "now": now,
            "stale_before": stale_before,
            "task_id": task_id,
        }
        if carried:
            row = self._fetch(_carrying(len(carried), _BEGIN_STEP), {**params, **_carried_params(carried)})
        else:
            row = self._fetch(_BEGIN_STEP, params)
        if row is not None:
            return (*row, "running"), True  # the claim's condition: the run is open
        return self._fetch(_STEP_ROW, params), False

    def post_step(self, outcome: Outcome, run_id: str) -> None:
        """Send a step's outcome and return without waiting for the answer (read
        before this connection's next statement). A failure is logged, not
        raised: the task that carries the outcome records it."""
        position, status, output, error, plugin_version, finished_at = outcome
        values = [
            status.encode(),
            None if output is None else json.dumps(output).encode(),
            None if error is None else error.encode(),
            None if plugin_version is None else str(plugin_version).encode(),
            finished_at.encode(),
            run_id.encode(),
            str(position).encode(),
        ]
        try:
            self._cursor()  # drains an earlier answer; (re)connects if needed
            local = self._local
            if not local.post_prepared:
                from psycopg.errors import DuplicatePreparedStatement

                try:
                    local.cursor.execute(_POST_STEP)
                except DuplicatePreparedStatement:  # a pooled connection that prepared it before
                    pass
                local.post_prepared = True
            pgconn = local.raw.driver_connection.pgconn
            pgconn.send_query_prepared(_POST_STEP_NAME, values)
            deadline = time.monotonic() + _POST_ANSWER_TIMEOUT_S
            while pgconn.flush():  # 1: not all sent yet (a nonblocking connection)
                _wait(pgconn.socket, deadline, write=True)
            local.pending = pgconn
        except Exception as exc:  # noqa: BLE001 - the outcome is carried on; say why it was not sent
            log.warning(
                "step %d of run %s: outcome not sent (the next task records it): %s", position, run_id, _reason(exc)
            )
            self._drop()

    def finish_stage(self, run_id: str, carried: list[Outcome], output: dict[str, Any], now: datetime) -> str:
        """A last parallel stage: its branches' outcomes and the run's success."""
        params = {"run_id": run_id, "context": json.dumps(output), "now": now, **_carried_params(carried)}
        return self._name(_carrying(len(carried), _FINISH_RUN), params)

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
            "run_id": run_id,
            "position": position,
            "status": status,
            "error": error,
            "output": None if output is None else json.dumps(output),
            "plugin_version": plugin_version,
            "now": now,
        }
        if run_output is None:
            self._execute(_FINISH_STEP, params)
            return None
        params["context"] = json.dumps(run_output)
        return self._name(_FINISH_LAST_STEP, params)

    def finish_run(self, run_id: str, output: dict[str, Any], now: datetime) -> str:
        return self._name(_FINISH_RUN, {"run_id": run_id, "context": json.dumps(output), "now": now})

    def create_run(
        self,
        run_id: str,
        name: str,
        version: int,
        input: dict[str, Any],
        layout: Iterable[tuple[int, int, str]],
        now: datetime,
    ) -> bool:
        steps = list(layout)
        params = {
            "run_id": run_id,
            "name": name,
            "version": version,
            "input": json.dumps(input),
            "now": now,
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
        layout: Iterable[tuple[int, int, str]],
        now: datetime,
    ) -> tuple[tuple[int, datetime], bool] | None:
        """Insert a run of ``version`` (stored at ``stored_at``) if that is still the
        newest definition; returns the newest (version, stored_at) and whether the
        run was inserted here, or None if there is no definition."""
        steps = list(layout)
        params = {
            "run_id": run_id,
            "name": name,
            "version": version,
            "stored_at": stored_at,
            "input": json.dumps(input),
            "now": now,
            **_layout_params(steps),
        }
        row = self._fetch(_with_steps(_CREATE_NEWEST_RUN, len(steps)), params)
        return None if row is None else ((int(row[0]), row[1]), int(row[2]) > 0)

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
        if getattr(self._local, "pending", None) is not None:
            self._drain()
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
            self._local.post_prepared = False
        return cursor

    def _drain(self) -> None:
        """Read the answer of the outcome ``post_step`` sent (it has usually
        arrived by now). A failed write is logged; a connection that does not
        answer in time is given up."""
        pgconn, self._local.pending = self._local.pending, None
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
            log.warning("no answer to a step outcome sent without waiting (the next task records it): %s", _reason(exc))
            self._drop()

    def _drop(self) -> None:
        self._local.pending = None
        raw = getattr(self._local, "raw", None)
        self._local.raw = self._local.cursor = None
        if raw is not None:
            try:
                raw.invalidate()
            except Exception:  # already gone
                pass


def _carried_params(carried: list[Outcome]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for i, (position, status, output, error, plugin_version, finished_at) in enumerate(carried):
        params.update(
            {
                f"c{i}_position": position,
                f"c{i}_status": status,
                f"c{i}_output": None if output is None else json.dumps(output),
                f"c{i}_error": error,
                f"c{i}_version": plugin_version,
                f"c{i}_finished": datetime.fromisoformat(finished_at),
            }
        )
    return params


def _wait(sock: int, deadline: float, write: bool = False) -> None:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("PostgreSQL did not answer")
    select.select([] if write else [sock], [sock] if write else [], [], left)


def _reason(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
