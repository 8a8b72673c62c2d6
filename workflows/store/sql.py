"""The workflow store on SQLite (and any other SQLAlchemy dialect but PostgreSQL).

Every call is SQLAlchemy Core on the host store's engine: a write is one
transaction (``BEGIN IMMEDIATE`` on SQLite, which serialises writers, so a
read-modify-write is atomic); every write is waited for, so a step outcome
``post_step`` writes is recorded before the next task starts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any, TypeVar

from sqlalchemy import Connection, and_, delete, func, insert, or_, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError

from pluginhost import StoreUnavailable

from ..errors import RunNotFound, WorkflowNotFound
from ..owner import local_owner, local_owner_alive
from .base import Claim, ClaimAsk, Layout, WorkflowStore, refuse, resume_point, unreachable
from .outcome import Outcome
from .records import CANCELLABLE_RUN_STATES, DONE, FINISHED_RUN_STATES, OPEN_RUN_STATES, StepRun, WorkflowRun
from .schema import definitions, runs, signals, steps, waits

T = TypeVar("T")
log = logging.getLogger("workflows")


class SqlWorkflowStore(WorkflowStore):
    """The workflow tables through SQLAlchemy (SQLite)."""

    # -- definitions -----------------------------------------------------------

    def define(self, name: str, definition: dict[str, Any], actor: str | None) -> int:
        def write(conn: Connection) -> int:
            latest = conn.execute(
                select(definitions.c.version, definitions.c.definition)
                .where(definitions.c.name == name)
                .order_by(definitions.c.version.desc())
                .limit(1)
            ).first()
            if latest is not None and latest.definition == definition:
                return int(latest.version)
            version = (latest.version if latest else 0) + 1
            conn.execute(
                insert(definitions).values(
                    name=name, version=version, definition=definition, created_at=_now(), actor=actor
                )
            )
            return version

        return self._write(write)

    def definition(self, name: str, version: int | None = None) -> tuple[int, dict[str, Any]] | None:
        def read(conn: Connection) -> tuple[int, dict[str, Any]] | None:
            q = select(definitions.c.version, definitions.c.definition).where(definitions.c.name == name)
            if version is None:
                q = q.order_by(definitions.c.version.desc()).limit(1)
            else:
                q = q.where(definitions.c.version == version)
            row = conn.execute(q).first()
            return (int(row.version), row.definition) if row else None

        return self._read(read)

    def newest(self, name: str) -> tuple[int, datetime] | None:
        def read(conn: Connection) -> tuple[int, datetime] | None:
            row = conn.execute(
                select(definitions.c.version, definitions.c.created_at)
                .where(definitions.c.name == name)
                .order_by(definitions.c.version.desc())
                .limit(1)
            ).first()
            return (int(row.version), _aware(row.created_at)) if row else None

        return self._read(read)

    def history(self, name: str) -> list[tuple[int, datetime, str | None]]:
        def read(conn: Connection) -> list[tuple[int, datetime, str | None]]:
            q = (
                select(definitions.c.version, definitions.c.created_at, definitions.c.actor)
                .where(definitions.c.name == name)
                .order_by(definitions.c.version.desc())
            )
            return [(int(r.version), r.created_at, r.actor) for r in conn.execute(q)]

        return self._read(read)

    def latest_definitions(self) -> list[tuple[int, dict[str, Any]]]:
        def read(conn: Connection) -> list[tuple[int, dict[str, Any]]]:
            newest = (
                select(definitions.c.name, func.max(definitions.c.version).label("v"))
                .group_by(definitions.c.name)
                .subquery()
            )
            q = (
                select(definitions.c.version, definitions.c.definition)
                .join(newest, and_(definitions.c.name == newest.c.name, definitions.c.version == newest.c.v))
                .order_by(definitions.c.name)
            )
            return [(int(r.version), r.definition) for r in conn.execute(q)]

        return self._read(read)

    # -- runs ------------------------------------------------------------------

    def create_run(
        self, run_id: str, name: str, version: int, input: dict[str, Any], layout: Layout, key: str | None = None
    ) -> bool:
        try:
            self._write(lambda conn: _insert_run(conn, run_id, name, version, input, layout, key))
        except IntegrityError:
            return False
        return True

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
        def write(conn: Connection) -> tuple[tuple[int, datetime] | None, bool]:
            row = conn.execute(
                select(definitions.c.version, definitions.c.created_at)
                .where(definitions.c.name == name)
                .order_by(definitions.c.version.desc())
                .limit(1)
            ).first()
            newest = (int(row.version), _aware(row.created_at)) if row else None
            if newest != (version, _aware(stored_at)):
                return newest, False
            exists = conn.execute(select(runs.c.id).where(runs.c.id == run_id)).first()
            if exists is not None:
                return newest, False
            _insert_run(conn, run_id, name, version, input, layout, key)
            return newest, True

        return self._write(write)

    def _claim(self, ask: ClaimAsk) -> Claim:
        me = local_owner()
        run_id, position, now = ask.run_id, ask.position, ask.now

        def write(conn: Connection) -> Claim:
            record_carried(conn, run_id, ask.carried)
            where = (steps.c.run_id == run_id, steps.c.position == position)
            found = conn.execute(select(steps, runs.c.status.label("run_status")).join(runs).where(*where)).first()
            if found is None:
                return Claim(None, False, None)
            row = _step(found._mapping)
            run_status = found.run_status
            if row.status not in ("pending", "running") or run_status not in OPEN_RUN_STATES:
                return Claim(row, False, run_status)  # committed: the carried outcomes stay written
            if row.status == "running" and _held(row, me, ask.stale_before):
                return Claim(row, False, run_status)
            # Conditional on the row as read: of two claims that race, one wins
            # and the other sees the winner's claim (busy), whatever the engine's
            # transaction mode.
            claimed = conn.execute(
                update(steps)
                .where(*where, steps.c.status == row.status, steps.c.attempts == row.attempts)
                .values(
                    status="running",
                    attempts=steps.c.attempts + 1,
                    started_at=now,
                    worker=ask.worker,
                    error=None,
                    owner=me,
                    task_id=ask.task_id,
                )
                .returning(*steps.c)
            ).first()
            if claimed is None:
                return Claim(_step(conn.execute(select(steps).where(*where)).one()._mapping), False, run_status)
            if ask.first:
                conn.execute(
                    update(runs)
                    .where(runs.c.id == run_id, runs.c.status == "pending")
                    .values(status="running", started_at=now)
                )
            return Claim(_step(claimed._mapping), True, run_status)

        return self._write(write)

    def release_step(self, run_id: str, position: int) -> None:
        self._write(
            lambda conn: conn.execute(
                update(steps)
                .where(steps.c.run_id == run_id, steps.c.position == position)
                .where(steps.c.status == "running")
                .values(status="pending")
            )
        )

    def _finish_step(self, run_id: str, outcome: Outcome, run_output: dict[str, Any] | None) -> str | None:
        def write(conn: Connection) -> str | None:
            conn.execute(
                update(steps)
                .where(steps.c.run_id == run_id, steps.c.position == outcome.position)
                .values(
                    status=outcome.status,
                    output=outcome.output,
                    error=outcome.error,
                    plugin_version=outcome.plugin_version,
                    finished_at=outcome.finished_at,
                )
            )
            return None if run_output is None else _finish_run(conn, run_id, run_output)

        return self._write(write)

    def post_step(self, run_id: str, outcome: Outcome) -> None:
        try:
            self._write(lambda conn: record_carried(conn, run_id, [outcome]))
        except StoreUnavailable as exc:
            log.warning(
                "step %s of run %s: outcome not written (the next task records it): %s", outcome.position, run_id, exc
            )

    def _finish_stage(self, run_id: str, carried: list[Outcome], output: dict[str, Any]) -> str:
        def write(conn: Connection) -> str:
            record_carried(conn, run_id, carried)
            return _finish_run(conn, run_id, output)

        return self._write(write)

    def retry_step(self, run_id: str, position: int, error: str) -> None:
        self._write(
            lambda conn: conn.execute(
                update(steps)
                .where(steps.c.run_id == run_id, steps.c.position == position)
                .values(status="pending", error=error, finished_at=_now())
            )
        )

    def fail_run(self, run_id: str, position: int, error: str, plugin_version: int | None = None) -> str:
        def write(conn: Connection) -> str:
            now = _now()
            stage = conn.execute(
                select(steps.c.stage).where(steps.c.run_id == run_id, steps.c.position == position)
            ).scalar()
            if stage is None:
                raise WorkflowNotFound(f"run {run_id!r} has no step at position {position}")
            conn.execute(
                update(steps)
                .where(steps.c.run_id == run_id, steps.c.position == position)
                .values(status="failed", error=error, plugin_version=plugin_version, finished_at=now)
            )
            conn.execute(
                update(steps)
                .where(steps.c.run_id == run_id, steps.c.stage > stage, steps.c.status == "pending")
                .values(status="cancelled", finished_at=now)
            )
            name = conn.execute(
                update(runs)
                .where(runs.c.id == run_id, runs.c.status.not_in(("succeeded", "cancelled")))
                .values(
                    status="failed",
                    error=func.coalesce(runs.c.error, error),
                    finished_at=func.coalesce(runs.c.finished_at, now),
                )
                .returning(runs.c.name)
            ).scalar()
            if name is None:
                name = conn.execute(select(runs.c.name).where(runs.c.id == run_id)).scalar_one()
            return str(name)

        return self._write(write)

    def finish_run(self, run_id: str, output: dict[str, Any]) -> str:
        return self._write(lambda conn: _finish_run(conn, run_id, output))

    def cancel_run(self, run_id: str, actor: str | None, *, running: bool = False) -> list[str]:
        def write(conn: Connection) -> list[str]:
            now = _now()
            taken = conn.execute(
                update(runs)
                .where(runs.c.id == run_id, runs.c.status.in_(CANCELLABLE_RUN_STATES))
                .values(status="cancelled", cancelled_by=actor, finished_at=now)
                .returning(runs.c.id)
            ).first()
            if taken is None:
                status = conn.execute(select(runs.c.status).where(runs.c.id == run_id)).scalar()
                refuse(run_id, status, only="unfinished", action="cancelled", unless="cancelled")
            else:
                conn.execute(
                    update(steps)
                    .where(steps.c.run_id == run_id, steps.c.status == "pending")
                    .values(status="cancelled", finished_at=now)
                )
                conn.execute(
                    update(waits)
                    .where(waits.c.run_id == run_id, waits.c.status.in_(("waiting", "claimed")))
                    .values(status="cancelled", woke_at=now)
                )
            busy = select(steps.c.task_id).where(steps.c.run_id == run_id, steps.c.status == "running")
            task_ids = [str(t) for (t,) in conn.execute(busy) if t]
            if running:
                conn.execute(
                    update(steps)
                    .where(steps.c.run_id == run_id, steps.c.status == "running")
                    .values(status="cancelled", finished_at=now)
                )
            return task_ids

        return self._write(write)

    def get_run(self, run_id: str) -> WorkflowRun | None:
        def read(conn: Connection) -> WorkflowRun | None:
            row = conn.execute(select(runs).where(runs.c.id == run_id)).first()
            if row is None:
                return None
            rows = conn.execute(select(steps).where(steps.c.run_id == run_id).order_by(steps.c.position))
            return WorkflowRun.model_validate({**dict(row._mapping), "steps": [dict(s._mapping) for s in rows]})

        return self._read(read)

    def list_runs(self, name: str | None, status: str | None, limit: int) -> list[WorkflowRun]:
        def read(conn: Connection) -> list[WorkflowRun]:
            q = select(runs).order_by(runs.c.created_at.desc()).limit(limit)
            if name is not None:
                q = q.where(runs.c.name == name)
            if status is not None:
                q = q.where(runs.c.status == status)
            return [WorkflowRun.model_validate(dict(r._mapping)) for r in conn.execute(q)]

        return self._read(read)

    def reset_for_resume(self, run_id: str) -> tuple[int, dict[str, Any], dict[int, dict[str, Any]]]:
        def write(conn: Connection) -> tuple[int, dict[str, Any], dict[int, dict[str, Any]]]:
            taken = conn.execute(
                update(runs)
                .where(runs.c.id == run_id, runs.c.status == "failed")
                .values(status="running", error=None, finished_at=None)
                .returning(runs.c.input)
            ).first()
            if taken is None:
                status = conn.execute(select(runs.c.status).where(runs.c.id == run_id)).scalar()
                refuse(run_id, status, only="failed", action="resumed")
                raise AssertionError("refuse() raises for a run that is not failed")
            rows = conn.execute(
                select(steps.c.position, steps.c.stage, steps.c.status, steps.c.output)
                .where(steps.c.run_id == run_id)
                .order_by(steps.c.position)
            ).all()
            found = resume_point(taken.input, [tuple(r) for r in rows])  # type: ignore[misc]
            conn.execute(
                update(steps)
                .where(steps.c.run_id == run_id, steps.c.status.in_(("failed", "cancelled", "running")))
                .values(status="pending", finished_at=None)
            )
            return found

        return self._write(write)

    def stale_steps(self, older_than_s: float) -> list[tuple[str, int, str]]:
        def read(conn: Connection) -> list[tuple[str, int, str]]:
            cutoff = _now() - timedelta(seconds=older_than_s)
            q = (
                select(steps.c.run_id, steps.c.position, steps.c.slug)
                .join(runs, runs.c.id == steps.c.run_id)
                .where(steps.c.status == "running", steps.c.started_at < cutoff)
                .where(runs.c.status.in_(OPEN_RUN_STATES))
            )
            return [(r.run_id, int(r.position), r.slug) for r in conn.execute(q)]

        return self._read(read)

    def stalled_steps(self, older_than_s: float) -> list[tuple[str, int, str]]:
        def read(conn: Connection) -> list[tuple[str, int, str]]:
            cutoff = _now() - timedelta(seconds=older_than_s)
            active = select(steps.c.run_id).where(
                or_(steps.c.status == "running", steps.c.started_at >= cutoff, steps.c.finished_at >= cutoff)
            )
            woken = select(waits.c.run_id).where(or_(waits.c.claimed_at >= cutoff, waits.c.woke_at >= cutoff))
            first_open = (
                select(steps.c.run_id, func.min(steps.c.position).label("position"))
                .join(runs, runs.c.id == steps.c.run_id)
                .where(
                    runs.c.status.in_(OPEN_RUN_STATES),
                    runs.c.created_at < cutoff,
                    runs.c.id.not_in(active),
                    runs.c.id.not_in(woken),
                    steps.c.status.not_in(DONE),
                )
                .group_by(steps.c.run_id)
                .subquery()
            )
            q = select(steps.c.run_id, steps.c.position, steps.c.slug).join(
                first_open,
                and_(steps.c.run_id == first_open.c.run_id, steps.c.position == first_open.c.position),
            )
            return [(r.run_id, int(r.position), r.slug) for r in conn.execute(q)]

        return self._read(read)

    def prune(self, older_than_s: float) -> int:
        def write(conn: Connection) -> int:
            cutoff = _now() - timedelta(seconds=older_than_s)
            old = select(runs.c.id).where(runs.c.status.in_(FINISHED_RUN_STATES), runs.c.finished_at < cutoff)
            # SQLite enforces no foreign keys unless asked: delete the children too.
            for child in (steps, waits, signals):
                conn.execute(delete(child).where(child.c.run_id.in_(old)))
            return int(conn.execute(delete(runs).where(runs.c.id.in_(old.scalar_subquery()))).rowcount or 0)

        return self._write(write)

    # -- plumbing --------------------------------------------------------------

    def _read(self, fn: Callable[[Connection], T]) -> T:
        def run() -> T:
            with self.engine.connect() as conn:
                return fn(conn)

        return _guard(run)

    def _write(self, fn: Callable[[Connection], T]) -> T:
        """One transaction (``BEGIN IMMEDIATE`` on SQLite: writers serialise)."""

        def run() -> T:
            with self.engine.connect() as conn:
                conn = conn.execution_options(pluginhost_write=True)
                with conn.begin():
                    return fn(conn)

        return _guard(run)


def _guard(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except IntegrityError:
        raise
    except DBAPIError as exc:
        raise unreachable(getattr(exc, "orig", exc)) from None


def _insert_run(
    conn: Connection, run_id: str, name: str, version: int, input: dict[str, Any], layout: Layout, key: str | None
) -> None:
    conn.execute(
        insert(runs).values(
            id=run_id,
            name=name,
            version=version,
            status="pending",
            input=input,
            context=input,
            created_at=_now(),
            key=key,
        )
    )
    conn.execute(
        insert(steps),
        [
            {"run_id": run_id, "position": pos, "stage": stage, "slug": slug, "status": "pending", "attempts": 0}
            for pos, stage, slug in layout
        ],
    )


def _finish_run(conn: Connection, run_id: str, output: dict[str, Any]) -> str:
    name = conn.execute(
        update(runs)
        .where(runs.c.id == run_id, runs.c.status != "cancelled")  # a cancelled run stays so
        # a duplicate of the last step must not move the end time
        .values(
            status="succeeded",
            context=output,
            output=output,
            error=None,
            finished_at=func.coalesce(runs.c.finished_at, _now()),
        )
        .returning(runs.c.name)
    ).scalar()
    if name is None:
        name = conn.execute(select(runs.c.name).where(runs.c.id == run_id)).scalar()
    if name is None:
        raise RunNotFound(f"workflow run {run_id!r} is gone from the store")
    return str(name)


def record_carried(conn: Connection, run_id: str, carried: list[Outcome]) -> None:
    """Outcomes sent by ``post_step``, recorded unless the step moved on already."""
    for o in carried:
        conn.execute(
            update(steps)
            .where(steps.c.run_id == run_id, steps.c.position == o.position)
            .where(steps.c.status.in_(("pending", "running")))
            .values(
                status=o.status,
                output=o.output,
                error=o.error,
                plugin_version=o.plugin_version,
                finished_at=o.finished_at,
            )
        )


def _step(mapping: Any) -> StepRun:
    return StepRun.model_validate({k: v for k, v in mapping.items() if k not in ("run_id", "run_status")})


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _held(row: StepRun, me: str, stale_before: datetime) -> bool:
    """Whether a running step's SQLite owner is another thread or process that
    still lives, with a claim newer than the lease (see ``begin_step``)."""
    if not row.owner or row.owner == me or not local_owner_alive(row.owner):
        return False
    return row.started_at is None or _aware(row.started_at) >= stale_before


def _aware(at: datetime) -> datetime:
    """SQLite hands timestamps back without their zone (they are UTC)."""
    return at if at.tzinfo is not None else at.replace(tzinfo=timezone.utc)
