"""The processes of a history run: the four workers (by name, restartable with the
same hostname) and the producer/admin subprocesses. Each is stopped by pid, with a
timeout, then SIGKILLed with its process group.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests import harness
from tests.history.events import DIR_ENV, PROC_ENV, EventLog

APP = "tests.history.app"
#: (name, pool, concurrency, max_tasks_per_child)
WORKERS: tuple[tuple[str, str, int, int | None], ...] = (
    ("w1", "prefork", 2, None),
    ("w2", "threads", 2, None),
    ("w3", "solo", 1, None),
    ("w4", "prefork", 2, 3),
)


class Workers:
    """The run's four workers, by name; a killed worker is started again with the
    same name (hostname). Implements ``faults.WorkerPool``."""

    def __init__(self, conf: dict[str, Any], log_dir: Path, events_dir: Path) -> None:
        from celery.utils.nodenames import host_format

        self.conf, self.log_dir, self.events_dir = conf, log_dir, events_dir
        self.specs = {name: (pool, c, mtpc) for name, pool, c, mtpc in WORKERS}
        self.hostnames = {name: host_format(f"{name}@%h") for name in self.specs}
        self.current: dict[str, harness.Worker] = {}
        self.every: list[harness.Worker] = []

    def names(self) -> list[str]:
        return sorted(self.specs)

    def hostname(self, name: str) -> str:
        return self.hostnames[name]

    def _launch(self, name: str) -> harness.Worker:
        pool, concurrency, mtpc = self.specs[name]
        worker = harness.Worker.start(
            APP, self.conf, pool=pool, concurrency=concurrency, name=name, max_tasks_per_child=mtpc,
            log_dir=self.log_dir,
            env={DIR_ENV: str(self.events_dir), PROC_ENV: name, "PH_HISTORY_HOSTNAME": self.hostnames[name]},
        )  # fmt: skip
        self.current[name] = worker
        self.every.append(worker)
        return worker

    def start_all(self, timeout_s: float = 90.0) -> None:
        started = [self._launch(name) for name in self.names()]
        for worker in started:
            worker.wait_ready(timeout_s)

    def group_pids(self, name: str) -> list[int]:
        w = self.current[name]
        return [] if w.finished else w.group_pids()

    def kill(self, name: str) -> None:
        self.current[name].kill()

    def restart(self, name: str, *, wait: bool = True) -> int:
        old = self.current[name]
        if not old.finished:
            old.kill()
        worker = self._launch(name)
        if wait:
            worker.wait_ready(90.0)
        return worker.pid

    def wait_all_ready(self, timeout_s: float = 90.0) -> None:
        """Every current worker answers a ping (one that exited is started again)."""
        for name in self.names():
            worker = self.current[name]
            if not worker.running:
                worker = self.current[name] = self._launch(name)
            worker.wait_ready(timeout_s)

    def pause(self, name: str) -> None:
        self.current[name].pause()

    def resume(self, name: str) -> None:
        self.current[name].resume()

    def stop_all(self) -> list[str]:
        problems = []
        for worker in self.every:
            try:
                worker.kill()
            except Exception as exc:  # noqa: BLE001 - the others must stop too
                problems.append(f"{worker!r}: {exc!r}")
        return problems


class Roles:
    """The producer and admin subprocesses (``python -m tests.history.roles``)."""

    def __init__(self, log_dir: Path, events_dir: Path, log: EventLog) -> None:
        self.log_dir, self.events_dir, self.log = log_dir, events_dir, log
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, role: str, name: str, conf: dict[str, Any], seed: int, *extra: str) -> None:
        setpriv = shutil.which("setpriv")
        argv = [
            *([setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []),
            sys.executable, "-m", "tests.history.roles", role, "--name", name, "--seed", str(seed), *extra,
        ]  # fmt: skip
        env = dict(os.environ)
        env.update({
            harness.PH_CONF_ENV: json.dumps(conf), DIR_ENV: str(self.events_dir), PROC_ENV: name,
            "PYTHONPATH": os.pathsep.join(p for p in (str(harness.REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p),
            "PYTHONUNBUFFERED": "1",
        })  # fmt: skip
        with open(self.log_dir / f"{name}.log", "ab") as out:
            self.procs[name] = subprocess.Popen(
                argv, cwd=harness.REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        waiting = set(self.procs)
        while waiting:
            for name in sorted(waiting):
                if any("role_ready" in p.read_text() for p in self.events_dir.glob(f"{name}-*.jsonl")):
                    waiting.discard(name)
                elif self.procs[name].poll() is not None:
                    raise RuntimeError(f"{name} exited with {self.procs[name].returncode}:\n{self.log_tail(name)}")
            if waiting and time.monotonic() > deadline:
                raise RuntimeError(f"{sorted(waiting)} not ready after {timeout_s} s")
            time.sleep(0.1)

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.log_dir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def stop_all(self, timeout_s: float = 8.0) -> list[str]:
        """SIGTERM all at once; SIGKILL the group of any still running after ``timeout_s``."""
        problems = []
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for name, proc in self.procs.items():
            how = "exited"
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                how = "SIGKILL"
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    problems.append(f"{name} (pid {proc.pid}) survived SIGKILL")
            self.log.emit("role_stopped", role_proc=name, how=how, returncode=proc.returncode)
            if proc.returncode not in (0, -signal.SIGKILL) and how == "exited":
                problems.append(f"{name} exited with {proc.returncode}:\n{self.log_tail(name)}")
        self.procs.clear()
        return problems
