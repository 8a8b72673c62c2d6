"""A run's history for the console: its waits (every ``Sleep`` and ``WaitFor``
stage, reached or not), its signals, and one time-ordered list of what happened."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any, Literal

import workflows

from .schemas import SignalRow, StepRow, TimelineEntry, WaitRow

#: Seconds per unit, largest first: a span is shown in the largest unit it fills.
_UNITS = (("d", 86400.0), ("h", 3600.0), ("m", 60.0), ("s", 1.0))


def span(seconds: float) -> str:
    """``120`` -> ``"2m"``, ``5400`` -> ``"1.5h"``, ``0.25`` -> ``"0.25s"``."""
    for unit, size in _UNITS:
        if seconds >= size or unit == "s":
            return f"{seconds / size:.2f}".rstrip("0").rstrip(".") + unit
    raise AssertionError("unreachable")


def when(at: datetime) -> str:
    """A timestamp as the pages show it (UTC)."""
    return aware(at).strftime("%Y-%m-%d %H:%M:%S UTC")


def aware(at: datetime) -> datetime:
    """SQLite hands timestamps back without their zone (the store writes UTC)."""
    return at if at.tzinfo is not None else at.replace(tzinfo=timezone.utc)


def wait_rows(definition: workflows.Workflow | None, reached: Sequence[Any]) -> list[WaitRow]:
    """A row per wait stage of ``definition`` (``pending`` until reached), with the
    store's row (a ``WaitRun``) for each one the run reached. Without the
    definition (its version was pruned): the reached ones only."""
    stages = definition.waits() if definition is not None else {}
    found = {w.stage: w for w in reached}
    rows = []
    for stage in sorted(set(stages) | set(found)):
        spec = stages.get(stage)
        row = found.get(stage)
        slept = row.kind == "sleep" if row is not None else isinstance(spec, workflows.Sleep)
        kind: Literal["sleep", "signal"] = "sleep" if slept else "signal"
        signal = row.signal if row is not None else getattr(spec, "signal", None)
        duration = spec.duration if isinstance(spec, workflows.Sleep) else getattr(spec, "timeout", None)
        label = f"sleep {span(duration)}" if kind == "sleep" and duration else "sleep"
        if kind == "signal":
            label = f"wait for {signal}"
        fields: dict[str, Any] = {"status": "pending", "on_timeout": getattr(spec, "on_timeout", None)}
        if row is not None:
            fields = row.model_dump(exclude={"stage", "kind", "signal"})
            fields["on_timeout"] = fields["on_timeout"] or getattr(spec, "on_timeout", None)
        rows.append(WaitRow(stage=stage, kind=kind, label=label, signal=signal, duration_s=duration, **fields))
    return rows


def current_wait(waits: Sequence[WaitRow]) -> WaitRow | None:
    """The wait a run is stopped at (or being sent on from), if any."""
    return next((w for w in waits if w.status in ("waiting", "claimed")), None)


def awaited(wait: WaitRow) -> str:
    """What a waiting run waits for, in words: ``wait for approved (timeout 3d, then fail)``."""
    if wait.kind == "sleep":
        return wait.label
    if wait.duration_s is None:
        return f"{wait.label} (no timeout)"
    return f"{wait.label} (timeout {span(wait.duration_s)}, then {wait.on_timeout or 'fail'})"


def entries(
    run: Any, steps: Sequence[StepRow], waits: Sequence[WaitRow], signals: Sequence[SignalRow]
) -> list[TimelineEntry]:
    """What happened to ``run`` (a ``WorkflowRun``), oldest first; of two entries at
    the same moment the one that comes first in the run's course is listed first."""
    found: list[TimelineEntry] = [
        TimelineEntry(at=run.created_at, kind="created", text=f"created (workflow {run.name} version {run.version})")
    ]
    for step in sorted(steps, key=lambda s: s.position):
        if step.started_at is not None:
            found.append(TimelineEntry(at=step.started_at, kind="step", text=f"step {step.slug} started"))
        if step.finished_at is not None and (step.started_at is not None or step.status == "skipped"):
            why = step.error or step.note
            text = f"step {step.slug} {step.status}" + (f": {why}" if why else "")
            found.append(TimelineEntry(at=step.finished_at, kind="step", text=text))
    for wait in waits:
        found.extend(_wait_entries(wait))
    for signal in signals:
        keys = f"with keys {', '.join(signal.payload_keys)}" if signal.payload_keys else "with no payload"
        sender = f" from {signal.actor}" if signal.actor else ""
        text = f"signal {signal.name} received{sender} {keys}"
        found.append(TimelineEntry(at=signal.received_at, kind="signal", text=text))
    if run.status in ("succeeded", "failed", "cancelled") and run.finished_at is not None:
        text = run.status
        if run.status == "failed" and run.error:
            text = f"failed: {run.error}"
        elif run.status == "cancelled":
            text = f"cancelled by {run.cancelled_by or 'an unknown actor'} at {when(run.finished_at)}"
        found.append(TimelineEntry(at=run.finished_at, kind=run.status, text=text))
    found = [e.model_copy(update={"at": aware(e.at)}) for e in found]
    return sorted(found, key=lambda e: e.at)  # stable: same-moment entries keep the run's order


def _wait_entries(wait: WaitRow) -> list[TimelineEntry]:
    if wait.created_at is None:  # not reached
        return []
    until = f" until {when(wait.wake_at)}" if wait.wake_at is not None else ""
    if wait.kind == "sleep":
        if wait.status == "cancelled":
            text = f"slept{until}, then cancelled"
        elif wait.woke_at is not None:
            text = f"slept{until}, woke at {when(wait.woke_at)}"
        else:
            text = f"sleeping{until}"
        return [TimelineEntry(at=wait.created_at, kind="sleep", text=text)]
    how = awaited(wait).removeprefix("wait for ")
    waiting = wait.status == "waiting" and wait.outcome is None
    text = f"{'waiting' if waiting else 'waited'} for signal {how}"
    if wait.outcome == "received":  # a signal kept from before the wait makes it due at once
        text += f", woke at {when(wait.woke_at)}" if wait.woke_at is not None else ": received, due now"
    found = [TimelineEntry(at=wait.created_at, kind="wait", text=text)]
    if wait.outcome == "timed_out":
        at = wait.woke_at or wait.wake_at or wait.created_at
        then = f", then {wait.on_timeout}" if wait.on_timeout else ""
        found.append(TimelineEntry(at=at, kind="timed_out", text=f"timed out waiting for signal {wait.signal}{then}"))
    return found
