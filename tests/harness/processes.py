"""Processes as ``/proc`` shows them: who is alive, in which group, whose child.

Also the child-subreaper switch, so a worker's orphaned pool children come back to
this process and their zombies can be reaped here.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class ProcInfo:
    """One line of ``/proc/<pid>/stat``, the fields we use."""

    pid: int
    ppid: int
    pgid: int
    state: str  # R, S, D, T (stopped), Z (zombie), ...

    @property
    def alive(self) -> bool:
        return self.state not in ("Z", "X")


def read_proc(pid: int) -> ProcInfo | None:
    """``/proc/<pid>/stat`` parsed, or ``None`` if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses
    fields = data[data.rindex(")") + 2 :].split()
    return ProcInfo(pid=pid, state=fields[0], ppid=int(fields[1]), pgid=int(fields[2]))


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists and is not a zombie."""
    info = read_proc(pid)
    return info is not None and info.alive


def list_processes() -> list[ProcInfo]:
    """Every process visible in ``/proc``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            info = read_proc(int(entry))
            if info is not None:
                found.append(info)
    return found


def group_members(pgid: int, *, include_zombies: bool = False) -> list[int]:
    """Pids in process group ``pgid``; zombies only if asked for."""
    return sorted(p.pid for p in list_processes() if p.pgid == pgid and (include_zombies or p.alive))


def child_pids(pid: int) -> list[int]:
    """Pids of the live direct children of ``pid``."""
    return sorted(p.pid for p in list_processes() if p.ppid == pid and p.alive)


_PR_SET_CHILD_SUBREAPER = 36
_subreaper_state: list[bool] = []


def become_child_subreaper() -> bool:
    """Adopt orphaned descendants, so their zombies can be reaped here (Linux only).

    When a worker's main process is SIGKILLed, its pool children are orphaned. Their
    zombies would go to PID 1, which on these machines never reaps them; as a child
    subreaper this process gets them instead and ``Worker.stop`` reaps them.
    Idempotent; returns whether it is in effect.
    """
    if not _subreaper_state:
        ok = False
        if sys.platform.startswith("linux"):
            libc = ctypes.CDLL(None, use_errno=True)
            ok = libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
        _subreaper_state.append(ok)
    return _subreaper_state[0]


def reap_adopted_zombies(pgid: int, skip: Iterable[int] = ()) -> list[int]:
    """Reap zombies of group ``pgid`` that were re-parented to this process.

    ``skip`` names pids a :class:`subprocess.Popen` owns: they are reaped through it.
    """
    me, skipped, reaped = os.getpid(), set(skip), []
    for p in list_processes():
        if p.pgid == pgid and p.ppid == me and not p.alive and p.pid not in skipped:
            try:
                os.waitpid(p.pid, os.WNOHANG)
                reaped.append(p.pid)
            except ChildProcessError:
                pass
    return reaped
