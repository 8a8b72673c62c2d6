"""A test's Celery settings: the backend matrix, per-test isolation, the hand-over
to worker processes (``PH_CONF``) and the test process's own app.

A test's settings travel to worker processes as JSON in the ``PH_CONF`` environment
variable; the test app modules that workers load (``tests/apps/*.py``) read them
with :func:`conf_from_env` at import. In the test process ``PH_CONF`` is normally
unset, and the test applies the settings itself with :func:`configure_app`.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import threading
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tests.harness.postgres import pg_url
from tests.harness.redis_db import redis_url
from tests.harness.services import AMQP_URL

if TYPE_CHECKING:
    from tests.harness.session import SessionResources

#: The repository: workers run there, with it first on ``PYTHONPATH``.
REPO_ROOT = Path(__file__).resolve().parents[2]

#: Environment variable holding a JSON object of Celery settings (and
#: ``pluginhost_store``) for the app module a worker loads.
PH_CONF_ENV = "PH_CONF"

#: Broker URL scheme of pluginhost's filesystem transport; importing
#: ``pluginhost.transport`` registers it with kombu.
PLUGINHOST_FS_SCHEME = "pluginhost-fs"


# -- the hand-over ----------------------------------------------------------------


def conf_from_env(environ: dict[str, str] | None = None) -> dict[str, Any]:
    """The Celery settings in ``PH_CONF``, or ``{}`` when it is not set.

    Test app modules call this at import: ``app.conf.update(conf_from_env())``.
    """
    raw = (os.environ if environ is None else environ).get(PH_CONF_ENV)
    if not raw:
        return {}
    conf = json.loads(raw)
    if not isinstance(conf, dict):
        raise TypeError(f"{PH_CONF_ENV} must hold a JSON object, got {type(conf).__name__}")
    register_transport_for(conf)
    return conf


def register_transport_for(conf: dict[str, Any]) -> None:
    """Import the module that registers the conf's broker transport, if it is ours."""
    if str(conf.get("broker_url", "")).startswith(PLUGINHOST_FS_SCHEME):
        importlib.import_module("pluginhost.transport")


# -- backends -----------------------------------------------------------------------


@dataclass(frozen=True)
class Backend:
    """One (broker, result backend, store) combination the tests run against.

    ``services`` are the servers it needs up; ``make_conf(tmp_dir, resources)``
    builds its Celery settings (``pluginhost_store`` included) without the
    per-test isolation keys, which :func:`build_conf` adds.
    """

    id: str
    broker: str
    result_backend: str
    store: str
    services: tuple[str, ...]
    make_conf: Callable[[Path, SessionResources], dict[str, Any]]

    def __str__(self) -> str:
        return self.id


@cache
def _pluginhost_embedded_conf() -> Callable[[Path], dict[str, Any]] | None:
    """``pluginhost.embedded.embedded_conf`` if that module exists, else ``None``.

    A module that exists but fails to import raises: that is a bug to see, not a
    reason to test something else.
    """
    if importlib.util.find_spec("pluginhost.embedded") is None:
        return None
    return importlib.import_module("pluginhost.embedded").embedded_conf


def _stock_filesystem_conf(tmp_dir: Path) -> dict[str, Any]:
    """What ``embedded_conf`` gives, on kombu's stock ``filesystem://`` transport.

    Only used while ``pluginhost.embedded`` does not exist. Note that the stock
    transport can hand a consumer a half-written message (kombu #1551).
    """
    tmp_dir = tmp_dir.resolve()
    data = tmp_dir / "broker" / "data"
    control = tmp_dir / "broker" / "control"
    for folder in (data, control):
        folder.mkdir(parents=True, exist_ok=True)
    return {
        "broker_url": "filesystem://",
        "broker_transport_options": {
            "data_folder_in": str(data),
            "data_folder_out": str(data),
            "control_folder": str(control),
            "polling_interval": 0.01,
        },
        "result_backend": f"db+sqlite:///{tmp_dir / 'results.db'}",
        "result_chord_retry_interval": 0.05,
        "pluginhost_store": f"sqlite:///{tmp_dir / 'pluginhost.db'}",
    }


def _embedded_conf(tmp_dir: Path, resources: SessionResources) -> dict[str, Any]:
    factory = _pluginhost_embedded_conf()
    data_dir = tmp_dir / "embedded"
    if factory is not None:
        return factory(data_dir)
    return _stock_filesystem_conf(data_dir)


def _redis_conf(tmp_dir: Path, resources: SessionResources) -> dict[str, Any]:
    url = redis_url(resources.redis_db())
    return {
        "broker_url": url,
        "result_backend": url,
        "pluginhost_store": pg_url(resources.pg_database()),
    }


def _amqp_conf(tmp_dir: Path, resources: SessionResources) -> dict[str, Any]:
    return {
        "broker_url": AMQP_URL,
        "result_backend": redis_url(resources.redis_db()),
        "pluginhost_store": pg_url(resources.pg_database()),
    }


BACKENDS: dict[str, Backend] = {
    b.id: b
    for b in (
        Backend(
            "embedded",
            broker="pluginhost-fs:// (kombu filesystem:// until pluginhost.embedded exists)",
            result_backend="db+sqlite (file in the test's tmp dir)",
            store="sqlite (file in the test's tmp dir)",
            services=(),
            make_conf=_embedded_conf,
        ),
        Backend(
            "redis",
            broker="redis (session's db index)",
            result_backend="redis (same db)",
            store="postgresql (session's database)",
            services=("redis", "postgres"),
            make_conf=_redis_conf,
        ),
        Backend(
            "amqp",
            broker="rabbitmq (guest, vhost /)",
            result_backend="redis (session's db index)",
            store="postgresql (session's database)",
            services=("rabbitmq", "redis", "postgres"),
            make_conf=_amqp_conf,
        ),
    )
}
BACKEND_IDS: tuple[str, ...] = tuple(BACKENDS)


# -- one test's settings -----------------------------------------------------------


def isolation_conf(tag: str) -> dict[str, Any]:
    """Settings that keep one test's messages away from every other test's.

    A queue of its own for tasks, and a control exchange of its own, so broadcasts
    (ping, pluginhost's refresh) reach only this test's workers even on a broker
    that other test sessions share.
    """
    return {
        "task_default_queue": f"phq-{tag}",
        "control_exchange": f"phc-{tag}",
    }


def build_conf(backend: Backend, tmp_dir: Path, resources: SessionResources, tag: str | None = None) -> dict[str, Any]:
    """The complete settings for one test: the backend's plus isolation keys."""
    conf: dict[str, Any] = {"broker_connection_retry_on_startup": True}
    conf.update(backend.make_conf(tmp_dir, resources))
    conf.update(isolation_conf(tag or uuid.uuid4().hex[:12]))
    json.dumps(conf)  # it has to travel through PH_CONF: fail here, not in a worker
    return conf


def delete_broker_objects(conf: dict[str, Any], queues: Iterable[str]) -> None:
    """Delete a test's queues and exchanges on an AMQP broker (RabbitMQ keeps them).

    Deletes each queue and the direct exchange of the same name that Celery
    declares for it, and the test's two remote-control exchanges
    (``<control_exchange>.pidbox`` and ``reply.<control_exchange>.pidbox``, which
    kombu declares without auto-delete). Does nothing on other brokers: Redis is
    flushed at session end and the filesystem broker lives in the tmp dir.
    """
    from kombu import Connection

    if not str(conf.get("broker_url", "")).startswith("amqp"):
        return
    control = conf.get("control_exchange", "celery")
    exchanges = {*queues, f"{control}.pidbox", f"reply.{control}.pidbox"}
    with Connection(conf["broker_url"]) as conn:
        channel = conn.default_channel
        for name in sorted(set(queues)):
            channel.queue_delete(name)
        for name in sorted(exchanges):
            channel.exchange_delete(name)


# -- the test process's own app ------------------------------------------------------


def configure_app(app: Any, conf: dict[str, Any]) -> Any:
    """Point an already imported Celery app at ``conf`` and return it.

    ``app.conf.update`` alone is not enough once the app has been used: it caches
    its broker pool, backend, ``amqp`` (queues, routes) and ``control`` (the
    control exchange), built from the settings of the time. Those are dropped here
    and rebuilt on next use. Task class attributes that Celery copies from the
    settings when a task is bound (``acks_late``, ``ignore_result``, serializer,
    ...) are not re-read; workers are unaffected, they build their app from
    ``PH_CONF``.
    """
    reset_app(app)
    register_transport_for(conf)
    app.conf.update(conf)
    return app


def reset_app(app: Any) -> None:
    """Drop the connections and objects an app built from its earlier settings."""
    backend = app._backend  # the cached result backend, if any (never creates one)
    if backend is not None:
        _close_backend(backend)
    app._backend_cache = None
    app._local = threading.local()  # thread-local backend and thread oid
    # kombu keeps connection pools in one process-wide map keyed by broker URL and
    # options, shared by every app using the same broker: forget ours, close none.
    app._pool = None
    for name in ("amqp", "control", "events"):
        app.__dict__.pop(name, None)


def _close_backend(backend: Any) -> None:
    consumer = getattr(backend, "result_consumer", None)
    if consumer is not None:
        consumer.stop()  # the Redis result backend's pub/sub connection
    session_manager = getattr(backend, "session_manager", None)
    if session_manager is not None:
        session_manager.invalidate(backend.url)  # a database backend's engine
    client = getattr(backend, "client", None)
    pool = getattr(client, "connection_pool", None)
    if pool is not None:
        pool.disconnect()
