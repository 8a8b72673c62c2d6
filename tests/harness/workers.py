"""Celery worker subprocesses, for the tests and the benchmarks.

:class:`Worker` is one ``celery worker`` subprocess alone in its own process group,
always stopped with nothing of its group left behind; :class:`WorkerFactory`
starts the workers of one test and stops them all. Workers still running when
this process exits are SIGKILLed (:func:`kill_all_workers`).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.harness.conf import PH_CONF_ENV, REPO_ROOT, register_transport_for
from tests.harness.processes import become_child_subreaper, child_pids, group_members, reap_adopted_zombies


class WorkerError(RuntimeError):
    """A worker did not start, answer or stop as expected."""


#: Workers started and not yet stopped, for the exit-time safety net.
_LIVE_WORKERS: set[Worker] = set()


def kill_all_workers() -> None:
    """SIGKILL every worker group still recorded as running (the safety net)."""
    for worker in list(_LIVE_WORKERS):
        try:
            worker.kill()
        except Exception as exc:  # noqa: BLE001 - the others must die too
            print(f"harness: could not kill {worker!r}: {exc!r}", file=sys.stderr)


atexit.register(kill_all_workers)


class Worker:
    """One ``celery worker`` subprocess, alone in its own process group.

    The group id is the main process's pid, so signals to the group reach the
    prefork pool children (and anything a task started) as well.
    """

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        *,
        name: str,
        hostname: str,
        conf: dict[str, Any],
        log_path: Path,
        argv: Sequence[str],
        queues: Sequence[str],
    ) -> None:
        self.proc = proc
        self.name = name
        self.hostname = hostname
        self.conf = conf
        self.queues = list(queues)
        self.log_path = log_path
        self.argv = list(argv)
        self.paused = False
        self.stopping = False
        # set once the group is gone and reaped: its pgid may then be reused by an
        # unrelated process, so no signal is sent to it any more
        self.finished = False
        self._control_app: Any = None

    # -- starting ---------------------------------------------------------------

    @classmethod
    def start(
        cls,
        app_module: str,
        conf: dict[str, Any],
        *,
        pool: str = "prefork",
        concurrency: int | None = 2,
        name: str = "w1",
        queues: Sequence[str] | None = None,
        loglevel: str = "INFO",
        extra_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        conf_env: str | None = PH_CONF_ENV,
        max_tasks_per_child: int | None = None,
        log_dir: Path | None = None,
        die_with_parent: bool = True,
    ) -> Worker:
        """Launch ``celery -A app_module worker`` and return at once (see :meth:`wait_ready`).

        ``conf`` is the worker's Celery settings: remote control (:meth:`ping`)
        uses them, and they reach the app module as JSON in the environment
        variable ``conf_env`` (``PH_CONF``; ``None``: the caller hands the settings
        over itself, through ``env``). ``env`` adds or overrides variables.
        ``queues`` defaults to the conf's ``task_default_queue``; ``concurrency``
        ``None`` leaves Celery's default. Output goes to
        ``<log_dir>/worker-<name>.log`` (appended to), ``log_dir`` defaulting to a
        new temporary directory.

        ``die_with_parent``: the worker gets SIGKILL when the thread that started it
        ends (Linux's parent-death signal, set by util-linux ``setpriv`` where it is
        installed). That covers a test run killed outright, which no atexit hook
        survives: the worker's own process group escapes a kill of pytest's group.
        Start workers from the main thread, or from a thread that outlives them, or
        pass ``False``.
        """
        if pool not in ("prefork", "solo", "threads", "gevent"):
            raise ValueError(f"pool must be prefork, solo, threads or gevent, not {pool!r}")
        from celery.utils.nodenames import host_format

        become_child_subreaper()
        queue_names = list(queues) if queues else [conf.get("task_default_queue", "celery")]
        setpriv = shutil.which("setpriv") if die_with_parent else None
        argv = [
            *([setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []),
            sys.executable, "-m", "celery", "-A", app_module, "worker",
            f"--pool={pool}", *([f"--concurrency={concurrency}"] if concurrency is not None else []),
            "-n", f"{name}@%h", "--without-gossip", "--without-mingle", f"--loglevel={loglevel}",
            "-Q", ",".join(queue_names),
        ]  # fmt: skip
        if max_tasks_per_child is not None:
            argv.append(f"--max-tasks-per-child={max_tasks_per_child}")
        argv.extend(extra_args)

        child_env = dict(os.environ)
        if conf_env is not None:
            child_env[conf_env] = json.dumps(conf)
        child_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
        child_env["PYTHONUNBUFFERED"] = "1"  # prints from tasks reach the log at once
        child_env.update(env or {})

        log_dir = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="ph-worker-"))
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / f"worker-{name}.log"
        with open(log_path, "ab") as log:
            log.write(f"$ {' '.join(argv)}\n".encode())
            log.flush()
            proc = subprocess.Popen(
                argv,
                cwd=REPO_ROOT,
                env=child_env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own session, so own process group: pgid == pid
            )
        worker = cls(
            proc,
            name=name,
            hostname=host_format(f"{name}@%h"),
            conf=conf,
            log_path=log_path,
            argv=argv,
            queues=queue_names,
        )
        _LIVE_WORKERS.add(worker)
        return worker

    def __repr__(self) -> str:
        return f"<Worker {self.hostname} pid={self.pid} returncode={self.proc.returncode}>"

    # -- state --------------------------------------------------------------------

    @property
    def pid(self) -> int:
        """Pid of the worker's main process."""
        return self.proc.pid

    @property
    def pgid(self) -> int:
        """Its process group: the main process leads it."""
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        """Exit status once reaped (negative: killed by that signal), else ``None``."""
        return self.proc.poll()

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def children(self) -> list[int]:
        """Pids of the main process's live children (the prefork pool processes)."""
        return child_pids(self.pid)

    def group_pids(self) -> list[int]:
        """Pids of every live process in the worker's group, main process included."""
        return group_members(self.pgid)

    def log_text(self) -> str:
        """Everything the worker has written so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    # -- remote control -----------------------------------------------------------

    def control_app(self) -> Any:
        """A throwaway Celery app with the worker's settings, for remote control."""
        if self._control_app is None:
            from celery import Celery

            register_transport_for(self.conf)
            app = Celery("ph-harness-control", set_as_current=False)
            app.conf.update(self.conf)
            self._control_app = app
        return self._control_app

    def ping(self, timeout: float = 0.5) -> bool:
        """Whether the worker answers a ``ping`` broadcast within ``timeout`` seconds."""
        app = self.control_app()
        # a connection of our own: kombu's process-wide pool is shared with the test's app
        with app.connection_for_write() as conn:
            return self._ping(app, conn, timeout)

    def _ping(self, app: Any, conn: Any, timeout: float) -> bool:
        replies = app.control.ping(destination=[self.hostname], timeout=timeout, limit=1, connection=conn)
        return any(self.hostname in reply for reply in replies or ())

    def wait_ready(self, timeout: float = 30.0, *, ping_timeout: float = 0.5) -> float:
        """Ping until the worker answers; return the seconds it took.

        A ping sent before the worker listens is lost and costs the whole attempt's
        timeout, so attempts start at 0.1 s and grow to ``ping_timeout``; a ping
        answers in milliseconds once the worker listens. Raises
        :class:`WorkerError`, with the end of the worker's log, if the process exits
        first or ``timeout`` passes.
        """
        started = time.monotonic()
        deadline = started + timeout
        attempt_timeout = min(0.1, ping_timeout)
        app = self.control_app()
        last_error: BaseException | None = None
        conn = app.connection_for_write()
        try:
            while True:
                if not self.running:
                    raise WorkerError(
                        f"{self.hostname} exited with {self.returncode} before answering "
                        f"a ping; log {self.log_path}:\n{self.log_tail()}"
                    )
                try:
                    if self._ping(app, conn, timeout=attempt_timeout):
                        return time.monotonic() - started
                except Exception as exc:  # noqa: BLE001 - broker not up yet: keep polling
                    last_error = exc
                    conn.close()
                    conn = app.connection_for_write()
                    time.sleep(0.1)
                if time.monotonic() >= deadline:
                    raise WorkerError(
                        f"{self.hostname} did not answer a ping within {timeout} s"
                        + (f" (last error: {last_error!r})" if last_error else "")
                        + f"; log {self.log_path}:\n{self.log_tail()}"
                    )
                attempt_timeout = min(attempt_timeout * 1.5, ping_timeout)
        finally:
            conn.close()

    # -- signals ------------------------------------------------------------------

    def _signal_group(self, sig: int) -> None:
        if self.finished:
            return
        try:
            os.killpg(self.pgid, sig)
        except ProcessLookupError:
            pass  # the whole group is gone already

    def pause(self) -> None:
        """SIGSTOP the whole group: the worker stops answering and consuming."""
        self._signal_group(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        """SIGCONT the whole group."""
        self._signal_group(signal.SIGCONT)
        self.paused = False

    # -- stopping -----------------------------------------------------------------

    def request_stop(self, *, group: bool = False) -> None:
        """Send the stop signal without waiting (see :meth:`stop`)."""
        if self.running:
            if group:
                self._signal_group(signal.SIGTERM)
            else:
                os.kill(self.pid, signal.SIGTERM)  # running: not reaped, so still our pid
            # a paused group would hold the SIGTERM until woken up
            self._signal_group(signal.SIGCONT)
            self.paused = False
        self.stopping = True

    def stop(self, timeout: float = 10.0, *, group: bool = False) -> int:
        """Stop the worker and leave no process of its group alive; return its exit status.

        By default SIGTERM goes to the main process only: Celery's warm shutdown,
        which lets running tasks finish and then stops the pool itself (prefork
        children reset SIGTERM to the default action, so a SIGTERM sent to them
        directly kills them mid-task). ``group=True`` sends it to the whole group,
        like systemd's default ``KillMode=control-group``. Whatever is still alive
        ``timeout`` seconds later gets SIGKILL. The main process is always reaped,
        and so are orphaned children re-parented to this process.
        """
        self.request_stop(group=group)
        return self.finish_stop(timeout)

    def finish_stop(self, timeout: float = 10.0) -> int:
        """Wait for a stop :meth:`request_stop` began; SIGKILL the group after ``timeout``."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._signal_group(signal.SIGKILL)
            self.proc.wait()
        self._clear_group()
        return self.proc.returncode

    def kill(self) -> int:
        """SIGKILL the whole group, wait until it is gone and reap it; return the status."""
        self._signal_group(signal.SIGKILL)
        self.proc.wait()
        self._clear_group()
        return self.proc.returncode

    def wait_exit(self, timeout: float = 10.0) -> int:
        """Wait for the main process to exit by itself; reap it; return its status."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise WorkerError(f"{self.hostname} still running after {timeout} s") from None

    def _clear_group(self, grace_s: float = 5.0) -> None:
        """After the main process is reaped: kill stragglers and reap adopted zombies."""
        if self.finished:
            return
        deadline = time.monotonic() + grace_s
        while self.group_pids():
            self._signal_group(signal.SIGKILL)
            if time.monotonic() >= deadline:
                self._forget()
                raise WorkerError(
                    f"{self.hostname}: processes {self.group_pids()} of group {self.pgid} "
                    f"survived SIGKILL for {grace_s} s"
                )
            time.sleep(0.01)
        reap_adopted_zombies(self.pgid, skip=[self.pid])
        self.finished = True
        self._forget()

    def _forget(self) -> None:
        _LIVE_WORKERS.discard(self)
        if self._control_app is not None:
            self._control_app.close()
            self._control_app = None


class WorkerFactory:
    """Starts workers for one test with its settings, and stops every one of them.

    ``factory(app_module, **kw)`` takes :meth:`Worker.start`'s keywords, plus
    ``conf`` (defaults to the test's), ``wait`` (default ``True``: return once the
    worker answers a ping) and ``ready_timeout``. Without ``name``, workers are named
    ``w1``, ``w2``, ... in start order.
    """

    def __init__(self, conf: dict[str, Any], log_dir: Path) -> None:
        self.conf = conf
        self.log_dir = Path(log_dir)
        self.started: list[Worker] = []

    def queues(self) -> set[str]:
        """Every queue a worker of this factory consumed from."""
        return {q for worker in self.started for q in worker.queues}

    def __call__(
        self,
        app_module: str,
        *,
        conf: dict[str, Any] | None = None,
        wait: bool = True,
        ready_timeout: float = 30.0,
        **kwargs: Any,
    ) -> Worker:
        kwargs.setdefault("name", f"w{len(self.started) + 1}")
        kwargs.setdefault("log_dir", self.log_dir)
        worker = Worker.start(app_module, self.conf if conf is None else conf, **kwargs)
        self.started.append(worker)
        if wait:
            worker.wait_ready(ready_timeout)
        return worker

    def stop_all(self, timeout: float = 10.0, *, graceful: bool = False, group: bool = False) -> list[str]:
        """Stop every worker; return a description of each failure.

        By default each group gets SIGKILL: teardown only has to leave nothing
        behind, and Celery's warm shutdown costs seconds (the prefork pool takes
        about 1.5 s to stop; on the filesystem broker the consumer notices the
        signal only between 2 s polls). ``graceful=True`` sends every worker
        SIGTERM at once (to its whole group with ``group=True``, see
        :meth:`Worker.stop`) and SIGKILLs what is left after ``timeout``.
        """
        problems = []
        if graceful:
            for worker in self.started:
                try:
                    worker.request_stop(group=group)
                except Exception as exc:  # noqa: BLE001 - reported; finish_stop SIGKILLs it
                    problems.append(f"{worker!r}: {exc!r}")
        deadline = time.monotonic() + timeout
        for worker in self.started:
            try:
                if graceful:
                    worker.finish_stop(max(deadline - time.monotonic(), 0.0))
                else:
                    worker.kill()
            except Exception as exc:  # noqa: BLE001 - reported; the others must stop too
                problems.append(f"{worker!r}: {exc!r}")
        return problems
