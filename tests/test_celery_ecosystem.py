"""What the README's "Celery ecosystem" section says, on real processes: celery beat
ticking while a plugin is off, a capability in a chord, the task events a monitor
such as Flower sees, and ``celery inspect registered``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from celery import chord

from pluginhost import InvalidInput
from tests.harness import PH_CONF_ENV, REPO_ROOT, wait_until

pytestmark = pytest.mark.parametrize("backend", ["embedded"], indirect=True)
APP = "tests.apps.ecosystem_app"


@pytest.fixture
def eco(app_conf: dict[str, Any], configure_app: Any) -> Iterator[ModuleType]:
    from tests.apps import ecosystem_app as module

    configure_app(module.app)
    module.app.conf.pluginhost_defer_interval_s = 0.2
    module.host.with_store(app_conf["pluginhost_store"])
    module.host.sync()
    yield module
    module.host.store.close()


class Events:
    """Task events from the workers (what Flower and ``celery events`` receive), by task id."""

    def __init__(self, app: Any) -> None:
        self.by_id: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.names: dict[str, str] = {}
        self._app = app
        self._receiver: Any = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._ready = threading.Event()

    def _on_event(self, event: dict[str, Any]) -> None:
        if event["type"].startswith("task-"):
            self.by_id[event["uuid"]].append(event)
            if "name" in event:
                self.names[event["uuid"]] = event["name"]

    def _run(self) -> None:
        with self._app.connection_for_read() as conn:
            self._receiver = self._app.events.Receiver(conn, handlers={"*": self._on_event})
            self._ready.set()
            self._receiver.capture(limit=None, timeout=None, wakeup=False)

    def __enter__(self) -> Events:
        self._thread.start()
        assert self._ready.wait(10)
        time.sleep(0.3)  # the receiver's queue is bound once capture() consumes
        return self

    def __exit__(self, *_: Any) -> None:
        self._receiver.should_stop = True
        self._thread.join(10)

    def ids(self, name: str) -> list[str]:
        return [i for i, n in list(self.names.items()) if n == name]

    def of(self, task_id: str) -> dict[str, dict[str, Any]]:
        """The task's events by type (the filesystem broker may deliver them out of order)."""
        return {e["type"]: e for e in list(self.by_id[task_id])}

    def finished(self, task_id: str) -> bool:
        return bool({"task-failed", "task-succeeded"} & set(self.of(task_id)))


def runs(folder: Path, slug: str) -> int:
    return sum(1 for p in folder.iterdir() if p.name.rsplit("-", 1)[0] == slug)


def test_beat_ticks_while_a_plugin_is_off_follow_the_capability_policy(
    eco: ModuleType, workers: Any, app_conf: dict[str, Any], tmp_path: Path
) -> None:
    ran = tmp_path / "runs"
    ran.mkdir()
    workers(APP, extra_args=["-E"], env={"ECO_RUNS": str(ran)})
    eco.host.disable("report", wait=True)
    eco.host.disable("feed", wait=True)
    with Events(eco.app) as events, open(tmp_path / "beat.log", "wb") as beat_log:
        beat = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                APP,
                "beat",
                "-s",
                str(tmp_path / "beat-schedule"),
                "--loglevel=INFO",
            ],
            cwd=REPO_ROOT,
            env={**os.environ, PH_CONF_ENV: json.dumps(app_conf)},
            stdout=beat_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            ticked = wait_until(
                lambda: all(
                    len(
                        [i for i in events.ids(f"pluginhost.capability.{slug}") if events.finished(i) or slug == "feed"]
                    )
                    >= 3
                    for slug in ("report", "report_tick", "feed")
                ),
                30,
            )
            assert ticked, (tmp_path / "beat.log").read_text()[-2000:]
            time.sleep(0.3)  # the events of ticks in flight
            # the ticks the worker has run while the plugins were off
            fails, skips, deferred = (
                [i for i in events.ids(f"pluginhost.capability.{slug}") if "task-started" in events.of(i)]
                for slug in ("report", "report_tick", "feed")
            )
            assert min(len(fails), len(skips), len(deferred)) >= 3, (fails, skips, deferred)
            assert runs(ran, "report") == runs(ran, "report_tick") == runs(ran, "feed") == 0

            # once the plugins are on again, the next ticks run
            eco.host.enable("report", wait=True)
            eco.host.enable("feed", wait=True)
            assert wait_until(lambda: runs(ran, "report") >= 1 and runs(ran, "report_tick") >= 1, 20)
        finally:
            os.killpg(beat.pid, signal.SIGTERM)
            try:
                beat.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(beat.pid, signal.SIGKILL)
                beat.wait()

        # fail (the default): one FAILURE per tick, CapabilityDisabled
        for task_id in fails:
            seen = events.of(task_id)
            assert "task-skipped" not in seen and "task-succeeded" not in seen, seen
            assert "CapabilityDisabled" in seen["task-failed"]["exception"]
        # skip: a task-skipped event with the reason, then SUCCESS with result None
        for task_id in skips:
            seen = events.of(task_id)
            assert "task-failed" not in seen, seen
            assert seen["task-skipped"]["reason"] == "plugin 'report' is disabled"
            assert seen["task-succeeded"]["result"] == "None"
        # defer: every tick waited (put back: task-retried), and every one of them
        # runs once the plugin is on: the ticks while it was off, and those after
        assert all("task-retried" in events.of(i) for i in deferred), [events.of(i).keys() for i in deferred]
        time.sleep(0.5)  # the last ticks beat sent
        every_feed = events.ids("pluginhost.capability.feed")
        assert len(every_feed) > len(deferred)
        assert wait_until(lambda: runs(ran, "feed") >= len(every_feed), 20), (runs(ran, "feed"), len(every_feed))
        time.sleep(0.5)
        assert runs(ran, "feed") == len(every_feed)


def test_a_capability_is_not_a_chord_callback_but_follows_one_that_collects(eco: ModuleType, workers: Any) -> None:
    workers(APP)
    count, total = eco.host.task("count"), eco.host.task("total")
    header = [count.s({"n": n}) for n in (1, 2, 3)]
    # the callback gets the header's results as a list; a capability's input is an object
    with pytest.raises(InvalidInput, match="capability 'count' input: expected a JSON object, got list"):
        chord(header)(count.s()).get(timeout=30)
    assert chord(header)(eco.collect.s() | total.s()).get(timeout=30) == {"total": 6}


def test_celery_inspect_registered_lists_every_capability_task(
    eco: ModuleType, workers: Any, app_conf: dict[str, Any]
) -> None:
    worker = workers(APP)
    eco.host.disable("report", wait=True)  # enablement is checked per run; registration stays
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", APP, "inspect", "registered", "-d", worker.hostname, "-t", "5"],
        cwd=REPO_ROOT,
        env={**os.environ, PH_CONF_ENV: json.dumps(app_conf)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"->  {worker.hostname}: OK"
    listed = [line.strip().removeprefix("* ") for line in lines[1:] if line.strip().startswith("* ")]
    assert listed == sorted(
        [f"pluginhost.capability.{slug}" for slug in ("count", "feed", "report", "report_tick", "total")]
        + ["ecosystem.collect", "pluginhost.refresh"]
    ), done.stdout
