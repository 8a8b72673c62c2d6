"""The app that ``benchmarks/waits.py`` runs its workers on.

One capability ``wb_step`` and a plain Celery task ``waitsbench.bare`` with the
same body: it pushes ``"<run or task id> <time.time()>"`` onto a Redis list at
its start, so the benchmark measures when a step began. Workflows:
``wb_sleep`` (``Sleep(WAITSBENCH_SLEEP_S)``, then ``wb_step``) and
``wb_signal`` (``WaitFor("go")``, then ``wb_step``).

Settings come from ``WAITSBENCH_CONF`` (JSON: Celery settings plus
``redis_url`` and ``sleep_s``), set before this module is imported.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import redis
from celery import Celery

from pluginhost import PluginHost
from workflows import Sleep, Step, WaitFor, Workflow, Workflows

CONF = json.loads(os.environ.get("WAITSBENCH_CONF", "{}"))
STARTS = "waitsbench:starts"

app = Celery("waits_bench")
app.conf.update(CONF.get("celery", {}))
host = PluginHost(app)
flows = Workflows(host)
_redis = redis.Redis.from_url(CONF.get("redis_url", "redis://127.0.0.1:6379/9"))


def _started(key: str) -> None:
    _redis.rpush(STARTS, f"{key} {time.time():.6f}")


@host.capability("wb_step")
def wb_step(ctx: dict[str, Any]) -> dict[str, Any]:
    _started(str(ctx.get("key")))
    return {"stepped": True}


@app.task(name="waitsbench.bare", ignore_result=False)
def bare(key: str) -> None:
    _started(key)


SLEEPING = Workflow("wb_sleep", steps=[Sleep(float(CONF.get("sleep_s", 60))), Step("wb_step")])
SIGNALLED = Workflow("wb_signal", steps=[WaitFor("go"), Step("wb_step")])
flows.declare(SLEEPING)
flows.declare(SIGNALLED)
