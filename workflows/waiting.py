"""Durable waits at run time: the wait task, and the waker in every worker.

A run that reaches a ``Sleep`` or ``WaitFor`` stops: the wait task records the
wait (``store/waits.py``) and sends nothing, so the run holds no worker slot and
no broker message. Celery's own ETA/countdown would keep the message in a
worker's memory the whole time (and on Redis it is delivered again each time
``visibility_timeout`` passes). Every worker runs a waker thread
(``WakeStep``) that claims due wake-ups and sends their runs on: the stages
after the wait, built like a resume (``compile.build(from_stage=...)``), with
the run id as the result id. No extra process is needed; with no worker
running, due runs wait until one starts (late, not lost).
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from typing import Any

from celery import Celery, Task, bootsteps

from pluginhost import StoreUnavailable, settings

from . import metrics
from .compile import build
from .errors import WaitTimedOut
from .runtime import TASK_OPTIONS, Runtime, send_again
from .store.outcome import unwrap
from .store.waits import RECEIVED, TIMED_OUT, Wake

log = logging.getLogger("workflows")

WAIT_TASK = "workflows.wait"
#: Wake-ups one claim takes at most (a claimer loops while it gets this many).
WAKE_BATCH = 100

_WAITING: weakref.WeakKeyDictionary[Celery, Waiting] = weakref.WeakKeyDictionary()

#: Held by a waker while it claims and sends, and by ``os.fork``: a prefork pool
#: forks children (``max_tasks_per_child``, a replaced child) while the waker
#: thread runs, and a child forked while that thread held a lock (the engine's
#: pool, a socket's) would inherit it held and hang. A fork waits for the
#: waker's current round (bounded by the store's deadline); the waker waits for
#: the fork.
_FORK_GUARD = threading.Lock()


def _renew_fork_guard() -> None:
    global _FORK_GUARD
    _FORK_GUARD = threading.Lock()  # the child's own, free (its parent's waker is not in it)


os.register_at_fork(
    before=lambda: _FORK_GUARD.acquire(),
    after_in_parent=lambda: _FORK_GUARD.release(),
    after_in_child=_renew_fork_guard,
)


class Waiting:
    """The wait task of one app, and how its runs are sent on."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

        @rt.host.app.task(name=WAIT_TASK, bind=True, **TASK_OPTIONS)
        def wait(
            task: Task,
            context: Any,
            run_id: str,
            stage: int,
            *,
            kind: str,
            seconds: float | None = None,
            signal: str | None = None,
            on_timeout: str | None = None,
        ) -> None:
            """Stop a run at a wait (``Sleep``, ``WaitFor``): record its wake-up in
            the store and end the chain (a worker's waker sends the run on)."""
            self.reach(task, context, run_id, stage, kind, seconds, signal, on_timeout)

        rt.wait_task = wait

    @classmethod
    def for_runtime(cls, rt: Runtime) -> Waiting:
        """The waits of ``rt``'s app (the task and the worker step are added once per app)."""
        found = _WAITING.get(rt.host.app)
        if found is None:
            found = _WAITING[rt.host.app] = cls(rt)
            rt.host.app.steps["consumer"].add(WakeStep)
        return found

    def reach(
        self,
        task: Task,
        context: Any,
        run_id: str,
        stage: int,
        kind: str,
        seconds: float | None,
        signal: str | None,
        on_timeout: str | None,
    ) -> None:
        """The wait task's body: record the wait (and the outcomes the chain
        carried). A store it cannot reach sends the delivery again later (not
        lost, not failed); a signal that came first sends the run on at once."""
        context, carried = unwrap(context)
        try:
            row = self.rt.waits.reach(
                run_id,
                stage,
                kind=kind,
                signal=signal,
                on_timeout=on_timeout,
                seconds=seconds,
                context=context,
                carried=carried,
            )
        except StoreUnavailable as exc:
            if task.request.is_eager:
                raise
            countdown = self.rt.store_wait(task)
            log.warning("wait %s of run %s sent again in %.1fs: %s", stage, run_id, countdown, exc)
            send_again(task, countdown)
        if row is not None and row.status == "waiting" and row.outcome == RECEIVED:
            self.wake_due(owner(task.request.hostname), run_id=run_id, stage=stage)

    def wake_due(self, claimer: str, *, run_id: str | None = None, stage: int | None = None) -> int:
        """Claim the due wake-ups (or the one of ``run_id``/``stage``) and send
        their runs on; returns how many were claimed."""
        wakes = self.rt.waits.claim_due(claimer, WAKE_BATCH, run_id=run_id, stage=stage)
        self.send_claimed(wakes, claimer)
        return len(wakes)

    def send_claimed(self, wakes: list[Wake], claimer: str) -> None:
        """Send claimed wake-ups on, in order; one that cannot be sent (the broker
        is away) is given back with the rest, so the next poll tries again at
        once rather than after the lease."""
        for index, wake in enumerate(wakes):
            try:
                self.send_on(wake)
            except StoreUnavailable:
                raise  # the rows stay claimed: claimed again once the lease has passed
            except Exception:
                for left in wakes[index:]:
                    self._release(left, claimer)
                raise

    def _release(self, wake: Wake, claimer: str) -> None:
        try:
            self.rt.waits.release(wake, claimer)
        except StoreUnavailable:
            log.warning("wake-up of run %s stays claimed until its lease ends (store unreachable)", wake.run_id)

    def send_on(self, wake: Wake) -> None:
        """Send a claimed wait's run on: the stages after the wait, with the
        context it stopped with (and the signal's payload, and
        ``signals.<name>``); or, for a signal that timed out, what
        ``on_timeout`` says. The row is done only after the send: a claimer
        that dies in between leaves it to be claimed again."""
        rt = self.rt
        context = dict(wake.context)
        if wake.kind == "signal" and wake.signal is not None:
            marks = context.get("signals")
            marks = dict(marks) if isinstance(marks, dict) else {}
            marks[wake.signal] = wake.outcome
            if wake.outcome == RECEIVED:
                context.update(wake.payload)
            context["signals"] = marks
            if wake.outcome == TIMED_OUT and wake.on_timeout == "fail":
                self._fail(wake)
                return
            if wake.outcome == TIMED_OUT and wake.on_timeout == "skip":
                rt.waits.end_after(wake, reason=f"wait for signal {wake.signal!r} timed out")
                self._send(rt.finish_task.signature((context, wake.run_id)), wake.run_id)
                rt.waits.sent(wake)
                return
        wf = rt.definition(wake.name, wake.version)
        self._send(build(rt, wf, wake.run_id, context, from_stage=wake.stage + 1), wake.run_id)
        rt.waits.sent(wake)

    def _fail(self, wake: Wake) -> None:
        error = WaitTimedOut(f"run {wake.run_id}: no signal {wake.signal!r} before the wait's timeout")
        self.rt.waits.end_after(wake, error=f"WaitTimedOut: {error}")
        metrics.run_finished(wake.name, "failed")
        try:
            self.rt.host.app.backend.mark_as_failure(wake.run_id, error)
        except Exception:  # noqa: BLE001 - no result backend (or it is down): the run row says it
            log.debug("could not store the failure of run %s", wake.run_id, exc_info=True)

    def _send(self, canvas: Any, run_id: str) -> None:
        """Send a run's canvas under its run id. The sender does not wait for the
        result: the result backend's subscription to it (Redis) is dropped."""
        canvas.apply_async(task_id=run_id)
        consumer = getattr(self.rt.host.app.backend, "result_consumer", None)
        cancel = getattr(consumer, "cancel_for", None)
        if cancel is not None:
            try:
                cancel(run_id)
            except Exception:  # noqa: BLE001 - best effort: the subscription ends with the process
                log.debug("could not stop listening for run %s", run_id, exc_info=True)


def owner(hostname: str | None) -> str:
    """Who holds a wake-up claim: the worker's host name and this process."""
    return f"{hostname or 'local'}:{os.getpid()}"


class WakeStep(bootsteps.StartStopStep):
    """Consumer step: every worker claims due wake-ups of sleeping and waiting
    runs every ``pluginhost_workflows_wake_poll_s`` and sends them on, in a
    thread of its own, so a slow or unreachable store never holds up the
    worker's event loop (its broadcasts, heartbeats and task deliveries)."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.waker: Waker | None = None

    def start(self, parent: Any) -> None:
        waiting = _WAITING.get(parent.app)
        if waiting is None:
            return
        interval = float(settings.value(parent.app, "pluginhost_workflows_wake_poll_s"))
        self.waker = Waker(waiting, owner(getattr(parent, "hostname", None)), interval)
        self.waker.start()

    def stop(self, parent: Any) -> None:
        if self.waker is not None:
            self.waker.stop()
            self.waker = None

    def shutdown(self, parent: Any) -> None:
        self.stop(parent)


class Waker(threading.Thread):
    """The thread behind ``WakeStep``."""

    def __init__(self, waiting: Waiting, claimer: str, interval: float) -> None:
        super().__init__(name="workflows-waker", daemon=True)
        self.waiting, self.claimer, self.interval = waiting, claimer, interval
        self._stopped = threading.Event()

    def run(self) -> None:
        while not self._stopped.wait(self.interval):
            try:
                while not self._stopped.is_set():
                    with _FORK_GUARD:
                        if self.waiting.wake_due(self.claimer) < WAKE_BATCH:
                            break
            except StoreUnavailable as exc:
                log.warning("workflow wake-ups not claimed (tried again in %.1fs): %s", self.interval, exc)
            except Exception:  # noqa: BLE001 - keep claiming: a claimed row is claimed again after the lease
                log.exception("workflow wake-ups: claim or send failed")

    def stop(self, timeout: float = 5.0) -> None:
        self._stopped.set()
        if self is not threading.current_thread():
            self.join(timeout)
