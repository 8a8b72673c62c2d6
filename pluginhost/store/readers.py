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

    def send(self, deadline: float) -> None:
        """Send the read and return without its answer (``receive`` reads it)."""

    def receive(self, deadline: float) -> int: ...

    def close(self) -> None: ...


class PendingRevision:
    """A revision read sent and not yet answered (``RevisionReaders.begin``).

    ``result()`` waits for the answer within the read's deadline (the errors of
    ``RevisionReaders.read``), once; ``discard()`` gives the reader back without
    the value (an exception before the answer was needed). One of them must run,
    or the reader is dropped unused."""

    __slots__ = ("_readers", "_reader", "_deadline", "_error", "_value", "_kept")

    def __init__(
        self,
        readers: RevisionReaders | None,
        reader: Reader | None = None,
        deadline: float = 0.0,
        error: Exception | None = None,
        value: int | None = None,
        *,
        kept: bool = False,
    ) -> None:
        self._readers, self._reader, self._deadline, self._error = readers, reader, deadline, error
        self._value = value
        self._kept = kept  # an idle reader: one that died since its last use is replaced once

    @classmethod
    def answered(cls, value: int) -> PendingRevision:
        """A read that already has its answer (a store without asynchronous reads)."""
        return cls(None, value=value)

    def result(self) -> int:
        if self._value is not None:
            return self._value
        readers, reader, self._reader = self._readers, self._reader, None
        assert readers is not None, "a pending revision read is answered once"
        if self._error is not None:  # the send failed: what a read would have done
            self._value = readers._failed(self._error, reader, self._deadline, retry=self._kept)
            return self._value
        assert reader is not None
        try:
            value = reader.receive(self._deadline)
        except Exception as exc:
            self._value = readers._failed(exc, reader, self._deadline, retry=self._kept)
            return self._value
        readers._give_back(reader)
        self._value = value
        return value

    def discard(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None and self._value is None and self._error is None:
            try:
                reader.receive(self._deadline)
            except Exception:  # noqa: BLE001 - not needed: the reader goes
                _close_quietly(reader)
                return
            assert self._readers is not None
            self._readers._give_back(reader)


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

    def begin(self) -> PendingRevision:
        """Send a revision read and return at once: ``result()`` waits for the
        answer (the dispatch check builds the message meanwhile). The read is on
        the server's side of every commit that finished before this call."""
        deadline = time.monotonic() + self._timeout_s
        kept = True
        try:
            reader = self._idle.pop()
        except IndexError:
            kept = False
            try:
                reader = self._open(deadline)
            except Exception as exc:
                return PendingRevision(self, None, deadline, exc)
        try:
            reader.send(deadline)
        except Exception as exc:
            return PendingRevision(self, reader, deadline, exc, kept=kept)
        return PendingRevision(self, reader, deadline, kept=kept)

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
    """A revision reader on a DB-API connection (SQLite: a local file, nothing to overlap)."""

    __slots__ = ("conn", "cur", "_sent")

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.cur = conn.cursor()
        self._sent: int | None = None

    def read(self, _deadline: float) -> int:
        self.cur.execute(REVISION_SQL)
        rows = self.cur.fetchall()  # to the end: no statement left open holding a read snapshot
        return int(rows[0][0]) if rows else 0

    def send(self, deadline: float) -> None:
        self._sent = self.read(deadline)

    def receive(self, _deadline: float) -> int:
        value, self._sent = self._sent, None
        assert value is not None
        return value

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
