"""A deployment's first start, in the order it really happens: the worker before
its database exists. The app module imports without touching the store, the worker
says in one line what is wrong and keeps running, and once the database exists the
schema is created without a CLI call and runs go through."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests import harness

ROOT = Path(__file__).resolve().parents[1]
APP = "tests.apps.declared_app"
REDIS_ONLY = pytest.mark.parametrize("backend", ["redis"], indirect=True)


@REDIS_ONLY
def test_a_worker_started_before_its_database_exists_waits_for_it(app_conf: dict[str, Any], workers: Any) -> None:
    problem = harness.check_service("postgres")
    if problem:
        pytest.skip(harness.service_down_message("postgres", problem))
    name = f"{harness.PG_DB_PREFIX}{os.getpid()}_first_{uuid.uuid4().hex[:6]}"
    harness.drop_pg_database(name)
    conf = {**app_conf, "pluginhost_store": harness.pg_url(name)}
    env = {**os.environ, harness.PH_CONF_ENV: json.dumps(conf), "PYTHONPATH": str(ROOT)}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(Path(sys.executable).parent / "pluginhost"), "--app", f"{APP}:app", *args],
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=90,
        )  # fmt: skip

    try:
        imported = subprocess.run([sys.executable, "-c", f"import {APP}"], env=env, cwd=ROOT, timeout=60)
        assert imported.returncode == 0  # declaring touches no store
        worker = workers(APP, conf=conf, pool="prefork", concurrency=1)
        deadline = time.monotonic() + 15
        while "does not exist" not in worker.log_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        log = worker.log_text()
        assert f'database "{name}" does not exist' in log, log[-2000:]
        assert "Traceback" not in log, log[-3000:]
        refused = cli("run", "hello")
        assert refused.returncode == 1 and "does not exist" in refused.stderr, refused.stderr
        assert "unreachable" not in refused.stderr  # it answered: the cause is named, not guessed
        assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr

        harness.create_pg_database(name)  # the operator creates it; nobody runs db upgrade
        done = cli("run", "greet_flow", "--input", '{"name": "Ada"}', "--wait", "--timeout", "60")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["greeting"] == "hello Ada"
        assert worker.running
        shown = cli("workflows", "show", "greeting", "--json")
        assert shown.returncode == 0 and json.loads(shown.stdout)["steps"][0]["slug"] == "hello"
    finally:
        workers.stop_all()
        harness.drop_pg_database(name)
