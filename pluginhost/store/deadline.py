"""Deadlines for store calls (``pluginhost_store_timeout_s``).

A database that stops answering without closing its connections (a stalled
network path, a hung pgbouncer) must cost a caller at most the timeout, never a
hang. The revision reads wait on their socket with a deadline themselves
(``wait_socket``, postgres.py). Calls through the SQLAlchemy pool cannot: the
driver waits as long as it takes. For them:

- ``Call``: the deadline of one pooled call and the driver connections it uses;
- ``WATCHDOG``: one thread per process that, past a call's deadline, shuts its
  sockets down: the driver's blocked wait returns at once ("server closed the
  connection") and the store reports the timeout;
- ``Breaker``: once a call got no answer within its deadline, the calls after it
  fail at once while one probe in the background retries, so a caller that
  calls often (a worker's event loop) is not blocked timeout after timeout.
"""

from __future__ import annotations

import heapq
import itertools
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any


class Overrun(Exception):
    """A store call's deadline passed (internal: the store turns it into ``StoreUnavailable``)."""


def wait_socket(fd: int, *, write: bool, deadline: float) -> None:
    """Wait until ``fd`` is readable (or writable), or raise ``Overrun`` at ``deadline``.

    ``select.select`` is looked up at each call: under gevent's monkey patching it
    is the cooperative one.
    """
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise Overrun()
    if write:
        _, ready, _ = select.select((), (fd,), (), remaining)
    else:
        ready, _, _ = select.select((fd,), (), (), remaining)
    if not ready:
        raise Overrun()


class Call:
    """One pooled store call: its deadline, and the psycopg ``PGconn``s it uses."""

    __slots__ = ("at", "fired", "committing", "done", "_lock", "_conns")

    def __init__(self, timeout_s: float) -> None:
        self.at = time.monotonic() + timeout_s
        self.fired = False  # the watchdog cut this call's connections off
        self.committing = False  # a COMMIT was sent: past here, a lost answer means "unknown"
        self.done = False
        self._lock = threading.Lock()  # attach/detach in the caller vs expire in the watchdog
        self._conns: list[Any] = []

    def attach(self, pgconn: Any) -> None:
        """``pgconn`` serves this call from now on (cut off at once if the call is late)."""
        with self._lock:
            self._conns.append(pgconn)
            if self.fired or self.at <= time.monotonic():
                self.fired = True
                shutdown(pgconn)

    def detach(self, pgconn: Any) -> None:
        """``pgconn`` is being closed: its descriptor may be reused, never touch it again."""
        with self._lock:
            self._conns = [c for c in self._conns if c is not pgconn]

    def expire(self) -> None:
        with self._lock:
            if not self.done:
                self.fired = True
                for pgconn in self._conns:
                    shutdown(pgconn)

    def finish(self) -> None:
        with self._lock:
            self.done = True
            self._conns = []


def shutdown(pgconn: Any) -> None:
    """Shut the socket of ``pgconn`` down. ``shutdown()`` acts on the socket itself,
    so the driver's blocked wait returns at once; the driver's descriptor stays
    open (only a duplicate is closed here), so it cannot be reused under its feet."""
    try:
        sock = socket.socket(fileno=os.dup(pgconn.socket))
    except Exception:  # closed meanwhile: nothing to cut
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        sock.close()


class Watchdog:
    """The thread that expires overrunning pooled calls: a heap of deadlines,
    started on first use (again in a forked child, which has no such thread)."""

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, Call]] = []
        self._seq = itertools.count()
        self._started = False

    def arm(self, call: Call) -> None:
        with self._cond:
            if not self._started:
                self._started = True
                name = "pluginhost-store-watchdog"
                threading.Thread(target=self._run, name=name, daemon=True).start()
            heapq.heappush(self._heap, (call.at, next(self._seq), call))
            if self._heap[0][2] is call:
                self._cond.notify()

    def _run(self) -> None:
        cond, heap = self._cond, self._heap
        while True:
            with cond:
                now = time.monotonic()
                due = []
                # finished calls leave the heap lazily, once they reach its top
                while heap and (heap[0][2].done or heap[0][0] <= now):
                    call = heapq.heappop(heap)[2]
                    if not call.done:
                        due.append(call)
                if not due:
                    cond.wait(heap[0][0] - now if heap else None)
                    continue
            for call in due:
                call.expire()


WATCHDOG = Watchdog()


class Breaker:
    """Whether the store stopped answering (open), and the probe that finds out
    when it answers again.

    Opened only by a call that got *no* answer within its deadline (a hung
    server or network path; a lock wait ends with the server's own answer, its
    statement timeout). ``probe`` makes one attempt and returns whether the store
    answered (an error is an answer); it runs in a thread of its own, one at a
    time, until the store answers.
    """

    def __init__(self, probe: Callable[[], bool]) -> None:
        self._probe = probe
        self._cond = threading.Condition()
        self.open = False
        self.since = 0.0

    def trip(self) -> None:
        with self._cond:
            if self.open:
                return
            self.open = True
            self.since = time.monotonic()
        threading.Thread(target=self._run, name="pluginhost-store-probe", daemon=True).start()

    def wait(self, timeout_s: float) -> bool:
        """Whether the store answers again, waiting at most ``timeout_s`` for the probe."""
        with self._cond:
            return self._cond.wait_for(lambda: not self.open, timeout_s)

    def _run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                answered = self._probe()
            except Exception:
                answered = True  # not a stall: callers will see the error themselves
            if answered:
                with self._cond:
                    self.open = False
                    self._cond.notify_all()
                return
            # an attempt that failed at once is not repeated in a hot loop
            time.sleep(max(0.0, 0.05 - (time.monotonic() - started)))
