"""The app every benchmark uses: one PluginHost, one capability and one bare Celery
task wrapping the *same* function object.

Configured from the ``BENCH_CONF`` environment variable (a JSON object, written by
``benchmarks/common.py``)::

    {"celery": {...Celery settings, pluginhost_store included...},
     "redis_url": "redis://127.0.0.1:6379/9",   # where the function reports
     "mode": "none" | "count" | "record" | "latency",
     "key": "bench:count"}

``mode`` decides what the function body does, identically for both tasks:

- ``none``: nothing (dispatch benchmark: messages are never executed);
- ``count``: ``INCR key`` (execution benchmark counts completions);
- ``record``: ``RPUSH key "<time.time()> <pid>"`` taken at the *start* of the run
  (propagation benchmark: which process started a run, and when).
- ``latency``: ``RPUSH key "<payload['sent']> <time.time()> <pid>"`` at the start of
  the run (storm benchmark: the producer's send time, when the body started, where).

Tasks:

- ``pluginhost.capability.bench``  the capability (plugin ``bench``), pluginhost defaults
  (``acks_late=True``, ``reject_on_worker_lost=True``);
- ``bench.bare``                  a plain ``@app.task`` of the same function;
- ``bench.bare_late``             the same with ``acks_late=True, reject_on_worker_lost=True``,
  to tell pluginhost's own cost apart from the cost of its default delivery mode.

Worker: ``BENCH_CONF='{...}' celery -A benchmarks.apps.bench worker``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from celery import Celery

from pluginhost import PluginHost

CONF_ENV = "BENCH_CONF"
CAPABILITY = "bench"
PLUGIN = "bench"
BARE = "bench.bare"
BARE_LATE = "bench.bare_late"


@dataclass
class Bench:
    app: Celery
    host: PluginHost
    work: Callable[[dict[str, Any]], None]
    capability: Any  # the capability's Celery task
    bare: Any
    bare_late: Any


def make_body(mode: str, redis_url: str | None, key: str) -> Callable[[dict[str, Any]], None]:
    """The function both tasks run (one object, shared)."""
    state: dict[str, Any] = {"pid": None, "client": None}

    def client() -> Any:
        if state["pid"] != os.getpid():  # one connection pool per process (fork-safe)
            import redis

            state["client"] = redis.Redis.from_url(redis_url)
            state["pid"] = os.getpid()
        return state["client"]

    if mode == "count":

        def work(payload: dict[str, Any]) -> None:
            client().incr(key)

    elif mode == "record":

        def work(payload: dict[str, Any]) -> None:
            client().rpush(key, f"{time.time():.6f} {os.getpid()}")

    elif mode == "latency":

        def work(payload: dict[str, Any]) -> None:
            client().rpush(key, f"{payload.get('sent', 0.0)} {time.time():.6f} {os.getpid()}")

    elif mode == "none":

        def work(payload: dict[str, Any]) -> None:
            return None

    else:
        raise ValueError(f"unknown mode {mode!r}")
    return work


def make_app(conf: dict[str, Any], name: str = "bench") -> Bench:
    """A fresh app + host + tasks from a BENCH_CONF-shaped dict."""
    app = Celery(name, set_as_current=False)
    app.conf.update(conf.get("celery", {}))
    host = PluginHost(app)
    work = make_body(conf.get("mode", "none"), conf.get("redis_url"), conf.get("key", "bench:count"))
    opts: dict[str, Any] = {"ignore_result": bool(conf.get("ignore_result", True))}
    host.register_capability(CAPABILITY, work, plugin=PLUGIN, **opts)
    bare = app.task(name=BARE, shared=False, lazy=False, **opts)(work)
    bare_late = app.task(name=BARE_LATE, shared=False, lazy=False, acks_late=True, reject_on_worker_lost=True, **opts)(
        work
    )
    return Bench(app, host, work, host.task(CAPABILITY), bare, bare_late)


def conf_from_env() -> dict[str, Any]:
    raw = os.environ.get(CONF_ENV)
    return json.loads(raw) if raw else {}


# Module level, for `celery -A benchmarks.apps.bench worker`.
bench = make_app(conf_from_env())
app = bench.app
host = bench.host
