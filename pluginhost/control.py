"""Live toggles on every worker process.

How a change reaches a task that is about to run:

1. An admin call commits to the store (the revision moves in the same
   transaction) and broadcasts ``pluginhost_refresh``, which carries only the
   new revision number.
2. The worker's main process handles the broadcast: it re-reads the revision
   *from the store* (so a forged number changes nothing) and publishes it in a
   shared-memory integer created before the pool forked.
3. Every pool process (prefork children, threads, solo) compares that integer
   with the revision of its own view before each task, and catches up when it
   is behind (only the rows changed since its revision, see ``PluginView``):
   no query per task, no restart. Neither the broadcast handler nor the poll
   loads anything: both only publish a number, and a process that finds itself
   several revisions behind catches up once, to the newest.
4. A consumer timer polls the store revision every ``pluginhost_poll_interval``
   seconds, for workers that missed a broadcast or changes made by direct SQL.

Each worker also reports itself alive in the store's worker registry (on
start, every ``pluginhost_heartbeat_interval`` seconds, and it removes itself
when it stops), so ``wait=True`` knows how many acknowledgements to expect.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import socket
import threading
import weakref
from typing import TYPE_CHECKING, Any

from celery import bootsteps, signals
from celery.worker.control import control_command, inspect_command

from . import settings
from .capability import TASK_PREFIX
from .errors import PluginHostError, StoreUnavailable
from .store.base import Store, WorkerRegistry

if TYPE_CHECKING:
    from celery import Celery

    from .view import PluginView

log = logging.getLogger("pluginhost.control")

REFRESH_COMMAND = "pluginhost_refresh"
REVISION_COMMAND = "pluginhost_revision"
REFRESH_TASK = "pluginhost.refresh"

#: The worker link of each app's host (what the remote-control commands use).
LINKS: weakref.WeakKeyDictionary[Celery, WorkerLink] = weakref.WeakKeyDictionary()


class WorkerLink:
    """A view's tie to the worker it runs in (inactive outside workers): the
    published revision, the poll, the registry heartbeat."""

    def __init__(self, view: PluginView) -> None:
        self.view = view
        self.main_pid: int | None = None
        self.hostname: str | None = None
        self._outage = False
        self._registry_broken = False
        self._publish = threading.Lock()

    @property
    def shared(self) -> Any:
        """The published revision, shared with forked children (None outside a worker)."""
        return self.view.published

    @shared.setter
    def shared(self, value: Any) -> None:
        self.view.published = value

    @property
    def active(self) -> bool:
        return self.view.published is not None

    def start(self, hostname: str | None = None) -> None:
        """In the worker's main process, before the pool starts."""
        self.shared = multiprocessing.RawValue("q", -1)
        self.main_pid = os.getpid()
        self.hostname = hostname
        view = self.view
        try:
            view.ensure_ready()
            view.catch_up()  # a view made before the worker started may be behind
            self.shared.value = view.revision
            log.info("pluginhost: loaded %d plugins at revision %d", len(view.slugs()), view.revision)
        except StoreUnavailable as exc:
            # Fail closed: with no view, pool processes load one themselves before
            # a task, and capability runs wait (retried) until one loads.
            self._report(exc)

    def sync(self) -> int:
        """In the main process: read the store revision and publish it.

        Returns the published revision. It only moves forward: the poll (a timer,
        on some transports in a thread of its own) and the broadcast handler both
        call this, and a read that started earlier may finish later.
        """
        try:
            revision = self.view.store.revision()
        except StoreUnavailable as exc:
            self._report(exc)
            return int(self.shared.value)
        self._recovered()
        with self._publish:
            if revision > self.shared.value:
                self.shared.value = revision
            return int(self.shared.value)

    def heartbeat(self) -> None:
        """In the main process: report this worker alive, at the revision it applied."""
        self._registry(lambda registry, name: registry.report_worker(name, int(self.shared.value)))

    def forget(self) -> None:
        """In the main process, when the worker stops consuming: leave the registry."""
        self._registry(lambda registry, name: registry.forget_worker(name))

    def _registry(self, call: Any) -> None:
        registry = self.view.store
        if self.hostname is None or not isinstance(registry, WorkerRegistry):
            return
        try:
            call(registry, self.hostname)
            self._registry_broken = False
        except StoreUnavailable as exc:
            if not self._registry_broken:  # once, not every heartbeat
                self._registry_broken = True
                log.info("pluginhost: worker registry not updated (%s); wait=True calls wait their whole timeout", exc)

    def _report(self, exc: Exception) -> None:
        if self._outage:
            return  # once per outage, not once per poll
        self._outage = True
        log.warning("pluginhost: store unavailable: %s", exc)

    def _recovered(self) -> None:
        if self._outage:
            self._outage = False
            log.warning("pluginhost: store reachable again")


def install(app: Celery, link: WorkerLink) -> None:
    """Wire a view's worker link into its app's workers: signals, the poll step,
    the admin task."""
    LINKS[app] = link

    def on_worker_init(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is app:
            link.start(getattr(sender, "hostname", None))

    def on_child_init(**_: Any) -> None:
        if link.active:
            after_fork = getattr(link.view.store, "after_fork", None)
            if after_fork is not None:
                after_fork()

    signals.worker_init.connect(on_worker_init, weak=False)
    signals.worker_process_init.connect(on_child_init, weak=False)
    app.steps["worker"].add(JsonOnlyStep)
    app.steps["consumer"].add(PollStep)

    @app.task(name=REFRESH_TASK, shared=False, lazy=False)
    def refresh(revision: int | None = None) -> int:
        """Admin task: tell every worker to re-read the store."""
        current = link.view.store.revision()
        broadcast_refresh(app, current)
        return current


def unsafe_serialisation(app: Celery) -> str | None:
    """Why ``app`` would accept pickled capability messages, or None if it does not."""
    problems = []
    for setting in ("accept_content", "result_accept_content"):
        accepted = app.conf.get(setting) or []
        if any("pickle" in str(c) for c in accepted):
            problems.append(f"{setting} includes pickle")
    for setting in ("task_serializer", "result_serializer"):
        if "pickle" in str(app.conf.get(setting)):
            problems.append(f"{setting} is pickle")
    for name, task in app.tasks.items():
        if name.startswith(TASK_PREFIX) and "pickle" in str(getattr(task, "serializer", "")):
            problems.append(f"task {name} uses the pickle serializer")
    if not problems:
        return None
    return (
        "pluginhost refuses to start: "
        + "; ".join(problems)
        + ". Capability messages must be JSON (accept_content=['json']): a pickled"
        " message runs arbitrary code on the worker."
    )


class JsonOnlyStep(bootsteps.StartStopStep):
    """Worker step: refuse to start if capability tasks could accept pickle."""

    def start(self, parent: Any) -> None:
        problem = unsafe_serialisation(parent.app)
        if problem:
            raise PluginHostError(problem)


class PollStep(bootsteps.StartStopStep):
    """Consumer step: poll the store revision on the worker's timer."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.trefs: list[Any] = []

    def start(self, parent: Any) -> None:
        link = LINKS.get(parent.app)
        if link is None or not link.active:
            return
        # Registered once the consumer is up (it can answer broadcasts from now on).
        link.heartbeat()
        self.trefs = [
            parent.timer.call_repeatedly(poll_interval(parent.app), link.sync, priority=10),
            parent.timer.call_repeatedly(heartbeat_interval(parent.app), link.heartbeat, priority=10),
        ]

    def stop(self, parent: Any) -> None:
        for tref in self.trefs:
            tref.cancel()
        self.trefs = []
        link = LINKS.get(parent.app)
        if link is not None and link.active:
            link.forget()  # stopping, or the broker connection is lost: not reachable


def poll_interval(app: Celery) -> float:
    return float(settings.value(app, "pluginhost_poll_interval_s"))


def heartbeat_interval(app: Celery) -> float:
    return float(settings.value(app, "pluginhost_heartbeat_interval_s"))


def registered_workers(app: Celery, store: Store) -> dict[str, int] | None:
    """``{hostname: revision}`` of the workers the store's registry holds alive
    (reported within three heartbeats), or None without a registry."""
    if not isinstance(store, WorkerRegistry):
        return None
    try:
        return store.live_workers(within_s=3 * heartbeat_interval(app))
    except StoreUnavailable:
        return None


@control_command(args=[("revision", int)], signature="[revision]")
def pluginhost_refresh(state: Any, revision: int | None = None, **_: Any) -> dict[str, Any]:
    """Re-read the store revision and publish it to the pool. The number in the
    message is only a hint; the store is the authority."""
    link = LINKS.get(state.consumer.app)
    if link is None or not link.active:
        return {"error": "no pluginhost on this worker"}
    return {"revision": link.sync()}


@inspect_command()
def pluginhost_revision(state: Any, **_: Any) -> dict[str, Any]:
    """The store revision this worker has published to its pool."""
    link = LINKS.get(state.consumer.app)
    if link is None or not link.active:
        return {"error": "no pluginhost on this worker"}
    pool = state.consumer.pool
    return {
        "revision": int(link.shared.value),
        "pool": type(pool).__name__ if pool is not None else None,
        "processes": list(getattr(pool, "info", {}).get("processes", []) or []),
        "pid": os.getpid(),
        "host": socket.gethostname(),
    }


def broadcast_refresh(
    app: Celery,
    revision: int,
    *,
    wait: bool = False,
    timeout: float = 1.0,
    destination: list[str] | None = None,
) -> list[str]:
    """Broadcast ``pluginhost_refresh`` (to ``destination`` only, if given); with
    ``wait``, the hostnames that applied ``revision`` (collected until every
    destination answered, or ``timeout``).

    A failed broadcast is logged, not raised: the store already holds the
    change, and workers converge by polling.
    """
    limit = len(destination) if wait and destination else None
    try:
        replies = app.control.broadcast(
            REFRESH_COMMAND,
            arguments={"revision": revision},
            reply=wait,
            timeout=timeout,
            destination=destination,
            limit=limit,
        )
    except Exception as exc:  # broker down: the change is committed, polling delivers it
        log.warning("pluginhost: refresh broadcast failed (%s); workers will converge by polling", exc)
        return []
    if not wait:
        return []
    wanted = set(destination) if destination else None
    return sorted(
        name
        for reply in replies or []
        for name, body in reply.items()
        if (wanted is None or name in wanted) and isinstance(body, dict) and int(body.get("revision", -1)) >= revision
    )


def worker_revisions(
    app: Celery, *, timeout: float = 1.0, destination: list[str] | None = None
) -> dict[str, dict[str, Any]]:
    """``{hostname: {"revision": ..., "pool": ..., ...}}`` for every worker that
    answers (of ``destination``, if given: until all of them answered, or ``timeout``)."""
    limit = len(destination) if destination else None
    replies = app.control.broadcast(REVISION_COMMAND, reply=True, timeout=timeout, destination=destination, limit=limit)
    return {name: body for reply in replies or [] for name, body in reply.items()}
