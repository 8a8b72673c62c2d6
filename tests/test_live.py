"""Capabilities on real workers: dispatch and execute checks (G1, G2, G5), errors
over the result transport, and live toggles reaching every worker process (G3)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from sqlalchemy import text

from pluginhost import CapabilityDisabled, InvalidInput
from tests.harness import run_cli, wait_until

ROOT = Path(__file__).resolve().parents[1]


def queue_size(app: Any, queue: str) -> int:
    with app.connection_for_write() as conn:
        return int(conn.default_channel.queue_declare(queue, passive=True).message_count)


# -- one worker ------------------------------------------------------------------


@pytest.mark.parametrize("pool", ["prefork", "solo"])
def test_capability_runs_on_a_worker_and_errors_round_trip(core: ModuleType, workers: Any, pool: str) -> None:
    workers("tests.apps.core", pool=pool)
    host = core.host
    out = host.run_capability("work", {"tag": "t1"}).get(timeout=20)
    assert out["config"] == {"colour": "blue", "level": 1} and out["plugin_version"] == 1
    assert host.run_capability("named", {"name": "Ada"}).get(timeout=20) == "hello Ada"
    with pytest.raises(RuntimeError, match="always fails"):
        host.run_capability("failing", {"tag": "f"}).get(timeout=20)
    assert core.executions_of("failing", "f") == 3  # Celery's own retry options apply
    # A run that bypasses dispatch (task.delay) is still checked by the worker,
    # and the error comes back as the same class with the same message.
    host.disable("work", wait=True)
    with pytest.raises(CapabilityDisabled, match="^plugin 'work' is disabled$"):
        host.task("work").delay({"tag": "bypass"}).get(timeout=20)
    with pytest.raises(InvalidInput, match="field 'name' is required"):
        host.task("named").delay({"nom": "x"}).get(timeout=20)
    assert core.executions_of("work", "bypass") == 0


def test_a_run_queued_before_disable_does_not_execute(core: ModuleType, workers: Any) -> None:
    workers("tests.apps.core", pool="prefork")
    host = core.host
    # ETA runs sit in the worker until their time: queued, delivered, not yet run.
    queued = [host.run_capability(slug, {"tag": "late"}, countdown=1.5) for slug in ("work", "skipper", "deferrer")]
    host.disable("work")
    host.disable("skipper")
    assert host.disable("deferrer", wait=True)  # one worker acknowledged all three
    with pytest.raises(CapabilityDisabled):
        queued[0].get(timeout=20)  # on_disabled="fail"
    assert queued[1].get(timeout=20) is None  # on_disabled="skip"
    time.sleep(1.0)
    assert not queued[2].ready()  # on_disabled="defer": waiting for the plugin
    assert core.executions_of("work", "late") == 0
    assert core.executions_of("skipper", "late") == 0
    assert core.executions_of("deferrer", "late") == 0
    host.enable("deferrer")
    assert queued[2].get(timeout=20) == "ran"
    assert core.executions_of("deferrer", "late") == 1


@pytest.mark.parametrize("backend", ["embedded", "redis"], indirect=True)
def test_rejected_dispatch_enqueues_nothing(core: ModuleType, app_conf: dict[str, Any]) -> None:
    host, queue = core.host, app_conf["task_default_queue"]
    host.task("work").apply_async(args=({},), countdown=3600)  # declares the queue
    before = queue_size(core.app, queue)
    host.disable("work")
    bad: list[tuple[str, Any]] = [
        ("work", {"tag": "x"}),  # disabled
        ("named", {"nom": 1}),  # fails input_model
        ("named", [1, 2]),  # not an object
        ("named", {"name": float("nan")}),  # not JSON
        ("nope", {}),  # unknown
    ]
    for slug, payload in bad:
        with pytest.raises((CapabilityDisabled, InvalidInput, LookupError, Exception)):
            host.run_capability(slug, payload)
    assert queue_size(core.app, queue) == before
    host.run_capability("named", {"name": "ok"})
    assert wait_until(lambda: queue_size(core.app, queue) == before + 1, 5)


# -- many workers ----------------------------------------------------------------


class Stream:
    """Dispatches ``work`` runs continuously from a thread, counting refusals."""

    def __init__(self, host: Any, tag: str) -> None:
        self.host, self.tag = host, tag
        self.sent = self.refused = 0
        self.results: list[Any] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.results.append(self.host.run_capability("work", {"tag": self.tag}))
                self.sent += 1
            except CapabilityDisabled:
                self.refused += 1
            time.sleep(0.005)

    def __enter__(self) -> Stream:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def start_four(workers: Any) -> list[Any]:
    return [
        workers("tests.apps.core", pool="prefork", concurrency=2, wait=False),
        workers("tests.apps.core", pool="prefork", concurrency=2, max_tasks_per_child=5, wait=False),
        workers("tests.apps.core", pool="threads", concurrency=2, wait=False),
        workers("tests.apps.core", pool="solo", concurrency=1, wait=False),
    ]


@pytest.mark.parametrize("backend", ["redis", "amqp"], indirect=True)
def test_toggles_reach_every_worker_process_without_restart(core: ModuleType, workers: Any) -> None:
    started = start_four(workers)
    for w in started:
        w.wait_ready(60)
    host = core.host
    pids_before = {w.hostname: sorted(w.children()) for w in started}

    with Stream(host, "live") as stream:
        time.sleep(1.5)
        acked = host.disable("work", wait=True, timeout=1.5)
        disabled_at = time.time()
        time.sleep(1.5)
        enable_called = time.time()
        host.enable("work", wait=True, timeout=1.5)
        enabled_at = time.time()
        time.sleep(1.0)

    assert sorted(acked) == sorted(w.hostname for w in started)
    rows = core.execution_rows("work")
    during = [r for r in rows if disabled_at <= r["at"] < enable_called]
    assert during == [], f"{len(during)} runs started after disable() returned"
    assert any(r["at"] >= enabled_at for r in rows), "runs resumed after enable()"
    assert stream.refused > 0 and stream.sent > 0
    assert len({r["pid"] for r in rows if r["at"] < disabled_at}) >= 4  # many processes took part

    # configure(): every process sees the new config on its next task
    host.configure("work", {"colour": "red", "level": 7}, wait=True, timeout=1.5)
    results = [host.run_capability("work", {"tag": "cfg"}) for _ in range(60)]
    outs = [r.get(timeout=30) for r in results]
    assert {o["config"]["level"] for o in outs} == {7}
    assert len({o["pid"] for o in outs}) >= 3
    # nobody restarted (the max_tasks_per_child worker replaces children by design)
    assert all(w.running for w in started)
    assert sorted(started[0].children()) == pids_before[started[0].hostname]


@pytest.mark.parametrize("backend", ["redis"], indirect=True)
def test_a_paused_worker_converges_within_the_poll_interval(
    core: ModuleType, workers: Any, app_conf: dict[str, Any]
) -> None:
    conf = {**app_conf, "pluginhost_poll_interval_s": 0.5}
    w = workers("tests.apps.core", pool="prefork", conf=conf)
    host = core.host
    w.pause()
    try:
        host.disable("work")  # the broadcast happens while the worker is stopped
        target = host.revision
    finally:
        w.resume()
    assert wait_until(lambda: host.workers(timeout=0.3).get(w.hostname, {}).get("revision") == target, 3.0)
    with pytest.raises(CapabilityDisabled):
        host.task("work").delay({"tag": "paused"}).get(timeout=20)
    assert core.executions_of("work", "paused") == 0


@pytest.mark.parametrize("backend", ["redis", "amqp"], indirect=True)
def test_direct_sql_reaches_workers_by_poll_and_by_refresh(
    core: ModuleType, workers: Any, app_conf: dict[str, Any]
) -> None:
    slow_poll = {**app_conf, "pluginhost_poll_interval_s": 0.5}
    w1 = workers("tests.apps.core", pool="prefork", conf=slow_poll)
    w2 = workers("tests.apps.core", pool="solo", conf={**app_conf, "pluginhost_poll_interval_s": 3600})
    host = core.host
    with host.store.engine.begin() as conn:
        conn.execute(text("UPDATE pluginhost_plugins SET enabled = false WHERE slug = 'work'"))
    target = host.store.revision()
    # the polling worker converges on its own; the other needs `pluginhost refresh`
    assert wait_until(lambda: host.workers(timeout=0.3).get(w1.hostname, {}).get("revision") == target, 3.0)
    assert host.workers(timeout=0.5)[w2.hostname]["revision"] != target
    done = run_cli(app_conf, "tests.apps.core:app", "refresh", "--wait")
    assert done.returncode == 0, done.stderr
    assert "acknowledged by 2 worker(s)" in done.stdout
    revisions = {name: info["revision"] for name, info in host.workers(timeout=0.5).items()}
    assert revisions == {w1.hostname: target, w2.hostname: target}
    with pytest.raises(CapabilityDisabled):
        host.run_capability("work", {})


@pytest.mark.parametrize("backend", ["redis"], indirect=True)
def test_a_forged_refresh_broadcast_changes_nothing(core: ModuleType, workers: Any) -> None:
    w = workers("tests.apps.core", pool="prefork")
    host = core.host
    real = host.revision
    replies = core.app.control.broadcast("pluginhost_refresh", arguments={"revision": 10**9}, reply=True, timeout=1.0)
    assert replies == [{w.hostname: {"revision": real}}]
    assert host.workers()[w.hostname]["revision"] == real
    assert host.run_capability("work", {"tag": "after-forgery"}).get(timeout=20)["config"]["level"] == 1


def test_wait_returns_once_every_registered_worker_has_acknowledged(
    core: ModuleType, workers: Any, app_conf: dict[str, Any]
) -> None:
    """Workers register in the store (worker registry), so ``wait=True`` and
    ``workers()`` stop waiting when every live worker has answered instead of at
    their timeout; a worker that stops leaves the registry, one that dies is
    listed as silent."""
    w1 = workers("tests.apps.core", pool="prefork", concurrency=2)
    w2 = workers("tests.apps.core", pool="solo")
    host = core.host
    both = {w1.hostname, w2.hostname}
    assert wait_until(lambda: set(host.store.live_workers(within_s=30)) == both, 10)

    started = time.monotonic()
    assert set(host.disable("work", wait=True, timeout=10)) == both
    assert set(host.workers(timeout=10)) == both
    assert time.monotonic() - started < 4  # two calls, neither waited its 10 s

    w2.stop()  # warm shutdown: it says goodbye
    assert set(host.store.live_workers(within_s=30)) == {w1.hostname}
    started = time.monotonic()
    assert host.enable("work", wait=True, timeout=10) == [w1.hostname]
    assert time.monotonic() - started < 3

    w1.kill()  # SIGKILL: no goodbye; listed as silent until its heartbeats expire
    found = host.workers(timeout=0.5)
    assert list(found) == [w1.hostname] and found[w1.hostname]["error"] == "registered but did not answer"
    listing = run_cli(app_conf, "tests.apps.core:app", "workers", "--timeout", "0.5")
    assert listing.returncode == 0, listing.stderr
    assert "0 worker(s) answered, 1 without a revision" in listing.stdout


def test_a_worker_started_after_a_toggle_starts_with_the_current_state(core: ModuleType, workers: Any) -> None:
    host = core.host
    host.disable("work")
    pending = host.task("work").delay({"tag": "early"})  # bypasses the dispatch check
    workers("tests.apps.core", pool="prefork")
    with pytest.raises(CapabilityDisabled):
        pending.get(timeout=30)
    assert core.executions_of("work", "early") == 0


@pytest.mark.parametrize("backend", ["embedded"], indirect=True)
def test_the_admin_refresh_task_broadcasts(core: ModuleType, workers: Any) -> None:
    w = workers("tests.apps.core", pool="solo", conf=None)
    host = core.host
    with host.store.engine.begin() as conn:
        conn.execute(text("UPDATE pluginhost_plugins SET sort = 42 WHERE slug = 'work'"))
    revision = core.app.tasks["pluginhost.refresh"].delay().get(timeout=30)
    assert revision == host.store.revision()
    assert wait_until(lambda: host.workers(timeout=0.5).get(w.hostname, {}).get("revision") == revision, 5)
