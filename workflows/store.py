"""Workflow definitions (versioned), runs and step runs, in the host's database."""

from __future__ import annotations

import logging
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

from pluginhost import PluginHostError, StoreUnavailable
from pluginhost.store import migrate

from .errors import InvalidRunState, RunFinished, WorkflowNotFound
from .hotpath import Outcome, PgHotPath
from .owner import local_owner, local_owner_alive

T = TypeVar("T")
MIGRATIONS = Path(__file__).with_name("migrations")

#: Step states. ``pending`` -> ``running`` -> ``succeeded`` | ``skipped`` | ``failed``;
#: steps after a failure become ``cancelled``.
STEP_STATES = ("pending", "running", "succeeded", "skipped", "failed", "cancelled")
RUN_STATES = ("pending", "running", "succeeded", "failed")
DONE = ("succeeded", "skipped")
# A step of a run in another state (it failed or succeeded) is never claimed.
OPEN_RUN_STATES = ("pending", "running")
#: How long a running step's claim holds while its owner looks alive (see ``begin_step``).
STEP_LEASE_S = 3600.0

log = logging.getLogger("workflows")


class StepBusy(PluginHostError):
    """``begin_step``: the step is running under another owner that is alive and
    whose claim is not stale; this delivery must not run it."""


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
    Column("owner", Text),  # who holds a running step: see WorkflowStore.begin_step
    Column("task_id", Text),  # the message that claimed it last
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
    owner: str | None = None
    task_id: str | None = None

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
    """SQL access for the workflows package (SQLite and PostgreSQL).

    ``step_lease_s``: how long a running step's claim holds while its owner
    looks alive (setting ``pluginhost_workflows_step_lease_s``); see ``begin_step``.
    """

    def __init__(self, engine: Engine, *, step_lease_s: float = STEP_LEASE_S) -> None:
        self.engine = engine
        self.step_lease_s = float(step_lease_s)
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

    def history(self, name: str) -> list[tuple[int, datetime, str | None]]:
        """Every stored version of a definition, newest first: (version, when, who)."""

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
        self, run_id: str, name: str, version: int, input: dict[str, Any], layout: Iterable[tuple[int, int, str]]
    ) -> bool:
        """Insert a run and its pending steps; False if the run already exists (redelivery)."""
        if self._hot is not None:
            return self._hot.create_run(run_id, name, version, input, layout, _now())

        def write(conn: Connection) -> bool:
            conn.execute(
                insert(runs).values(
                    id=run_id,
                    name=name,
                    version=version,
                    status="pending",
                    input=input,
                    context=input,
                    created_at=_now(),
                )
            )
            conn.execute(
                insert(steps),
                [
                    {
                        "run_id": run_id,
                        "position": pos,
                        "stage": stage,
                        "slug": slug,
                        "status": "pending",
                        "attempts": 0,
                    }
                    for pos, stage, slug in layout
                ],
            )
            return True

        try:
            return self._write(write)
        except IntegrityError:
            return False

    def create_newest_run(
        self,
        run_id: str,
        name: str,
        version: int,
        stored_at: datetime,
        input: dict[str, Any],
        layout: Iterable[tuple[int, int, str]],
    ) -> tuple[tuple[int, datetime] | None, bool]:
        """Insert a run of ``version`` (the definition stored at ``stored_at``) and
        its pending steps if that is still the newest version of ``name``.

        Returns the newest (version, stored_at), None if there is none, and whether
        the run was inserted by this call. When the newest is the one given and
        nothing was inserted, the run existed already (a repeated start): it keeps
        the version and input it recorded."""
        if self._hot is not None:
            found = self._hot.create_newest_run(run_id, name, version, stored_at, input, layout, _now())
            return (None, False) if found is None else found
        newest = self.newest(name)
        inserted = newest == (version, stored_at) and self.create_run(run_id, name, version, input, layout)
        return newest, inserted

    def begin_step(
        self,
        run_id: str,
        position: int,
        worker: str | None,
        *,
        first: bool = False,
        carried: list[Outcome] | None = None,
        task_id: str | None = None,
    ) -> StepRun:
        """Claim a step: mark it running (one more attempt) unless it finished, or
        another live owner runs it.

        One statement on the common path. The returned row says what to do: a
        ``succeeded``/``skipped`` row is a duplicate delivery, whose recorded
        output is reused instead of running again. ``first`` (a step of the
        first stage) also moves the run from pending to running. ``carried``:
        outcomes of earlier steps sent with ``post_step``, recorded here too.
        ``task_id``: the claiming message's id, kept in the row (``task_id``), so
        a finished step tells a repeat of the message that ran it from a
        delivery by another canvas.

        A ``running`` step is taken over only when its owner is dead or stale,
        else ``StepBusy`` is raised. The owner is the claiming process's
        database session on PostgreSQL (its backend pid: when the process dies,
        its connections close and PostgreSQL ends their backends), and
        ``host:pid:thread`` on SQLite (a local file: the process is looked up on
        this host). Dead: that session or process is gone, or it is this very
        session/thread (which runs one task at a time, so it is done with it).
        Stale: claimed more than ``step_lease_s`` ago (default 3600 s), whatever
        the owner looks like, which bounds a hung body or an owner that cannot be
        seen to die (a vanished host whose session the server still keeps). So
        a live owner loses its step only past the lease, or with its database
        session (a process whose connection broke mid-step can be taken over
        while it still runs: steps stay at-least-once).

        No step of a run that ended (failed, succeeded) is claimed: a late or
        duplicate delivery of one raises ``RunFinished`` and writes nothing,
        until ``reset_for_resume`` opens the run again.
        """
        now = _now()
        stale_before = now - timedelta(seconds=self.step_lease_s)
        if self._hot is not None:
            found, claimed = self._hot.begin_step(run_id, position, worker, first, now, stale_before, task_id, carried)
            if found is None:
                raise WorkflowNotFound(f"run {run_id!r} has no step at position {position}")
            pos, stage, slug, status, attempts, output, claimed_by, run_status = found
            if not claimed and status in ("pending", "running") and run_status not in OPEN_RUN_STATES:
                raise RunFinished(_finished_message(run_id, position, run_status))
            if status == "running" and not claimed:
                raise StepBusy(f"step {position} of run {run_id} is running under a live owner")
            return StepRun.model_construct(
                position=pos,
                stage=stage,
                slug=slug,
                status=status,
                attempts=attempts,
                output=output,
                task_id=claimed_by,
            )

        me = local_owner()
        finished: list[str] = []

        def write(conn: Connection) -> tuple[StepRun, bool]:
            _record_carried(conn, run_id, carried or [])
            where = (steps.c.run_id == run_id, steps.c.position == position)
            row = conn.execute(select(steps).where(*where)).first()
            if row is None:
                raise WorkflowNotFound(f"run {run_id!r} has no step at position {position}")
            if row.status not in ("pending", "running"):
                return StepRun.model_validate(dict(row._mapping)), False
            run_status = conn.execute(select(runs.c.status).where(runs.c.id == run_id)).scalar()
            if run_status not in OPEN_RUN_STATES:  # raised after the commit: carried outcomes stay written
                finished.append(str(run_status))
                return StepRun.model_validate(dict(row._mapping)), False
            if row.status == "running" and _held(row, me, stale_before):
                return StepRun.model_validate(dict(row._mapping)), True
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
                    worker=worker,
                    error=None,
                    owner=me,
                    task_id=task_id,
                )
                .returning(*steps.c)
            ).first()
            if claimed is None:
                now_row = conn.execute(select(steps).where(*where)).one()
                return StepRun.model_validate(dict(now_row._mapping)), now_row.status == "running"
            if first:
                conn.execute(
                    update(runs)
                    .where(runs.c.id == run_id, runs.c.status == "pending")
                    .values(status="running", started_at=now)
                )
            return StepRun.model_validate(dict(claimed._mapping)), False

        found_row, busy = self._write(write)
        if finished:
            raise RunFinished(_finished_message(run_id, position, finished[0]))
        if busy:
            raise StepBusy(f"step {position} of run {run_id} is running under a live owner ({found_row.owner})")
        return found_row

    def release_step(self, run_id: str, position: int) -> None:
        """A claimed step given up without an outcome (its delivery is sent again):
        back to pending, so the next delivery claims it at once."""
        self._one(
            lambda conn: conn.execute(
                update(steps)
                .where(steps.c.run_id == run_id, steps.c.position == position)
                .where(steps.c.status == "running")
                .values(status="pending")
            )
        )

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

    @staticmethod
    def outcome(
        position: int,
        status: str,
        *,
        output: dict[str, Any] | None = None,
        error: str | None = None,
        plugin_version: int | None = None,
    ) -> Outcome:
        """A step's outcome as ``post_step`` writes it and the next task carries it."""
        return [position, status, output, error, plugin_version, _now().isoformat()]

    def post_step(self, run_id: str, outcome: Outcome) -> None:
        """Record a step's outcome that the next task also carries
        (``begin_step``/``finish_stage`` ``carried=``): on PostgreSQL sent without
        waiting for the answer; on SQLite written here. A failed write is logged,
        not raised: the carrying task records it."""
        if self._hot is not None:
            self._hot.post_step(outcome, run_id)
            return
        try:
            self._write(lambda conn: _record_carried(conn, run_id, [outcome]))
        except StoreUnavailable as exc:
            log.warning(
                "step %s of run %s: outcome not written (the next task records it): %s",
                outcome[0],
                run_id,
                exc,
            )

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
        the run; returns the workflow's name. A run that failed already keeps its
        first error and end time (a second branch failing, or a sweep after a
        failure, does not replace the cause); a succeeded run stays succeeded."""

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
            name = conn.execute(
                update(runs)
                .where(runs.c.id == run_id, runs.c.status != "succeeded")
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
                        status="succeeded",
                        context=output,
                        output=output,
                        error=None,
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
        """Failed and cancelled steps back to pending, the run back to running.

        Returns the stage to start from, the context before it (the input merged
        with every earlier step's output in declaration order) and the recorded
        outputs of that stage's finished steps (a parallel stage may be half done).
        The run moves from failed to running first, in one conditional update: of
        two concurrent resumes one gets the run, the other ``InvalidRunState``.
        """

        def write(conn: Connection) -> tuple[int, dict[str, Any], dict[int, dict[str, Any]]]:
            taken = conn.execute(
                update(runs)
                .where(runs.c.id == run_id, runs.c.status == "failed")
                .values(status="running", error=None, finished_at=None)
                .returning(runs.c.input)
            ).first()
            if taken is None:
                status = conn.execute(select(runs.c.status).where(runs.c.id == run_id)).scalar()
                if status is None:
                    raise WorkflowNotFound(f"no workflow run {run_id!r}")
                raise InvalidRunState(f"run {run_id} is {status}; only failed runs can be resumed")
            run_input = taken.input
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
            return stage, context, done

        return self._write(write)

    def stale_steps(self, older_than_s: float) -> list[tuple[str, int, str]]:
        """(run id, position, slug) of steps marked running for longer than
        ``older_than_s`` in runs that are still pending or running (a finished run
        with a step left running lost that step's last write, e.g. an
        asynchronous commit in a PostgreSQL crash: its outcome is the run's)."""

        def read(conn: Connection) -> list[tuple[str, int, str]]:
            cutoff = _now() - timedelta(seconds=older_than_s)
            q = (
                select(steps.c.run_id, steps.c.position, steps.c.slug)
                .join(runs, runs.c.id == steps.c.run_id)
                .where(steps.c.status == "running", steps.c.started_at < cutoff)
                .where(runs.c.status.in_(("pending", "running")))
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
                status=status,
                output=output,
                error=error,
                plugin_version=plugin_version,
                finished_at=datetime.fromisoformat(finished_at),
            )
        )


def _finished_message(run_id: str, position: int, run_status: str | None) -> str:
    return f"step {position} of run {run_id} is not run: the run is {run_status} (resume it to run its steps again)"


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _held(row: Any, me: str, stale_before: datetime) -> bool:
    """Whether a running step's SQLite owner is another thread or process that
    still lives, with a claim newer than the lease (see ``begin_step``)."""
    if not row.owner or row.owner == me or not local_owner_alive(row.owner):
        return False
    return row.started_at is None or _aware(row.started_at) >= stale_before


def _aware(at: datetime) -> datetime:
    """SQLite hands timestamps back without their zone (they are UTC)."""
    return at if at.tzinfo is not None else at.replace(tzinfo=timezone.utc)
