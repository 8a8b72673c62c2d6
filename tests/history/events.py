"""The history: one append-only JSONL file per process, read back as one list.

Each process (a worker's pool process included) appends to
``<dir>/<proc>-<pid>.jsonl``; a line is one :class:`Event`, written with one
``os.write`` on an ``O_APPEND`` descriptor, so a SIGKILL never leaves half an
event behind in the middle of a file (a torn last line is skipped on reading and
counted). Times are ``time.monotonic_ns()``: ``CLOCK_MONOTONIC``, one clock for
every process on a Linux machine, so events of different processes compare.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Version of the line format (a field of every line).
FORMAT_VERSION = 1

#: Environment variables a process reads to find its log (see :meth:`EventLog.from_env`).
DIR_ENV = "PH_HISTORY_DIR"
PROC_ENV = "PH_HISTORY_PROC"


@dataclass(frozen=True)
class Event:
    """One thing one process did, at ``t`` (``monotonic_ns``)."""

    t: int
    proc: str
    pid: int
    kind: str
    data: dict[str, Any] = field(default_factory=dict)
    seq: int = 0  # position in its file: orders events of one process with equal t

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def to_json(self) -> str:
        return json.dumps(
            {"v": FORMAT_VERSION, "t": self.t, "proc": self.proc, "pid": self.pid,
             "kind": self.kind, **self.data},
            separators=(",", ":"), default=str,
        )  # fmt: skip

    @classmethod
    def from_json(cls, line: str, seq: int = 0) -> Event:
        raw = json.loads(line)
        version = raw.pop("v", None)
        if version != FORMAT_VERSION:
            raise ValueError(f"event format version {version!r}, expected {FORMAT_VERSION}")
        return cls(
            t=int(raw.pop("t")), proc=str(raw.pop("proc")), pid=int(raw.pop("pid")),
            kind=str(raw.pop("kind")), data=raw, seq=seq,
        )  # fmt: skip


class EventLog:
    """Appends events of this process to its own file in ``directory``.

    Safe across ``fork``: a child (a prefork pool process) opens a file of its
    own on its first event. ``EventLog(None, ...)`` records nothing (a process
    that is not part of a recorded run, e.g. the pytest process importing the app).
    """

    def __init__(self, directory: str | Path | None, proc: str) -> None:
        self.directory = Path(directory) if directory else None
        self.proc = proc
        self._fd: int | None = None
        self._fd_pid: int | None = None
        self._seq = 0

    @classmethod
    def from_env(cls, default_proc: str = "proc") -> EventLog:
        return cls(os.environ.get(DIR_ENV) or None, os.environ.get(PROC_ENV) or default_proc)

    @property
    def enabled(self) -> bool:
        return self.directory is not None

    def emit(self, kind: str, **data: Any) -> int:
        """Record an event now; returns its time (0 if this log records nothing)."""
        t = time.monotonic_ns()
        if self.directory is None:
            return 0
        pid = os.getpid()
        if self._fd is None or self._fd_pid != pid:
            path = self.directory / f"{self.proc}-{pid}.jsonl"
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            self._fd_pid = pid
        line = Event(t=t, proc=self.proc, pid=pid, kind=kind, data=data).to_json() + "\n"
        os.write(self._fd, line.encode())
        return t

    def close(self) -> None:
        if self._fd is not None and self._fd_pid == os.getpid():
            os.close(self._fd)
        self._fd = None


@dataclass
class History:
    """Every event of a run, in time order, and how many torn lines were skipped."""

    events: list[Event]
    torn_lines: int = 0
    files: int = 0


def read_history(directory: str | Path) -> History:
    """Merge every ``*.jsonl`` file of ``directory`` into one time-ordered list.

    A line that does not parse is skipped and counted if it is the last line of
    its file (a process killed while writing); anywhere else it is an error.
    """
    events: list[Event] = []
    torn = 0
    files = sorted(Path(directory).glob("*.jsonl"))
    for path in files:
        lines = path.read_text(errors="replace").split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        for i, line in enumerate(lines):
            try:
                events.append(Event.from_json(line, seq=i))
            except (ValueError, KeyError) as exc:
                if i == len(lines) - 1:
                    torn += 1
                    continue
                raise ValueError(f"{path}:{i + 1}: not an event ({exc}): {line[:200]!r}") from None
    return History(events=sort_events(events), torn_lines=torn, files=len(files))


def sort_events(events: Iterable[Event]) -> list[Event]:
    return sorted(events, key=lambda e: (e.t, e.proc, e.pid, e.seq))


def format_event(event: Event, t0: int, mark: str = " ") -> str:
    """One line: time relative to ``t0`` in ms, process, kind, fields."""
    fields = " ".join(f"{k}={_short(v)}" for k, v in event.data.items())
    when = "   (final)" if event.t < 0 else f"{(event.t - t0) / 1e6:+11.3f} ms"
    return f"{mark} {when}  {event.proc:<9} {event.pid:>7}  {event.kind:<18} {fields}".rstrip()


def _short(value: Any, limit: int = 160) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str, separators=(",", ":"))
    return text if len(text) <= limit else text[: limit - 3] + "..."
