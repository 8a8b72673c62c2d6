"""The revision reads: the store's hot path (every dispatch check, worker polls
and refreshes), on connections of their own, outside any pool."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

from ..errors import StoreUnavailable
from .deadline import Breaker, Overrun
from .postgres import QUERY_CANCELED, UNDEFINED_TABLE, ReadFailed

REVISION_SQL = "SELECT revision FROM pluginhost_revision WHERE id = 1"


class Reader(Protocol):
    def read(self, deadline: float) -> int: ...

    def close(self) -> None: ...


class RevisionReaders:
    """A bounded free list of revision readers (postgres.PgRevisionReader, or
    ``DbapiReader`` on SQLite).

    A read takes a reader off the list and gives it back after, so each reader
    serves one caller at a time; at most ``idle`` stay open unused, the others
    are closed as they come back. (Not a reader per thread: under gevent a
    thread-local is per greenlet, which made a new connection per task.)
    """

    def __init__(
        self,
        open_reader: Callable[[float], Reader],
        *,
        timeout_s: float,
        idle: int,
        breaker: Breaker,
        unreachable: Callable[[str], StoreUnavailable],
        no_answer: str,
    ) -> None:
        self._open = open_reader
        self._timeout_s = timeout_s
        self._max_idle = idle
        self._idle: list[Reader] = []  # list.pop/append are atomic: no lock on the hot path
        self._breaker = breaker
        self._unreachable = unreachable
        self._no_answer = no_answer

    def read(self) -> int:
        """The store's revision, within the deadline (``StoreUnavailable`` past it)."""
        deadline = time.monotonic() + self._timeout_s
        try:
            reader = self._idle.pop()
        except IndexError:
            return self._read_on_new(deadline)
        try:
            revision = reader.read(deadline)
        except Exception as exc:
            # an idle reader that died (an outage that is over): once more on a
            # new one, within the same deadline
            return self._failed(exc, reader, deadline, retry=True)
        self._give_back(reader)
        return revision

    def close(self) -> None:
        while self._idle:
            _close_quietly(self._idle.pop())

    def _read_on_new(self, deadline: float) -> int:
        try:
            reader = self._open(deadline)
        except Exception as exc:
            return self._failed(exc, None, deadline, retry=False)
        try:
            revision = reader.read(deadline)
        except Exception as exc:
            return self._failed(exc, reader, deadline, retry=False)
        self._give_back(reader)
        return revision

    def _failed(self, exc: Exception, reader: Reader | None, deadline: float, *, retry: bool) -> int:
        sqlstate = exc.sqlstate if isinstance(exc, ReadFailed) else None
        if sqlstate == QUERY_CANCELED:
            # the server gave up at its statement_timeout (a lock held that long):
            # it answered, so the reader is still good
            self._give_back(reader)
            raise self._unreachable(f"{self._no_answer}: {exc}") from None
        if reader is not None:
            _close_quietly(reader)
        if isinstance(exc, Overrun):  # no answer at all: a stalled server or network path
            self._breaker.trip()
            raise self._unreachable(self._no_answer) from None
        if sqlstate == UNDEFINED_TABLE or _is_missing_table(exc):
            return 0  # not migrated yet
        if retry:
            return self._read_on_new(deadline)
        raise self._unreachable(_first_line(exc)) from None

    def _give_back(self, reader: Reader | None) -> None:
        if reader is None:
            return
        if len(self._idle) < self._max_idle:
            self._idle.append(reader)
        else:
            _close_quietly(reader)


class DbapiReader:
    """A revision reader on a DB-API connection (SQLite)."""

    __slots__ = ("conn", "cur")

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.cur = conn.cursor()

    def read(self, _deadline: float) -> int:
        self.cur.execute(REVISION_SQL)
        rows = self.cur.fetchall()  # to the end: no statement left open holding a read snapshot
        return int(rows[0][0]) if rows else 0

    def close(self) -> None:
        self.conn.close()


def _close_quietly(reader: Reader) -> None:
    try:
        reader.close()
    except Exception:  # the connection is already gone
        pass


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _is_missing_table(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "no such table" in text or "does not exist" in text and "relation" in text
