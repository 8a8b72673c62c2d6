"""The workflow store's contract, and what both engines share.

``open_workflow_store`` (``__init__.py``) picks the implementation once:
``PgWorkflowStore`` (postgres.py) on PostgreSQL, ``SqlWorkflowStore`` (sql.py)
on SQLite and any other SQLAlchemy dialect. Both keep the same tables
(schema.py) with the same semantics; ``tests/test_workflows_store.py`` holds
them to the same results.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from datetime import datetime, timedelta, timezone
from typing import Any, NamedTuple

from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError

from pluginhost import StoreUnavailable
from pluginhost.store import migrate

from ..errors import InvalidRunState, RunFinished, WorkflowNotFound
from .outcome import Outcome
from .records import DONE, OPEN_RUN_STATES, STEP_LEASE_S, StepBusy, StepRun, WorkflowRun
from .schema import MIGRATIONS, VERSION_TABLE

#: A run's steps as ``create_run`` takes them: (position, stage, slug).
Layout = Iterable[tuple[int, int, str]]


class ClaimAsk(NamedTuple):
    """What ``begin_step`` asks of an engine's claim."""

    run_id: str
    position: int
    worker: str | None
    first: bool
    carried: list[Outcome]
    task_id: str | None
    now: datetime
    stale_before: datetime  #: a running step claimed before this is stale (the lease)


class Claim(NamedTuple):
    """What a claim attempt found: the step's row (None: no such step), whether
    this call claimed it, and the run's status (None when not read)."""

    row: StepRun | None
    claimed: bool
    run_status: str | None


class WorkflowStore(ABC):
    """The workflow tables of one database.

    ``engine``: the SQLAlchemy engine of the host store's database (migrations
    run on it). ``step_lease_s``: how long a running step's claim holds while its
    owner looks alive (setting ``pluginhost_workflows_step_lease_s``); see
    ``begin_step``.
    """

    def __init__(self, engine: Engine, *, step_lease_s: float = STEP_LEASE_S) -> None:
        self.engine = engine
        self.step_lease_s = float(step_lease_s)

    def migrate(self) -> None:
        try:
            migrate(self.engine, MIGRATIONS, VERSION_TABLE)
        except DBAPIError as exc:
            raise unreachable(getattr(exc, "orig", exc)) from None

    def after_fork(self) -> None:
        """Forget connections inherited from the parent process (a prefork child)."""
        self.engine.dispose(close=False)

    def close(self) -> None:  # noqa: B027 - most stores hold nothing of their own
        """Close this store's connections (the engine belongs to the caller)."""

    # -- definitions -----------------------------------------------------------

    @abstractmethod
    def define(self, name: str, definition: dict[str, Any], actor: str | None) -> int:
        """Store a new version unless it equals the newest; returns the version."""

    @abstractmethod
    def definition(self, name: str, version: int | None = None) -> tuple[int, dict[str, Any]] | None:
        """(version, definition) of ``version``, or of the newest; None if there is none."""

    @abstractmethod
    def newest(self, name: str) -> tuple[int, datetime] | None:
        """The newest version number of a definition and when it was stored (one
        indexed read): together they name a stored definition, even across a store
        that was emptied and defined again."""

    @abstractmethod
    def history(self, name: str) -> list[tuple[int, datetime, str | None]]:
        """Every stored version of a definition, newest first: (version, when, who)."""

    @abstractmethod
    def latest_definitions(self) -> list[tuple[int, dict[str, Any]]]:
        """(version, definition) of the newest version of every workflow, by name."""

    # -- runs ------------------------------------------------------------------

    @abstractmethod
    def create_run(
        self, run_id: str, name: str, version: int, input: dict[str, Any], layout: Layout, key: str | None = None
    ) -> bool:
        """Insert a run and its pending steps; False if the run already exists
        (redelivery). ``key``: the value of the workflow's key field (``signal_by_key``)."""

    @abstractmethod
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
        """Insert a run of ``version`` (the definition stored at ``stored_at``) and
        its pending steps if that is still the newest version of ``name``.

        Returns the newest (version, stored_at), None if there is none, and whether
        the run was inserted by this call. When the newest is the one given and
        nothing was inserted, the run existed already (a repeated start): it keeps
        the version and input it recorded."""

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
        duplicate delivery of one raises ``RunFinished`` and writes nothing
        (but the carried outcomes), until ``reset_for_resume`` opens the run again.
        """
        now = _now()
        stale_before = now - timedelta(seconds=self.step_lease_s)
        found = self._claim(ClaimAsk(run_id, position, worker, first, carried or [], task_id, now, stale_before))
        row = found.row
        if row is None:
            raise WorkflowNotFound(f"run {run_id!r} has no step at position {position}")
        if found.claimed or row.status in DONE:
            return row
        if row.status in ("pending", "running") and found.run_status not in OPEN_RUN_STATES:
            raise RunFinished(
                f"step {position} of run {run_id} is not run: the run is {found.run_status}"
                " (resume it to run its steps again)"
            )
        if row.status == "running":
            raise StepBusy(f"step {position} of run {run_id} is running under a live owner ({row.owner or 'alive'})")
        return row

    @abstractmethod
    def _claim(self, ask: ClaimAsk) -> Claim:
        """``begin_step``'s write: record ``carried``, then claim the step if it is
        pending (or running under a dead or stale owner) in an open run."""

    @abstractmethod
    def release_step(self, run_id: str, position: int) -> None:
        """A claimed step given up without an outcome (its delivery is sent again):
        back to pending, so the next delivery claims it at once."""

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
        outcome = Outcome.now(position, status, output=output, error=error, plugin_version=plugin_version)
        return self._finish_step(run_id, outcome, run_output)

    @abstractmethod
    def _finish_step(self, run_id: str, outcome: Outcome, run_output: dict[str, Any] | None) -> str | None: ...

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
        return Outcome.now(position, status, output=output, error=error, plugin_version=plugin_version)

    @abstractmethod
    def post_step(self, run_id: str, outcome: Outcome) -> None:
        """Record a step's outcome that the next task also carries
        (``begin_step``/``finish_stage`` ``carried=``). A failed write is logged,
        not raised: the carrying task records it."""

    def finish_stage(self, run_id: str, carried: list[Outcome], output: dict[str, Any]) -> str:
        """A last parallel stage done: its branches' carried outcomes and the run's
        success; returns the workflow's name."""
        if not carried:
            return self.finish_run(run_id, output)
        return self._finish_stage(run_id, carried, output)

    @abstractmethod
    def _finish_stage(self, run_id: str, carried: list[Outcome], output: dict[str, Any]) -> str: ...

    @abstractmethod
    def retry_step(self, run_id: str, position: int, error: str) -> None:
        """A failed attempt that will be retried: back to pending, error kept."""

    @abstractmethod
    def fail_run(self, run_id: str, position: int, error: str, plugin_version: int | None = None) -> str:
        """A step failed for good: record it, cancel the steps of later stages, fail
        the run (one transaction); returns the workflow's name. A run that failed
        already keeps its first error and end time (a second branch failing, or a
        sweep after a failure, does not replace the cause); a succeeded run stays
        succeeded."""

    @abstractmethod
    def finish_run(self, run_id: str, output: dict[str, Any]) -> str:
        """Record a run's success (one statement); returns the workflow's name."""

    @abstractmethod
    def cancel_run(self, run_id: str, actor: str | None, *, running: bool = False) -> list[str]:
        """A pending, running, sleeping or waiting run becomes ``cancelled`` (who:
        ``actor``, when: ``finished_at``), its pending steps and open waits
        ``cancelled``, in one transaction;
        returns the task ids of its steps still running (their bodies finish, or
        are revoked by the caller: ``running=True`` marks those ``cancelled``
        too). A cancelled run stays so (idempotent: nothing written again); a
        finished one is ``InvalidRunState``, an unknown one ``WorkflowNotFound``.
        No step of a cancelled run is claimed again (``begin_step``), and its
        last step's success does not replace the state."""

    @abstractmethod
    def get_run(self, run_id: str) -> WorkflowRun | None: ...

    @abstractmethod
    def list_runs(self, name: str | None, status: str | None, limit: int) -> list[WorkflowRun]:
        """Runs newest first (without their steps), filtered by name and status."""

    @abstractmethod
    def reset_for_resume(self, run_id: str) -> tuple[int, dict[str, Any], dict[int, dict[str, Any]]]:
        """Failed and cancelled steps back to pending, the run back to running.

        Returns the stage to start from, the context before it (the input merged
        with every earlier step's output in declaration order) and the recorded
        outputs of that stage's finished steps (a parallel stage may be half done).
        The run moves from failed to running first, in one conditional update: of
        two concurrent resumes one gets the run, the other ``InvalidRunState``.
        """

    @abstractmethod
    def stale_steps(self, older_than_s: float) -> list[tuple[str, int, str]]:
        """(run id, position, slug) of steps marked running for longer than
        ``older_than_s`` in runs that are still pending or running (a finished run
        with a step left running lost that step's last write, e.g. an
        asynchronous commit in a PostgreSQL crash: its outcome is the run's)."""

    @abstractmethod
    def stalled_steps(self, older_than_s: float) -> list[tuple[str, int, str]]:
        """(run id, position, slug) of the first unfinished step of each pending or
        running run created over ``older_than_s`` ago in which no step is running,
        none started or finished, and no wait was claimed or sent on within
        ``older_than_s`` (sleeping and waiting runs are never stalled): the message that would
        have moved it on was lost (a broker restart, a lost chord callback)."""

    @abstractmethod
    def prune(self, older_than_s: float) -> int:
        """Delete finished runs (and their steps) that ended more than ``older_than_s`` ago."""


def resume_point(
    run_input: dict[str, Any], rows: list[tuple[int, int, str, dict[str, Any] | None]]
) -> tuple[int, dict[str, Any], dict[int, dict[str, Any]]]:
    """``reset_for_resume``'s answer from the run's input and its steps'
    (position, stage, status, output), in position order."""
    todo = [stage for _, stage, status, _ in rows if status not in DONE]
    stage = min(todo) if todo else (rows[-1][1] + 1 if rows else 0)
    context = dict(run_input)
    for _, row_stage, status, output in rows:
        if row_stage < stage and status == "succeeded" and output:
            context.update(output)
    done = {pos: dict(output or {}) for pos, row_stage, status, output in rows if row_stage == stage and status in DONE}
    return stage, context, done


def refuse(run_id: str, status: str | None, *, only: str, action: str, unless: str | None = None) -> None:
    """Why a conditional transition of a run (``cancel_run``, ``reset_for_resume``)
    took nothing: there is no such run (``WorkflowNotFound``), or it is in another
    state (``InvalidRunState``), unless that state is ``unless``, the one the
    transition leads to (a repeat: nothing to do, no error)."""
    if status is None:
        raise WorkflowNotFound(f"no workflow run {run_id!r}")
    if status != unless:
        raise InvalidRunState(f"run {run_id} is {status}; only {only} runs can be {action}")


def unreachable(exc: BaseException) -> StoreUnavailable:
    return StoreUnavailable(f"workflow store unreachable: {first_line(exc)}")


def first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _now() -> datetime:
    return datetime.now(timezone.utc)
