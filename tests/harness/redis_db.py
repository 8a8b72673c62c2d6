"""Redis db indexes taken by one session at a time, tests and benchmarks alike.

A session takes an index with :func:`claim_redis_db`: the db must be empty and
unowned, or owned by a session that is gone; it is flushed and marked with
:data:`REDIS_OWNER_KEY` (``<hostname>:<pid>``, expiring after a TTL). Tests take
one of 1..15, benchmarks one of 9..15 (their own preferred first), so a benchmark
and a pytest session never share a db. A db holding keys but no owner key belongs
to someone who does not use this protocol and is left alone; so is index 0.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable

from tests.harness.processes import pid_alive
from tests.harness.services import LOCALHOST, REDIS_PORT

#: Redis key that marks a db index as taken by one session.
REDIS_OWNER_KEY = "pluginhost:test-harness:owner"
#: How long a test session's claim lasts if it is never released.
REDIS_CLAIM_TTL_S = 6 * 3600
#: The indexes a test session may take.
TEST_REDIS_DBS = range(1, 16)
#: Set to a number to use that Redis db index instead of claiming a free one (tests).
REDIS_DB_ENV = "PH_TEST_REDIS_DB"

# Flushes the db and marks it ours in one step, but only if it is still unowned and
# empty (someone else's data otherwise), or still owned by the dead session we saw:
# no other session can slip in between.
_CLAIM_REDIS_DB = """
local owner = redis.call('GET', KEYS[1])
if owner == false then
  if redis.call('DBSIZE') > 0 then return 0 end
elseif owner ~= ARGV[2] then
  return 0
end
redis.call('FLUSHDB')
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3])
return 1
"""


def redis_url(index: int) -> str:
    """URL of a db index on the local server."""
    return f"redis://{LOCALHOST}:{REDIS_PORT}/{index}"


def redis_owner() -> str:
    """This process's owner value: ``<hostname>:<pid>``."""
    return f"{socket.gethostname()}:{os.getpid()}"


def claim_redis_db(owner: str, indexes: Iterable[int] = TEST_REDIS_DBS, *, ttl_s: int = REDIS_CLAIM_TTL_S) -> int:
    """Take the first free index of ``indexes``, flushed empty, owned by ``owner`` for ``ttl_s``.

    Free: empty and unowned, or owned by a process of this host that no longer runs.
    Raises :class:`RuntimeError` when every one is taken.
    """
    import redis

    host = socket.gethostname()
    tried = list(indexes)
    for index in tried:
        client = redis.Redis(host=LOCALHOST, port=REDIS_PORT, db=index)
        try:
            current = _text(client.get(REDIS_OWNER_KEY))
            if current and _owner_alive(current, host):
                continue
            if client.eval(_CLAIM_REDIS_DB, 1, REDIS_OWNER_KEY, owner, current, ttl_s):
                return index
        finally:
            client.close()
    raise RuntimeError(f"every Redis db index of {_describe(tried)} is claimed by a running session")


def forced_redis_db() -> int | None:
    """The index :data:`REDIS_DB_ENV` names, flushed, or ``None`` when it is not set."""
    import redis

    if not os.environ.get(REDIS_DB_ENV):
        return None
    index = int(os.environ[REDIS_DB_ENV])
    client = redis.Redis(host=LOCALHOST, port=REDIS_PORT, db=index)
    try:
        client.flushdb()
    finally:
        client.close()
    return index


def release_redis_db(index: int, owner: str, *, forced: bool = False) -> None:
    """Flush a claimed db and give it back, if ``owner`` still owns it (or it was ``forced``)."""
    import redis

    client = redis.Redis(host=LOCALHOST, port=REDIS_PORT, db=index)
    try:
        if forced or _text(client.get(REDIS_OWNER_KEY)) == owner:
            client.flushdb()
    finally:
        client.close()


def _text(value: bytes | str | None) -> str:
    return value.decode() if isinstance(value, bytes) else (value or "")


def _owner_alive(owner: str, host: str) -> bool:
    owner_host, _, pid = owner.rpartition(":")
    if owner_host != host or not pid.isdigit():
        return True  # another machine's session: leave it alone until its TTL ends
    return pid_alive(int(pid))


def _describe(indexes: list[int]) -> str:
    if len(indexes) > 1 and sorted(indexes) == list(range(min(indexes), max(indexes) + 1)):
        return f"{min(indexes)}..{max(indexes)}"
    return ", ".join(map(str, indexes))
