"""The local servers the integration tests talk to, and whether each one is up.

:func:`check_service` answers once per process, in two steps so the message says
which failed: a TCP connect to the port, then a real round trip (``SELECT 1``,
``PING``, an AMQP login and channel).
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass

LOCALHOST = "127.0.0.1"
PG_PORT = 5432
REDIS_PORT = 6379
AMQP_PORT = 5672
PG_ADMIN_DB = "test"
AMQP_URL = f"amqp://guest:guest@{LOCALHOST}:{AMQP_PORT}//"


def _ping_postgres() -> None:
    import psycopg

    from tests.harness.postgres import pg_conninfo

    with psycopg.connect(pg_conninfo(PG_ADMIN_DB), autocommit=True) as conn:
        conn.execute("SELECT 1").fetchone()


def _ping_redis() -> None:
    import redis

    client = redis.Redis(host=LOCALHOST, port=REDIS_PORT, socket_connect_timeout=3, socket_timeout=3)
    try:
        client.ping()
    finally:
        client.close()


def _ping_rabbitmq() -> None:
    from kombu import Connection

    with Connection(AMQP_URL, connect_timeout=3) as conn:
        conn.connect()  # the full AMQP handshake, login included
        conn.default_channel  # noqa: B018 - opening a channel is the real check


@dataclass(frozen=True)
class Service:
    """A local server the integration tests talk to."""

    name: str
    port: int
    start_command: str
    ping: Callable[[], None]


SERVICES: dict[str, Service] = {
    s.name: s
    for s in (
        Service(
            "postgres",
            PG_PORT,
            "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start",
            _ping_postgres,
        ),
        Service(
            "redis",
            REDIS_PORT,
            'redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" '
            "--appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log",
            _ping_redis,
        ),
        Service("rabbitmq", AMQP_PORT, "rabbitmq-server -detached", _ping_rabbitmq),
    )
}

_service_problems: dict[str, str | None] = {}


def check_service(name: str) -> str | None:
    """``None`` if the service answers, else what is wrong. Checked once per process."""
    if name not in _service_problems:
        _service_problems[name] = _probe(SERVICES[name])
    return _service_problems[name]


def _probe(service: Service) -> str | None:
    where = f"{LOCALHOST}:{service.port}"
    try:
        socket.create_connection((LOCALHOST, service.port), timeout=3).close()
    except OSError as exc:
        return f"{service.name} is not reachable at {where} ({exc})"
    try:
        service.ping()
    except Exception as exc:  # noqa: BLE001 - any driver error means "not usable"
        return f"{service.name} at {where} accepts connections but does not answer ({exc!r})"
    return None


def service_down_message(name: str, problem: str) -> str:
    """A message naming the service, what failed and the command that starts it."""
    return f"{problem}; start it with: {SERVICES[name].start_command}"
