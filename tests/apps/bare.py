"""A bare Celery app for the harness self-tests: no pluginhost code at all.

Workers load it with ``celery -A tests.apps.bare``; its settings come from
``PH_CONF`` (see :func:`tests.harness.conf_from_env`).
"""

from __future__ import annotations

import os
import time

from celery import Celery

from tests.harness import conf_from_env

app = Celery("bare")
app.conf.update(conf_from_env())


@app.task(name="bare.add")
def add(x: int, y: int) -> int:
    return x + y


@app.task(name="bare.getpid")
def getpid() -> int:
    """The pid of the process that ran the task (a pool child under prefork)."""
    return os.getpid()


@app.task(name="bare.sleep")
def sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds
