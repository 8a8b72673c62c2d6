"""Workflow definitions (versioned), runs and step runs, in the host's database."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel
from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Connection,
    DateTime,
    Engine,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    and_,
    delete,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.exc import DBAPIError, IntegrityError

from pluginhost import StoreUnavailable
from pluginhost.store import migrate

from .errors import WorkflowNotFound
from .hotpath import Outcome, PgHotPath

T = TypeVar("T")
MIGRATIONS = Path(__file__).with_name("migrations")

#: Step states. ``pending`` -> ``running`` -> ``succeeded`` | ``skipped`` | ``failed``;
#: steps after a failure become ``cancelled``.
STEP_STATES = ("pending", "running", "succeeded", "skipped", "failed", "cancelled")
RUN_STATES = ("pending", "running", "succeeded", "failed")
DONE = ("succeeded", "skipped")

metadata = MetaData()
definitions = Table(
    "workflows_definitions",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("definition", JSON, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("actor", Text),
)
runs = Table(
    "workflows_runs",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("name", String(64), nullable=False),
    Column("version", Integer, nullable=False),
    Column("status", String(16), nullable=False),
    Column("input", JSON, nullable=False),
    Column("context", JSON, nullable=False),
    Column("output", JSON),
    Column("error", Text),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("started_at", DateTime(timezone=True)),
    Column("finished_at", DateTime(timezone=True)),
)
steps = Table(
    "workflows_steps",
    metadata,
    Column("run_id", String(64), ForeignKey("workflows_runs.id", ondelete="CASCADE"), primary_key=True),
    Column("position", Integer, primary_key=True),
    Column("stage", Integer, nullable=False),
    Column("slug", String(64), nullable=False),
    Column("status", String(16), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("error", Text),
    Column("output", JSON),
    Column("plugin_version", BigInteger),
    Column("worker", Text),
    Column("started_at", DateTime(timezone=True)),
    Column("finished_at", DateTime(timezone=True)),
)


class StepRun(BaseModel):
    """One step of one run."""

    position: int
    stage: int
    slug: str
    status: str
    attempts: int
    error: str | None = None
    output: dict[str, Any] | None = None
    plugin_version: int | None = None
    worker: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None

    @property
    def duration_s(self) -> float | None:
        if self.started_at and self.finished_at:
            return (self.finished_at - self.started_at).total_seconds()
        return None


class WorkflowRun(BaseModel):
    """A run of a workflow and its steps."""

    id: str
    name: str
    version: int
    status: str
    input: dict[str, Any]
    context: dict[str, Any]
    output: dict[str, Any] | None = None
    error: str | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    steps: list[StepRun] = []

    @property
    def duration_s(self) -> float | None:
        if self.started_at and self.finished_at:
            return (self.finished_at - self.started_at).total_seconds()
        return None


class WorkflowStore:
    """SQL access for the workflows package (SQLite and PostgreSQL)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        # PostgreSQL: the per-run and per-step writes bypass SQLAlchemy (hotpath.py)
        self._hot = PgHotPath(engine) if engine.dialect.name == "postgresql" else None

    def migrate(self) -> None:
        self._guard(lambda: migrate(self.engine, MIGRATIONS, "workflows_alembic_version"))

    # -- definitions -----------------------------------------------------------

    def define(self, name: str, definition: dict[str, Any], actor: str | None) -> int:
        """Store a new version unless it equals the newest; returns the version."""

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

        return self._one(read)

    def newest(self, name: str) -> tuple[int, datetime] | None:
        """The newest version number of a definition and when it was stored (one
        indexed read): together they name a stored definition, even across a store
        that was emptied and defined again."""
        if self._hot is not None:
            return self._hot.newest(name)

        def read(conn: Connection) -> tuple[int, datetime] | None:
            row = conn.execute(
                select(definitions.c.version, definitions.c.created_at)
                .where(definitions.c.name == name)
                .order_by(definitions.c.version.desc())
                .limit(1)
            ).first()
            return (int(row.version), row.created_at) if row else None

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
        self, run_id: str, name: str, version: int, input: dict[str, Any], layout: Iterable[tuple[int, int, str]]
    ) -> bool:
        """Insert a run and its pending steps; False if the run already exists (redelivery)."""
        if self._hot is not None:
            return self._hot.create_run(run_id, name, version, input, layout, _now())

        def write(conn: Connection) -> bool:
            conn.execute(
                insert(runs).values(
                    id=run_id, name=name, version=version, status="pending", input=input,
                    context=input, created_at=_now(),
                )
            )
            conn.execute(
                insert(steps),
                [
                    {"run_id": run_id, "position": pos, "stage": stage, "slug": slug, "status": "pending", "attempts": 0}
                    for pos, stage, slug in layout
                ],
            )
            return True

        try:
            return self._write(write)
        except IntegrityError:
            return False

    def create_newest_run(
        self, run_id: str, name: str, version: int, stored_at: datetime, input: dict[str, Any],
        layout: Iterable[tuple[int, int, str]],
    ) -> tuple[int, datetime] | None:
        """Insert a run of ``version`` (the definition stored at ``stored_at``) and
        its pending steps if that is still the newest version of ``name``. Returns
        the newest (version, stored_at), None if there is none: the run was
        inserted, or existed already, when they are the ones given."""
        if self._hot is not None:
            return self._hot.create_newest_run(run_id, name, version, stored_at, input, layout, _now())
        newest = self.newest(name)
        if newest == (version, stored_at):
            self.create_run(run_id, name, version, input, layout)
        return newest

    def begin_step(
        self, run_id: str, position: int, worker: str | None, *, first: bool = False,
        carried: list[Outcome] | None = None,
    ) -> StepRun:
        """Mark a step running (one more attempt) unless it already finished.

        One statement on the common path. The returned row says what to do: a
        ``succeeded``/``skipped`` row is a duplicate delivery, whose recorded
        output is reused instead of running again. ``first`` (a step of the
        first stage) also moves the run from pending to running. ``carried``:
        outcomes of earlier steps sent with ``post_step``, recorded here too.
        """

        if self._hot is not None:
            found = self._hot.begin_step(run_id, position, worker, first, _now(), carried)
            if found is None:
                raise WorkflowNotFound(f"run {run_id!r} has no step at position {position}")
            pos, stage, slug, status, attempts, output = found
            return StepRun.model_construct(
                position=pos, stage=stage, slug=slug, status=status, attempts=attempts, output=output
            )

        def write(conn: Connection) -> StepRun:
            now = _now()
            _record_carried(conn, run_id, carried or [])
            row = conn.execute(
                update(steps)
                .where(steps.c.run_id == run_id, steps.c.position == position)
                .where(steps.c.status.in_(("pending", "running")))
                .values(status="running", attempts=steps.c.attempts + 1, started_at=now, worker=worker, error=None)
                .returning(*steps.c)
            ).first()
            if row is None:
                row = conn.execute(select(steps).where(steps.c.run_id == run_id, steps.c.position == position)).first()
                if row is None:
                    raise WorkflowNotFound(f"run {run_id!r} has no step at position {position}")
            elif first:
                conn.execute(
                    update(runs).where(runs.c.id == run_id, runs.c.status == "pending").values(status="running", started_at=now)
                )
            return StepRun.model_validate(dict(row._mapping))

        return self._one(write)

    def finish_step(
        self,
        run_id: str,
        position: int,
        status: str,
        *,
        output: dict[str, Any] | None = None,
        error: str | None = None,
        plugin_version: int | None = None,
        run_output: dict[str, Any] | None = None,
    ) -> str | None:
        """Record a step's outcome (one statement). With ``run_output`` (the last
        step of a run) also record the run's success, and return its workflow's name."""
        if self._hot is not None:
            return self._hot.finish_step(run_id, position, status, output, error, plugin_version, _now(), run_output)
        self._one(
            lambda conn: conn.execute(
                update(steps)
                .where(steps.c.run_id == run_id, steps.c.position == position)
                .values(status=status, output=output, error=error, plugin_version=plugin_version, finished_at=_now())
            )
        )
        return None if run_output is None else self.finish_run(run_id, run_output)

    def post_step(
        self,
        run_id: str,
        position: int,
        status: str,
        *,
        output: dict[str, Any] | None = None,
        error: str | None = None,
        plugin_version: int | None = None,
    ) -> Outcome | None:
        """Record a step's outcome without waiting for the write where the store
        allows it (PostgreSQL). Returns the outcome then, which the next task
        records again (``begin_step``/``finish_stage`` ``carried=``); None when it
        is recorded already (SQLite: written here)."""
        if self._hot is None:
            self.finish_step(run_id, position, status, output=output, error=error, plugin_version=plugin_version)
            return None
        outcome: Outcome = [position, status, output, error, plugin_version, _now().isoformat()]
        self._hot.post_step(outcome, run_id)
        return outcome

    def finish_stage(self, run_id: str, carried: list[Outcome], output: dict[str, Any]) -> str:
        """A last parallel stage done: its branches' carried outcomes and the run's
        success (one statement on PostgreSQL); returns the workflow's name."""
        if not carried:
            return self.finish_run(run_id, output)
        if self._hot is not None:
            return self._hot.finish_stage(run_id, carried, output, _now())
        self._write(lambda conn: _record_carried(conn, run_id, carried))
        return self.finish_run(run_id, output)

    def retry_step(self, run_id: str, position: int, error: str) -> None:
        """A failed attempt that will be retried: back to pending, error kept."""
        self._write(
            lambda conn: conn.execute(
                update(steps)
                .where(steps.c.run_id == run_id, steps.c.position == position)
                .values(status="pending", error=error, finished_at=_now())
            )
        )

    def fail_run(self, run_id: str, position: int, error: str, plugin_version: int | None = None) -> str:
        """A step failed for good: record it, cancel the steps of later stages, fail
        the run; returns the workflow's name."""

        def write(conn: Connection) -> str:
            now = _now()
            stage = conn.execute(
                select(steps.c.stage).where(steps.c.run_id == run_id, steps.c.position == position)
            ).scalar_one()
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
            return str(
                conn.execute(
                    update(runs)
                    .where(runs.c.id == run_id)
                    .values(status="failed", error=error, finished_at=now)
                    .returning(runs.c.name)
                ).scalar_one()
            )

        return self._write(write)

    def finish_run(self, run_id: str, output: dict[str, Any]) -> str:
        """Record a run's success (one statement); returns the workflow's name."""
        if self._hot is not None:
            return self._hot.finish_run(run_id, output, _now())
        return str(
            self._one(
                lambda conn: conn.execute(
                    update(runs)
                    .where(runs.c.id == run_id)
                    # a duplicate of the last step must not move the end time
                    .values(
                        status="succeeded", context=output, output=output, error=None,
                        finished_at=func.coalesce(runs.c.finished_at, _now()),
                    )
                    .returning(runs.c.name)
                ).scalar_one()
            )
        )

    def get_run(self, run_id: str) -> WorkflowRun | None:
        def read(conn: Connection) -> WorkflowRun | None:
            row = conn.execute(select(runs).where(runs.c.id == run_id)).first()
            if row is None:
                return None
            rows = conn.execute(select(steps).where(steps.c.run_id == run_id).order_by(steps.c.position))
            return WorkflowRun.model_validate(
                {**dict(row._mapping), "steps": [dict(s._mapping) for s in rows]}
            )

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
        """Failed and cancelled steps back to pending, the run back to running.

        Returns the stage to start from, the context before it (the input merged
        with every earlier step's output in declaration order) and the recorded
        outputs of that stage's finished steps (a parallel stage may be half done).
        """

        def write(conn: Connection) -> tuple[int, dict[str, Any], dict[int, dict[str, Any]]]:
            run_input = conn.execute(select(runs.c.input).where(runs.c.id == run_id)).scalar_one()
            rows = conn.execute(
                select(steps.c.position, steps.c.stage, steps.c.status, steps.c.output)
                .where(steps.c.run_id == run_id)
                .order_by(steps.c.position)
            ).all()
            todo = [r.stage for r in rows if r.status not in DONE]
            stage = min(todo) if todo else (rows[-1].stage + 1 if rows else 0)
            context = dict(run_input)
            for r in rows:
                if r.stage < stage and r.status == "succeeded" and r.output:
                    context.update(r.output)
            done = {r.position: dict(r.output or {}) for r in rows if r.stage == stage and r.status in DONE}
            conn.execute(
                update(steps)
                .where(steps.c.run_id == run_id, steps.c.status.in_(("failed", "cancelled", "running")))
                .values(status="pending", finished_at=None)
            )
            conn.execute(
                update(runs).where(runs.c.id == run_id).values(status="running", error=None, finished_at=None)
            )
            return stage, context, done

        return self._write(write)

    def stale_steps(self, older_than_s: float) -> list[tuple[str, int, str]]:
        """(run id, position, slug) of steps marked running for longer than ``older_than_s``."""

        def read(conn: Connection) -> list[tuple[str, int, str]]:
            cutoff = _now() - timedelta(seconds=older_than_s)
            q = select(steps.c.run_id, steps.c.position, steps.c.slug).where(
                steps.c.status == "running", steps.c.started_at < cutoff
            )
            return [(r.run_id, int(r.position), r.slug) for r in conn.execute(q)]

        return self._read(read)

    def stalled_steps(self, older_than_s: float) -> list[tuple[str, int, str]]:
        """(run id, position, slug) of the first unfinished step of each pending or
        running run created over ``older_than_s`` ago in which no step is running and
        none started or finished within ``older_than_s``: the message that would
        have moved it on was lost (a broker restart, a lost chord callback)."""

        def read(conn: Connection) -> list[tuple[str, int, str]]:
            cutoff = _now() - timedelta(seconds=older_than_s)
            active = select(steps.c.run_id).where(
                or_(steps.c.status == "running", steps.c.started_at >= cutoff, steps.c.finished_at >= cutoff)
            )
            first_open = (
                select(steps.c.run_id, func.min(steps.c.position).label("position"))
                .join(runs, runs.c.id == steps.c.run_id)
                .where(
                    runs.c.status.in_(("pending", "running")),
                    runs.c.created_at < cutoff,
                    runs.c.id.not_in(active),
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
        """Delete finished runs (and their steps) that ended more than ``older_than_s`` ago."""

        def write(conn: Connection) -> int:
            cutoff = _now() - timedelta(seconds=older_than_s)
            old = select(runs.c.id).where(runs.c.status.in_(("succeeded", "failed")), runs.c.finished_at < cutoff)
            conn.execute(delete(steps).where(steps.c.run_id.in_(old)))
            return int(conn.execute(delete(runs).where(runs.c.id.in_(old.scalar_subquery()))).rowcount or 0)

        return self._write(write)

    # -- plumbing --------------------------------------------------------------

    def _read(self, fn: Callable[[Connection], T]) -> T:
        def run() -> T:
            with self.engine.connect() as conn:
                return fn(conn)

        return self._guard(run)

    def _one(self, fn: Callable[[Connection], T]) -> T:
        """One statement, committed as it runs: on PostgreSQL no BEGIN/COMMIT
        round trips (the hot path of every step)."""
        if self.engine.dialect.name != "postgresql":
            return self._write(fn)

        def run() -> T:
            with self.engine.connect() as conn:
                return fn(conn.execution_options(isolation_level="AUTOCOMMIT"))

        return self._guard(run)

    def _write(self, fn: Callable[[Connection], T]) -> T:
        def run() -> T:
            with self.engine.connect() as conn:
                conn = conn.execution_options(pluginhost_write=True)
                with conn.begin():
                    return fn(conn)

        return self._guard(run)

    def _guard(self, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except IntegrityError:
            raise
        except DBAPIError as exc:
            reason = str(getattr(exc, "orig", exc)).strip().splitlines()
            raise StoreUnavailable(f"workflow store unreachable: {reason[0] if reason else exc}") from None


def _record_carried(conn: Connection, run_id: str, carried: list[Outcome]) -> None:
    """Outcomes sent by ``post_step``, recorded unless the step moved on already."""
    for position, status, output, error, plugin_version, finished_at in carried:
        conn.execute(
            update(steps)
            .where(steps.c.run_id == run_id, steps.c.position == position)
            .where(steps.c.status.in_(("pending", "running")))
            .values(
                status=status, output=output, error=error, plugin_version=plugin_version,
                finished_at=datetime.fromisoformat(finished_at),
            )
        )


def _now() -> datetime:
    return datetime.now(timezone.utc)
