"""The store's PostgreSQL connections: the revision readers, the session
timeouts, and the pool events that put pooled connections under a call's deadline."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine, event
from sqlalchemy.exc import DisconnectionError

from .deadline import Call, Overrun, wait_socket

#: SQLSTATE of a statement the server cancelled (here: at its statement_timeout).
QUERY_CANCELED = "57014"
#: SQLSTATE of a missing table (the schema is not migrated yet).
UNDEFINED_TABLE = "42P01"

# A dead peer (a partition that drops packets) is noticed in ~3 s, not hours.
KEEPALIVE: dict[str, Any] = {"keepalives": 1, "keepalives_idle": 1, "keepalives_interval": 1, "keepalives_count": 2}

_TUPLES_OK = 2  # libpq's PGRES_TUPLES_OK (psycopg.pq.ExecStatus.TUPLES_OK)
_FATAL_ERROR = 7  # PGRES_FATAL_ERROR
_SQLSTATE_FIELD = ord("C")  # PG_DIAG_SQLSTATE
_STATEMENT = b"pluginhost_revision"


class ReadFailed(Exception):
    """The server answered with an error, or the connection failed."""

    def __init__(self, message: str, sqlstate: str | None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


def session_sql(timeout_s: float) -> bytes:
    """Session settings for a connection whose calls have ``timeout_s``.

    The server cancels a statement slightly before the client's deadline, so a
    lock wait ends with an answer (the connection stays usable, and no session of
    ours stays queued behind the lock), and a session left idle in a transaction
    by a client that stopped answering is ended (its row locks released) instead
    of holding them until TCP gives up.
    """
    statement_ms = max(1, int(timeout_s * 900))
    idle_ms = max(5000, int(timeout_s * 2000))
    return (f"SET statement_timeout = {statement_ms}; SET idle_in_transaction_session_timeout = {idle_ms}").encode()


def exec_within(pg: Any, command: bytes, deadline: float) -> Any:
    """Run ``command`` (simple protocol, one or more statements) on the libpq
    connection ``pg`` without waiting past ``deadline`` (``Overrun``); returns the
    last result, or raises ``ReadFailed`` for the first error."""
    blocking = not pg.nonblocking
    pg.nonblocking = 1
    try:
        pg.send_query(command)
        return _results(pg, deadline)
    finally:
        if blocking and pg.status == 0:  # CONNECTION_OK: the driver expects a blocking connection
            pg.nonblocking = 0


def _results(pg: Any, deadline: float) -> Any:
    """Flush what was sent, then read every result of it within ``deadline``."""
    while pg.flush():
        wait_socket(pg.socket, write=True, deadline=deadline)
    last = error = None
    while True:
        while pg.is_busy():
            wait_socket(pg.socket, write=False, deadline=deadline)
            pg.consume_input()
        res = pg.get_result()
        if res is None:
            break
        last = res
        if error is None and res.status == _FATAL_ERROR:
            error = res
    if error is not None:
        raise _failed(error)
    return last


class PgRevisionReader:
    """A revision reader on a libpq connection of its own, used by one caller at
    a time (the store keeps idle ones in a free list).

    It never enters SQLAlchemy's pool, so its session state (its prepared
    statement, its ``statement_timeout``) is never seen by a writer. Every wait
    is on the socket with the caller's deadline (nonblocking libpq, ``select``):
    no watchdog is needed, and under gevent a read yields to other greenlets.
    """

    __slots__ = ("pg",)

    def __init__(self, conninfo: bytes, revision_sql: str, timeout_s: float, deadline: float) -> None:
        from psycopg import pq

        self.pg = pg = pq.PGconn.connect_start(conninfo)
        try:
            if pg.status == pq.ConnStatus.BAD:
                raise ReadFailed(_message(pg), None)
            while True:
                state = pg.connect_poll()
                if state == pq.PollingStatus.OK:
                    break
                if state == pq.PollingStatus.FAILED:
                    raise ReadFailed(_message(pg), None)
                wait_socket(pg.socket, write=state == pq.PollingStatus.WRITING, deadline=deadline)
            pg.nonblocking = 1  # a send never blocks on a stalled socket
            # One round trip: the session's timeouts and the prepared statement.
            prepare = b"PREPARE " + _STATEMENT + b" AS " + revision_sql.encode()
            setup = session_sql(timeout_s) + b"; " + prepare
            exec_within(pg, setup, deadline)
        except BaseException:
            pg.finish()
            raise

    def read(self, deadline: float) -> int:
        """The revision; ``Overrun`` at ``deadline`` (the reader is unusable then)."""
        self.send(deadline)
        return self.receive(deadline)

    def send(self, deadline: float) -> None:
        """Send the read (flushed: on its way to the server when this returns)."""
        pg = self.pg
        pg.send_query_prepared(_STATEMENT, None)
        while pg.flush():
            wait_socket(pg.socket, write=True, deadline=deadline)

    def receive(self, deadline: float) -> int:
        """The answer of the read ``send`` sent."""
        res = _results(self.pg, deadline)
        value = res.get_value(0, 0) if res is not None and res.ntuples else None
        return int(value) if value is not None else 0

    def close(self) -> None:
        self.pg.finish()


def _failed(res: Any) -> ReadFailed:
    state = res.error_field(_SQLSTATE_FIELD)
    message = (res.error_message or b"").decode(errors="replace").strip()
    first_line = message.splitlines()[0] if message else "query failed"
    return ReadFailed(first_line, state.decode() if state else None)


def _message(pg: Any) -> str:
    text = (pg.error_message or b"").decode(errors="replace").strip().splitlines()
    return text[0] if text else "connection failed"


def watch_pool(engine: Engine, current_call: Callable[[], Call | None], timeout_s: float | None) -> None:
    """Pool events of a PostgreSQL engine.

    Every checkout hands out a transactional connection (whatever borrowed it
    before: the workflows' hot path borrows connections of the public engine in
    autocommit). With ``timeout_s`` (the store's own pool): connecting is bounded
    by the call's deadline (``current_call``), new connections get the session
    timeouts, and a checkout registers the connection with the call (the watchdog
    cuts it off at the deadline) and pings it within the deadline, so a connection
    killed by an outage that is over is replaced before it is used.
    """

    @event.listens_for(engine, "do_connect")
    def _do_connect(_dialect: Any, _record: Any, _cargs: Any, cparams: dict[str, Any]) -> None:
        call = current_call()
        if call is not None and timeout_s is not None:
            remaining = call.at - time.monotonic()
            if remaining <= 0:
                raise Overrun()
            # libpq bounds connecting in whole seconds, 2 at least
            cparams["connect_timeout"] = max(2, int(remaining))

    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, record: Any) -> None:
        record.info["pluginhost_fresh"] = True
        if timeout_s is not None:
            call = current_call()
            deadline = call.at if call is not None else time.monotonic() + timeout_s
            exec_within(dbapi_conn.pgconn, session_sql(timeout_s), deadline)

    @event.listens_for(engine, "checkout")
    def _checkout(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        if dbapi_conn.autocommit:
            dbapi_conn.autocommit = False
        call = current_call()
        fresh = record.info.pop("pluginhost_fresh", False)
        if call is None or timeout_s is None:
            return
        call.attach(dbapi_conn.pgconn)
        if fresh:
            return
        try:
            exec_within(dbapi_conn.pgconn, b"", call.at)
        except Exception:
            if call.fired or call.at <= time.monotonic():
                raise Overrun() from None  # no answer within the deadline: no second try
            # dead (an outage that is over): SQLAlchemy replaces it and checks out again
            raise DisconnectionError("pooled connection is dead") from None

    @event.listens_for(engine, "close")
    def _close(dbapi_conn: Any, _record: Any) -> None:
        call = current_call()
        if call is not None:
            call.detach(dbapi_conn.pgconn)
