"""Durable waits and signals: the rows behind ``Sleep`` and ``WaitFor``.

A run that reaches a wait stops there: the wait task (runtime.py) records a row
here with its due time (``reach``) and the chain ends, so no worker slot and no
broker message is held, whatever the wait's length. Every worker claims the due
rows (``claim_due``: ``FOR UPDATE SKIP LOCKED`` on PostgreSQL, so workers take
different rows; on SQLite ``BEGIN IMMEDIATE`` lets one claimer in at a time),
sends the run on, and marks the row done (``sent``). A claim is a lease: a
claimer that dies before ``sent`` leaves the row ``claimed``, and it is claimed
again once ``claimed_at`` is older than the lease. So a wake-up is late (by
the poll interval, or the lease after a crash) but never lost; it may be sent
twice only when its claimer died after sending, and then the steps' own rows
keep each step to one execution.

A signal (``deliver``) is a row of its own, at most one per name and run. One
that arrives before its wait is kept and taken when the run gets there; one
that arrives while the run waits makes the wait due at once.

Both engines run this module's SQLAlchemy Core statements on the host store's
engine (these are not per-step calls); on PostgreSQL every transaction carries
a statement and lock deadline.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any, NamedTuple, TypeVar

from sqlalchemy import Connection, Engine, insert, or_, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError

from ..errors import InvalidSignal, RunNotFound
from .base import unreachable
from .outcome import Outcome
from .records import CANCELLABLE_RUN_STATES, OPEN_RUN_STATES, WAITING_RUN_STATES, SignalRun, WaitRun
from .schema import runs, signals, steps, waits
from .sql import record_carried

T = TypeVar("T")

#: A wait's outcome as its row records it, and as ``signals.<name>`` says it in the context.
SLEPT, RECEIVED, TIMED_OUT = "slept", "received", "timed_out"


class Wake(NamedTuple):
    """A claimed wait: what the claimer needs to send its run on."""

    run_id: str
    stage: int
    kind: str
    signal: str | None
    on_timeout: str | None
    outcome: str
    context: dict[str, Any]
    payload: dict[str, Any]  #: the signal's payload (``received``), else empty
    name: str  #: the run's workflow
    version: int


class WaitStore:
    """The waits and signals of the workflow tables in ``engine``'s database.

    ``lease_s``: how long a claim holds before another worker may claim the row
    again; ``timeout_s``: each statement's deadline on PostgreSQL."""

    def __init__(self, engine: Engine, *, lease_s: float = 30.0, timeout_s: float = 2.0) -> None:
        self.engine = engine
        self.lease_s = float(lease_s)
        self.timeout_s = float(timeout_s)

    # -- the run reaches its wait ----------------------------------------------

    def reach(
        self,
        run_id: str,
        stage: int,
        *,
        kind: str,
        signal: str | None,
        on_timeout: str | None,
        seconds: float | None,
        context: dict[str, Any],
        carried: list[Outcome],
    ) -> WaitRun | None:
        """Record that the run stopped at wait ``stage`` (one transaction): the
        carried step outcomes, the wait's row (due ``seconds`` from now; a
        ``WaitFor`` with no timeout is never due by time) and the run's state
        (``sleeping`` or ``waiting``). A signal kept for this wait makes it due
        now. A repeated delivery finds the row and changes nothing (the first
        due time holds). None when the run is no longer open (cancelled, failed)."""

        def write(conn: Connection) -> WaitRun | None:
            now = _now()
            record_carried(conn, run_id, carried)
            # locked: a signal delivered meanwhile (``deliver``) waits for this, and is seen
            status = conn.execute(select(runs.c.status).where(runs.c.id == run_id).with_for_update()).scalar()
            if status is None:
                raise RunNotFound(f"workflow run {run_id!r} is gone from the store")
            row = _wait_row(conn, run_id, stage)
            if row is not None:
                return row  # a repeated delivery: the first one's row and due time hold
            if status not in OPEN_RUN_STATES:
                return None
            wake_at = None if seconds is None else now + timedelta(seconds=seconds)
            outcome = None
            if kind == "signal":
                kept = conn.execute(
                    select(signals.c.name).where(
                        signals.c.run_id == run_id, signals.c.name == signal, signals.c.consumed_at.is_(None)
                    )
                ).first()
                if kept is not None:
                    outcome, wake_at = RECEIVED, now
            conn.execute(
                insert(waits).values(
                    run_id=run_id,
                    stage=stage,
                    kind=kind,
                    signal=signal,
                    on_timeout=on_timeout,
                    status="waiting",
                    outcome=outcome,
                    wake_at=wake_at,
                    context=context,
                    created_at=now,
                )
            )
            conn.execute(
                update(runs)
                .where(runs.c.id == run_id, runs.c.status.in_(OPEN_RUN_STATES))
                .values(
                    status="sleeping" if kind == "sleep" else "waiting",
                    context=context,
                    started_at=runs.c.started_at if status == "running" else now,
                )
            )
            return _wait_row(conn, run_id, stage)

        return self._write(write)

    # -- workers send due runs on ------------------------------------------------

    def claim_due(
        self, owner: str, limit: int = 100, *, run_id: str | None = None, stage: int | None = None
    ) -> list[Wake]:
        """Claim up to ``limit`` due waits (or the one of ``run_id``/``stage``, if
        due) for ``owner``: due by time or by a signal, or claimed by someone
        else longer than the lease ago. Each becomes ``claimed`` with its
        outcome decided (a due signal wait without its signal timed out), and
        its run ``running`` again. Rows of runs that ended are never claimed."""

        def write(conn: Connection) -> list[Wake]:
            now = _now()
            due = or_(
                (waits.c.status == "waiting") & (waits.c.wake_at <= now),
                (waits.c.status == "claimed") & (waits.c.claimed_at < now - timedelta(seconds=self.lease_s)),
            )
            q = (
                select(waits, runs.c.name, runs.c.version)
                .join(runs, runs.c.id == waits.c.run_id)
                .where(due, runs.c.status.in_(CANCELLABLE_RUN_STATES))
                .order_by(waits.c.wake_at)
                .limit(limit)
                .with_for_update(of=waits, skip_locked=True)
            )
            if run_id is not None:
                q = q.where(waits.c.run_id == run_id, waits.c.stage == stage)
            found = []
            for row in conn.execute(q).all():
                outcome = row.outcome or (SLEPT if row.kind == "sleep" else TIMED_OUT)
                # Conditional on the row as read: of two claimers that race, one
                # wins, whatever the engine's transaction mode.
                seen = waits.c.claimed_at.is_(None) if row.claimed_at is None else waits.c.claimed_at == row.claimed_at
                taken = conn.execute(
                    update(waits)
                    .where(waits.c.run_id == row.run_id, waits.c.stage == row.stage)
                    .where(waits.c.status == row.status, seen)
                    .values(status="claimed", outcome=outcome, claimed_by=owner, claimed_at=now)
                ).rowcount
                if taken != 1:
                    continue
                conn.execute(
                    update(runs)
                    .where(runs.c.id == row.run_id, runs.c.status.in_(WAITING_RUN_STATES))
                    .values(status="running")
                )
                payload: dict[str, Any] = {}
                if outcome == RECEIVED:
                    payload = (
                        conn.execute(
                            select(signals.c.payload).where(
                                signals.c.run_id == row.run_id, signals.c.name == row.signal
                            )
                        ).scalar()
                        or {}
                    )
                found.append(
                    Wake(
                        row.run_id,
                        int(row.stage),
                        row.kind,
                        row.signal,
                        row.on_timeout,
                        outcome,
                        dict(row.context or {}),
                        dict(payload),
                        row.name,
                        int(row.version),
                    )
                )
            return found

        return self._write(write)

    def sent(self, wake: Wake) -> None:
        """The claimed wait's run was sent on: the row is done (and its signal taken)."""

        def write(conn: Connection) -> None:
            now = _now()
            conn.execute(
                update(waits)
                .where(waits.c.run_id == wake.run_id, waits.c.stage == wake.stage, waits.c.status == "claimed")
                .values(status="done", woke_at=now)
            )
            if wake.outcome == RECEIVED:
                conn.execute(
                    update(signals)
                    .where(signals.c.run_id == wake.run_id, signals.c.name == wake.signal)
                    .values(consumed_at=now)
                )

        self._write(write)

    def release(self, wake: Wake, claimer: str) -> None:
        """A claimed wait whose run could not be sent on (the broker is away): back
        to ``waiting``, and its run to ``sleeping``/``waiting``, so the next poll
        of any worker tries again instead of waiting out the lease."""

        def write(conn: Connection) -> None:
            released = conn.execute(
                update(waits)
                .where(waits.c.run_id == wake.run_id, waits.c.stage == wake.stage)
                .where(waits.c.status == "claimed", waits.c.claimed_by == claimer)
                .values(status="waiting", claimed_by=None, claimed_at=None)
            ).rowcount
            if released:
                conn.execute(
                    update(runs)
                    .where(runs.c.id == wake.run_id, runs.c.status == "running")
                    .values(status="sleeping" if wake.kind == "sleep" else "waiting")
                )

        self._write(write)

    def end_after(self, wake: Wake, *, error: str | None = None, reason: str | None = None) -> None:
        """A timed-out wait that ends its run, in one transaction: with ``error``
        (``on_timeout="fail"``) the steps after it are ``cancelled`` and the run
        ``failed``; with ``reason`` (``skip``) they are ``skipped`` with that
        reason (the caller then records the run's success). The row is done."""

        def write(conn: Connection) -> None:
            now = _now()
            later = (steps.c.run_id == wake.run_id, steps.c.stage > wake.stage, steps.c.status == "pending")
            status = "cancelled" if error is not None else "skipped"
            conn.execute(update(steps).where(*later).values(status=status, error=reason, finished_at=now))
            if error is not None:
                conn.execute(
                    update(runs)
                    .where(runs.c.id == wake.run_id, runs.c.status.in_(CANCELLABLE_RUN_STATES))
                    .values(status="failed", error=error, finished_at=now)
                )
            conn.execute(
                update(waits)
                .where(waits.c.run_id == wake.run_id, waits.c.stage == wake.stage)
                .values(status="done", woke_at=now)
            )

        self._write(write)

    # -- signals ---------------------------------------------------------------

    def deliver(
        self,
        run_id: str,
        stage_of: Callable[[str, int], int],
        name: str,
        payload: dict[str, Any],
        actor: str | None,
        claimer: str,
    ) -> Wake | None:
        """Store signal ``name`` for the run's wait (one transaction; ``stage_of``
        gives the stage of that wait from the run's workflow name and version,
        or raises). A run waiting for it is claimed for ``claimer`` at once: the
        returned ``Wake`` is the caller's to send on (``Waiting.send_on``). None:
        the run has not reached the wait yet, and the signal is kept for it.
        ``RunNotFound`` for no such run; ``InvalidSignal`` when the run ended or
        passed the wait, or already has a signal of that name; nothing is
        written then. The run's row is locked first, as ``reach`` does: a signal
        and the run reaching its wait never miss each other, and two signals of
        one name are told apart without a savepoint."""

        def write(conn: Connection) -> Wake | None:
            now = _now()
            run = conn.execute(
                select(runs.c.status, runs.c.name, runs.c.version).where(runs.c.id == run_id).with_for_update()
            ).first()
            if run is None:
                raise RunNotFound(f"no workflow run {run_id!r}")
            stage = stage_of(str(run.name), int(run.version))
            if run.status not in CANCELLABLE_RUN_STATES:
                raise InvalidSignal(f"run {run_id} is {run.status}: signal {name!r} cannot be delivered")
            row = _wait_row(conn, run_id, stage)
            if row is not None and (row.status != "waiting" or row.outcome is not None):
                why = "it timed out" if row.outcome == TIMED_OUT else f"it is {row.outcome or row.status}"
                raise InvalidSignal(f"run {run_id} is past its wait for signal {name!r} ({why})")
            if conn.execute(select(signals.c.name).where(signals.c.run_id == run_id, signals.c.name == name)).first():
                raise InvalidSignal(f"run {run_id} has a signal {name!r} already (one per wait)")
            conn.execute(
                insert(signals).values(run_id=run_id, name=name, payload=payload, received_at=now, actor=actor)
            )
            if row is None:
                return None
            taken = conn.execute(
                update(waits)
                .where(waits.c.run_id == run_id, waits.c.stage == stage, waits.c.status == "waiting")
                .where(waits.c.outcome.is_(None))
                .values(outcome=RECEIVED, wake_at=now, status="claimed", claimed_by=claimer, claimed_at=now)
                .returning(waits.c.context)
            ).first()
            if taken is None:  # a waker took it (timed out) meanwhile: the signal is refused, not stored
                raise InvalidSignal(f"run {run_id} is past its wait for signal {name!r} (it timed out)")
            conn.execute(
                update(runs).where(runs.c.id == run_id, runs.c.status.in_(WAITING_RUN_STATES)).values(status="running")
            )
            return Wake(
                run_id,
                stage,
                "signal",
                name,
                row.on_timeout,
                RECEIVED,
                dict(taken.context),
                payload,
                run.name,
                run.version,
            )

        try:
            return self._write(write)
        except IntegrityError:  # a signal of that name stored meanwhile (an engine without write locks)
            raise InvalidSignal(f"run {run_id} has a signal {name!r} already (one per wait)") from None

    def runs_with_key(self, name: str, key: str) -> list[str]:
        """Ids of the unfinished runs of ``name`` whose key is ``key``, newest first."""

        def read(conn: Connection) -> list[str]:
            q = (
                select(runs.c.id)
                .where(runs.c.name == name, runs.c.key == key, runs.c.status.in_(CANCELLABLE_RUN_STATES))
                .order_by(runs.c.created_at.desc())
            )
            return [str(r) for (r,) in conn.execute(q)]

        return self._read(read)

    def payload(self, run_id: str, name: str) -> dict[str, Any]:
        """The payload of the run's signal ``name`` ({} if there is none)."""

        def read(conn: Connection) -> dict[str, Any]:
            q = select(signals.c.payload).where(signals.c.run_id == run_id, signals.c.name == name)
            return dict(conn.execute(q).scalar() or {})

        return self._read(read)

    def timeline(self, run_id: str) -> tuple[list[WaitRun], list[SignalRun]]:
        """A run's waits (by stage) and signals (by arrival)."""

        def read(conn: Connection) -> tuple[list[WaitRun], list[SignalRun]]:
            found = conn.execute(select(waits).where(waits.c.run_id == run_id).order_by(waits.c.stage))
            wait_rows = [_wait(r._mapping) for r in found]
            sig_rows = [
                SignalRun(
                    name=r.name,
                    payload_keys=sorted(r.payload or {}),
                    received_at=_aware(r.received_at),
                    actor=r.actor,
                    consumed_at=None if r.consumed_at is None else _aware(r.consumed_at),
                )
                for r in conn.execute(select(signals).where(signals.c.run_id == run_id).order_by(signals.c.received_at))
            ]
            return wait_rows, sig_rows

        return self._read(read)

    def waiting(self, limit: int = 100) -> list[tuple[str, WaitRun]]:
        """(run id, wait) of runs that sleep or wait now, the soonest due first."""

        def read(conn: Connection) -> list[tuple[str, WaitRun]]:
            q = (
                select(waits)
                .where(waits.c.status.in_(("waiting", "claimed")))
                .order_by(waits.c.wake_at.is_(None), waits.c.wake_at)
                .limit(limit)
            )
            return [(r.run_id, _wait(r._mapping)) for r in conn.execute(q)]

        return self._read(read)

    # -- plumbing --------------------------------------------------------------

    def _read(self, fn: Callable[[Connection], T]) -> T:
        return self._transaction(fn, write=False)

    def _write(self, fn: Callable[[Connection], T]) -> T:
        return self._transaction(fn, write=True)

    def _transaction(self, fn: Callable[[Connection], T], *, write: bool) -> T:
        try:
            with self.engine.connect() as conn:
                conn = conn.execution_options(pluginhost_write=write)
                with conn.begin():
                    if conn.dialect.name == "postgresql":
                        ms = max(1, int(self.timeout_s * 1000))
                        limit = f"'{ms}', true"
                        conn.exec_driver_sql(
                            f"SELECT set_config('statement_timeout', {limit}), set_config('lock_timeout', {limit})"
                        )
                    return fn(conn)
        except IntegrityError:
            raise
        except DBAPIError as exc:
            raise unreachable(getattr(exc, "orig", exc)) from None


def _wait_row(conn: Connection, run_id: str, stage: int) -> WaitRun | None:
    row = conn.execute(select(waits).where(waits.c.run_id == run_id, waits.c.stage == stage)).first()
    return None if row is None else _wait(row._mapping)


def _wait(mapping: Any) -> WaitRun:
    data = {k: v for k, v in mapping.items() if k in WaitRun.model_fields}
    for k in ("wake_at", "created_at", "woke_at"):
        if data.get(k) is not None:
            data[k] = _aware(data[k])
    return WaitRun.model_validate(data)


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _aware(at: datetime) -> datetime:
    """SQLite hands timestamps back without their zone (they are UTC)."""
    return at if at.tzinfo is not None else at.replace(tzinfo=timezone.utc)
