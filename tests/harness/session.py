"""The PostgreSQL database and Redis db index of one pytest session."""

from __future__ import annotations

import os
import threading

from tests.harness.postgres import PG_DB_PREFIX, create_pg_database, drop_pg_database, drop_stale_pg_databases
from tests.harness.redis_db import REDIS_DB_ENV, claim_redis_db, forced_redis_db, redis_owner, release_redis_db


class SessionResources:
    """The PostgreSQL database and Redis db index of one pytest session.

    Each is made on first use, so a run of embedded-only tests touches neither
    server; :meth:`close` drops the database and flushes the Redis db.
    """

    def __init__(self) -> None:
        self.owner = redis_owner()
        self._pg_db: str | None = None
        self._redis_db: int | None = None
        self._redis_forced = False
        self._lock = threading.Lock()

    def pg_database(self) -> str:
        """Name of this session's PostgreSQL database, created on first call."""
        with self._lock:
            if self._pg_db is None:
                drop_stale_pg_databases()
                name = f"{PG_DB_PREFIX}{os.getpid()}"
                create_pg_database(name)
                self._pg_db = name
            return self._pg_db

    def redis_db(self) -> int:
        """This session's Redis db index, claimed and flushed on first call."""
        with self._lock:
            if self._redis_db is None:
                forced = forced_redis_db()
                self._redis_forced = forced is not None
                self._redis_db = forced if forced is not None else self._claim()
            return self._redis_db

    def _claim(self) -> int:
        try:
            return claim_redis_db(self.owner)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}; set {REDIS_DB_ENV} to force one") from None

    def close(self) -> None:
        with self._lock:
            if self._pg_db is not None:
                drop_pg_database(self._pg_db)
                self._pg_db = None
            if self._redis_db is not None:
                release_redis_db(self._redis_db, self.owner, forced=self._redis_forced)
                self._redis_db = None
