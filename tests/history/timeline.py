"""The history as the checker's rules see it: admin calls, dispatches, capability
bodies and faults, paired start-to-end, and the *disabled windows* of a plugin.

Built from the merged events (``tests/history/events.py``); no rule lives here
(see ``tests/history/checker.py``).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from tests.history.events import Event, sort_events

INF = float("inf")


@dataclass
class Call:
    """One admin call: its start and its return or error (None: never ended)."""

    start: Event
    end: Event | None
    end_t: float  # end time, or the process's stop time, or INF

    @property
    def op(self) -> str:
        return str(self.start.get("op"))

    @property
    def slug(self) -> str | None:
        return self.start.get("slug")

    @property
    def actor(self) -> str:
        return str(self.start.get("actor"))

    @property
    def ok(self) -> bool:
        return self.end is not None and self.end.kind == "admin_return"

    @property
    def raised(self) -> bool:
        return self.end is not None and self.end.kind == "admin_error"

    @property
    def acks(self) -> list[str]:
        return list(self.end.get("acks") or []) if self.end is not None else []

    def events(self) -> list[Event]:
        return [self.start] + ([self.end] if self.end is not None else [])


@dataclass
class Dispatch:
    start: Event
    end: Event | None
    end_t: float

    @property
    def plugin(self) -> str:
        return str(self.start.get("plugin"))


@dataclass
class Window:
    """A plugin is known disabled from ``opened`` until ``closed`` (exclusive)."""

    plugin: str
    opened: int
    closed: float
    disable: Call
    enable: Call | None

    def events(self) -> list[Event]:
        return self.disable.events() + ([self.enable.start] if self.enable is not None else [])


class WindowIndex:
    """Finds a window covering an interval in O(log n) (windows of one plugin may
    overlap: consecutive disables each open one until the same enable)."""

    def __init__(self, windows: Iterable[Window]) -> None:
        self.windows = sorted(windows, key=lambda w: w.opened)
        self.opened = [w.opened for w in self.windows]
        self.widest: list[Window] = []  # widest[i]: the window closing last among windows[:i+1]
        for w in self.windows:
            self.widest.append(w if not self.widest or w.closed > self.widest[-1].closed else self.widest[-1])

    def covering(self, first: int, last: float) -> Window | None:
        i = bisect.bisect_right(self.opened, first) - 1
        if i < 0:
            return None
        w = self.widest[i]
        return w if last < w.closed else None


@dataclass
class FaultSpan:
    kind: str
    start: Event
    end: Event | None

    @property
    def t0(self) -> int:
        return self.start.t

    @property
    def t1(self) -> float:
        return self.end.t if self.end is not None else INF

    def overlaps(self, a: float, b: float) -> bool:
        return self.t0 <= b and self.t1 >= a

    def events(self) -> list[Event]:
        return [self.start] + ([self.end] if self.end is not None else [])


@dataclass
class Execution:
    start: Event
    end: Event | None


class History:
    """Indexes over the events that the rules share."""

    def __init__(self, events: Iterable[Event]) -> None:
        self.events = sort_events(events)
        self.t0 = self.events[0].t if self.events else 0
        self.stopped: dict[str, int] = {}
        for e in self.events:
            if e.kind == "role_stopped":
                self.stopped[str(e.get("role_proc"))] = e.t
        self.calls = self._pair("admin_start", ("admin_return", "admin_error"), "call", Call)
        self.dispatches = self._pair(
            "dispatch_start", ("dispatch_accepted", "dispatch_refused", "dispatch_error"), "op", Dispatch
        )
        self.bodies = [e for e in self.events if e.kind == "body_start"]
        self.faults = self._faults()

    def _pair(self, start_kind: str, end_kinds: tuple[str, ...], key: str, cls: Any) -> list[Any]:
        open_: dict[tuple[str, Any], Event] = {}
        done: list[Any] = []
        for e in self.events:
            if e.kind == start_kind:
                open_[(e.proc, e.get(key))] = e
            elif e.kind in end_kinds:
                start = open_.pop((e.proc, e.get(key)), None)
                if start is not None:
                    done.append(cls(start=start, end=e, end_t=e.t))
        for (proc, _), start in open_.items():
            done.append(cls(start=start, end=None, end_t=self.stopped.get(proc, INF)))
        return sorted(done, key=lambda c: c.start.t)

    def _faults(self) -> list[FaultSpan]:
        spans: list[FaultSpan] = []
        active: dict[str, FaultSpan] = {}
        for e in self.events:
            if e.kind == "fault_start":
                span = FaultSpan(str(e.get("fault")), e, None)
                active[span.kind] = span
                spans.append(span)
            elif e.kind == "fault_end":
                ended = active.pop(str(e.get("fault")), None)
                if ended is not None:
                    ended.end = e
        return spans

    def faults_during(self, a: float, b: float) -> list[Event]:
        return [e for s in self.faults if s.overlaps(a, b) for e in s.events()]

    def enables(self, plugin: str) -> list[Call]:
        return [c for c in self.calls if c.op == "enable" and c.slug == plugin]

    def windows(self, plugin: str, *, acked_only: bool = False) -> tuple[list[Window], int]:
        """The disabled windows of ``plugin`` (see the module docstring), and how
        many disables opened none because an enable overlapped them."""
        enables = self.enables(plugin)
        starts = [e.start.t for e in enables]
        windows, ambiguous = [], 0
        for d in self.calls:
            if d.op != "disable" or d.slug != plugin or not d.ok:
                continue
            if acked_only and not (d.start.get("wait") and d.acks):
                continue
            assert d.end is not None
            if any(e.start.t < d.end.t and e.end_t > d.start.t for e in enables):
                ambiguous += 1
                continue
            i = bisect.bisect_left(starts, d.end.t)
            nxt = enables[i] if i < len(enables) else None
            windows.append(Window(plugin, d.end.t, nxt.start.t if nxt else INF, d, nxt))
        return windows, ambiguous
