"""The fault injector of a history run: real faults, each one undone.

It runs in the orchestrator's main thread, because it owns what it breaks: the
TCP proxy between the workers/producers and PostgreSQL, the worker processes (it
SIGKILLs and restarts them, so it must reap them; a worker started from another
thread would get the parent-death signal when that thread ends), the private
Redis broker, and the PostgreSQL connection that holds a lock. Everything it
does to the other processes is real: sockets stall, backends are terminated,
the role loses LOGIN, the revision table is locked by another connection,
signals are sent to process groups, the broker restarts empty, messages are
delivered twice.

Each fault records ``fault_start`` and ``fault_end`` events (with the worker, the
pids, the held lock, ...) so the checker can show which fault was active in a
violation's slice. :meth:`Faults.undo_all` puts everything back, whatever state a
failure left it in; the orchestrator calls it in a ``finally``.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any, Protocol

import psycopg
from psycopg import sql

from tests.history.events import EventLog
from tests.servers import PrivateRedis
from tests.tcpproxy import TcpProxy

KINDS = (
    "store_stall",        # the proxy keeps every socket open and forwards nothing
    "store_cut",          # the proxy resets every connection (refusing or blackholing new ones)
    "pg_terminate",       # pg_terminate_backend on the run's database connections
    "role_nologin",       # ALTER ROLE <workers' and producers' role> NOLOGIN, then LOGIN
    "revision_lock",      # LOCK TABLE pluginhost_revision IN ACCESS EXCLUSIVE MODE, held
    "worker_kill",        # SIGKILL a whole worker group, then start it again (same hostname)
    "worker_stop",        # SIGSTOP a whole worker group, then SIGCONT
    "broker_restart",     # the private Redis broker killed or stopped, then started (empty)
    "duplicate_delivery", # a captured task message pushed to the queue again
    "storm",              # 10-20 toggles of other plugins within a second, sometimes one under test too
)  # fmt: skip

#: Plugins only the storm toggles (no capability: registered by the run's setup).
STORM_PLUGINS = tuple(f"storm_{i:02d}" for i in range(12))

#: Seconds each fault is held (uniform between the two).
HOLD_S: dict[str, tuple[float, float]] = {
    # often past two store timeouts (the dispatch deadline): a path without deadlines hangs
    "store_stall": (1.0, 9.0),
    "store_cut": (0.3, 2.0),
    "role_nologin": (1.0, 4.0),
    "revision_lock": (1.0, 9.0),
    "worker_stop": (0.5, 2.5),  # well under the broker's visibility_timeout
    "broker_restart": (0.3, 1.5),
}


class WorkerPool(Protocol):
    """The orchestrator's workers, as the injector uses them."""

    def names(self) -> list[str]: ...
    def hostname(self, name: str) -> str: ...
    def group_pids(self, name: str) -> list[int]: ...
    def kill(self, name: str) -> None: ...
    def restart(self, name: str, *, wait: bool = True) -> int: ...
    def pause(self, name: str) -> None: ...
    def resume(self, name: str) -> None: ...


class Faults:
    """Applies faults at random (``rng``) and undoes them; counts what it did."""

    def __init__(
        self,
        *,
        log: EventLog,
        rng: random.Random,
        proxy: TcpProxy,
        admin_conninfo: str,
        dbname: str,
        role: str,
        broker: PrivateRedis,
        queue: str,
        workers: WorkerPool,
        host: Any = None,
        under_test: tuple[str, ...] = (),
    ) -> None:
        self.log, self.rng = log, rng
        self.proxy, self.admin_conninfo, self.dbname, self.role = proxy, admin_conninfo, dbname, role
        self.broker, self.queue, self.workers = broker, queue, workers
        self.counts: Counter[str] = Counter()
        self._lock_conn: psycopg.Connection[Any] | None = None
        self._nologin = False
        self._paused: set[str] = set()
        self._dead: set[str] = set()
        self._captured: dict[str, dict[str, Any]] = {}
        self._redis: Any = None
        # the storm's admin: a PluginHost of the store (postgres, direct) whose calls
        # are recorded as admin calls of this process, so G1 and G6 judge them too
        self.host, self.under_test = host, under_test
        self._storm_calls = 0

    # -- the loop ---------------------------------------------------------------------

    def run(self, until: float, gap_s: tuple[float, float] = (0.3, 1.2)) -> None:
        """Inject faults until ``time.monotonic() >= until``: first every kind once
        (in a random order), then kinds at random."""
        order = list(KINDS)
        self.rng.shuffle(order)
        retries: Counter[str] = Counter()
        while time.monotonic() < until:
            kind = order.pop(0) if order else self.rng.choice(KINDS)
            if not self.inject(kind) and retries[kind] < 3:
                retries[kind] += 1
                order.append(kind)  # e.g. nothing to deliver twice yet: try it again later
            self.hold(self.rng.uniform(*gap_s))

    def inject(self, kind: str) -> bool:
        """Apply one fault, hold it, undo it; False if it could not be applied now."""
        method: Callable[[], bool | None] = getattr(self, "_" + kind)
        if method() is False:
            return False
        self.counts[kind] += 1
        return True

    def hold(self, seconds: float) -> None:
        """Wait ``seconds``, capturing in-flight task messages meanwhile."""
        deadline = time.monotonic() + seconds
        while True:
            self.capture()
            left = deadline - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(0.2, left))

    def undo_all(self) -> list[str]:
        """Put every fault back; returns what could not be undone (should be nothing)."""
        problems = []
        steps: list[tuple[str, Callable[[], None]]] = [
            ("proxy", self.proxy.restore),
            ("login", lambda: self._set_login(True)),
            ("lock", self._release_lock),
            ("broker", self._broker_up),
        ]
        steps += [(f"resume {n}", lambda n=n: self._resume(n)) for n in sorted(self._paused)]  # type: ignore[misc]
        steps += [(f"restart {n}", lambda n=n: self._restart(n)) for n in sorted(self._dead)]  # type: ignore[misc]
        for what, undo in steps:
            try:
                undo()
            except Exception as exc:  # noqa: BLE001 - the others must be undone too
                problems.append(f"{what}: {exc!r}")
        if self._redis is not None:
            self._redis.close()
            self._redis = None
        return problems

    # -- store faults -----------------------------------------------------------------

    def _store_stall(self) -> None:
        mode = "stall" if hasattr(self.proxy, "stall") else "blackhole"
        self._proxy_fault("store_stall", mode)

    def _store_cut(self) -> None:
        self._proxy_fault("store_cut", self.rng.choice(("cut", "blackhole")))

    def _proxy_fault(self, kind: str, mode: str) -> None:
        hold = self.rng.uniform(*HOLD_S[kind])
        getattr(self.proxy, mode)()
        self.log.emit("fault_start", fault=kind, mode=mode, hold_s=round(hold, 3))
        try:
            self.hold(hold)
        finally:
            self.proxy.restore()
            self.log.emit("fault_end", fault=kind, mode=mode)

    def _pg_terminate(self) -> None:
        role_only = self.rng.random() < 0.6
        share = self.rng.choice((0.5, 1.0))
        self.log.emit("fault_start", fault="pg_terminate", role_only=role_only, share=share)
        killed = 0
        try:
            for _ in range(self.rng.randint(1, 3)):
                killed += self._terminate(role_only, share)
                self.hold(self.rng.uniform(0.05, 0.5))
        finally:
            self.log.emit("fault_end", fault="pg_terminate", backends=killed)

    def _terminate(self, role_only: bool, share: float = 1.0) -> int:
        """Terminate the run's backends (the role's only, or everyone's but ours);
        ``share`` < 1: a random part of them, as when a pooler or the server drops
        some connections and not others."""
        query = "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()" + (
            " AND usename = %s" if role_only else ""
        )
        params = (self.dbname, self.role) if role_only else (self.dbname,)
        with psycopg.connect(self.admin_conninfo, autocommit=True) as conn:
            pids = [int(r[0]) for r in conn.execute(query, params)]
            chosen = [p for p in pids if share >= 1.0 or self.rng.random() < share]
            for pid in chosen:
                conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
        return len(chosen)

    def _role_nologin(self) -> None:
        hold = self.rng.uniform(*HOLD_S["role_nologin"])
        terminate = self.rng.choice((0.0, 0.5, 1.0))  # share of the role's connections killed too
        self._set_login(False)
        self.log.emit("fault_start", fault="role_nologin", role=self.role, terminate=terminate, hold_s=round(hold, 3))
        killed = 0
        try:
            killed = self._terminate(role_only=True, share=terminate) if terminate else 0
            self.hold(hold)
        finally:
            self._set_login(True)
            self.log.emit("fault_end", fault="role_nologin", backends=killed)

    def _set_login(self, allowed: bool) -> None:
        if allowed and not self._nologin:
            return
        with psycopg.connect(self.admin_conninfo, autocommit=True) as conn:
            conn.execute(
                sql.SQL("ALTER ROLE {} " + ("LOGIN" if allowed else "NOLOGIN")).format(sql.Identifier(self.role))
            )
        self._nologin = not allowed

    def _revision_lock(self) -> bool | None:
        hold = self.rng.uniform(*HOLD_S["revision_lock"])
        conn = psycopg.connect(self.admin_conninfo)
        self._lock_conn = conn
        try:
            conn.execute("SET lock_timeout = '3s'")
            conn.execute("LOCK TABLE pluginhost_revision IN ACCESS EXCLUSIVE MODE")
        except psycopg.Error as exc:
            self._release_lock()
            self.log.emit("fault_skipped", fault="revision_lock", reason=str(exc)[:200])
            return False
        self.log.emit("fault_start", fault="revision_lock", hold_s=round(hold, 3))
        try:
            self.hold(hold)
        finally:
            self._release_lock()
            self.log.emit("fault_end", fault="revision_lock")
        return True

    def _release_lock(self) -> None:
        conn, self._lock_conn = self._lock_conn, None
        if conn is not None:
            try:
                conn.rollback()
            finally:
                conn.close()

    # -- worker faults ----------------------------------------------------------------

    def _worker_kill(self) -> None:
        name = self.rng.choice(self.workers.names())
        pids = self.workers.group_pids(name)
        self._dead.add(name)
        self.workers.kill(name)
        self.log.emit("fault_start", fault="worker_kill", worker=name, hostname=self.workers.hostname(name), pids=pids)
        try:
            self.hold(self.rng.uniform(0.2, 1.0))
        finally:
            # started again at once, not waited for: it comes up while other faults run
            pid = self._restart(name, wait=False)
            self.log.emit(
                "fault_end", fault="worker_kill", worker=name, hostname=self.workers.hostname(name), new_pid=pid
            )

    def _restart(self, name: str, wait: bool = True) -> int:
        pid = self.workers.restart(name, wait=wait)
        self._dead.discard(name)
        return pid

    def _worker_stop(self) -> None:
        name = self.rng.choice(self.workers.names())
        hold = self.rng.uniform(*HOLD_S["worker_stop"])
        self._paused.add(name)
        self.workers.pause(name)
        self.log.emit("fault_start", fault="worker_stop", worker=name, hostname=self.workers.hostname(name),
                      pids=self.workers.group_pids(name), hold_s=round(hold, 3))  # fmt: skip
        try:
            self.hold(hold)
        finally:
            self._resume(name)
            self.log.emit("fault_end", fault="worker_stop", worker=name, hostname=self.workers.hostname(name))

    def _resume(self, name: str) -> None:
        self.workers.resume(name)
        self._paused.discard(name)

    # -- broker faults ----------------------------------------------------------------

    def _broker_restart(self) -> None:
        hard = self.rng.random() < 0.5
        self._drop_redis()
        if hard:
            self.broker.kill()
        else:
            self.broker.stop(timeout_s=10)
        self.log.emit("fault_start", fault="broker_restart", how="SIGKILL" if hard else "SIGTERM")
        try:
            time.sleep(self.rng.uniform(*HOLD_S["broker_restart"]))
        finally:
            self._broker_up()
            self.log.emit("fault_end", fault="broker_restart")

    def _broker_up(self) -> None:
        if not self.broker.running:
            self.broker.start(timeout_s=30)

    def _client(self) -> Any:
        import redis

        if self._redis is None:
            self._redis = redis.Redis(
                host="127.0.0.1", port=self.broker.port, socket_timeout=1, socket_connect_timeout=1
            )
        return self._redis

    def _drop_redis(self) -> None:
        if self._redis is not None:
            self._redis.close()
            self._redis = None

    def capture(self) -> None:
        """Keep copies of task messages workers hold right now (kombu's ``unacked``
        hash on Redis), to deliver some of them again later."""
        if not self.broker.running:
            return
        try:
            held = self._client().hgetall("unacked")
        except Exception:  # noqa: BLE001 - the broker is restarting: try next time
            self._drop_redis()
            return
        for tag, value in held.items():
            try:
                raw, _exchange, _routing_key = json.loads(value)
            except (ValueError, TypeError):
                continue
            self._captured[tag.decode() if isinstance(tag, bytes) else str(tag)] = raw
        while len(self._captured) > 400:
            self._captured.pop(self.rng.choice(sorted(self._captured)))

    def _duplicate_delivery(self) -> bool | None:
        self.capture()
        if not self._captured:
            self.log.emit("fault_skipped", fault="duplicate_delivery", reason="no message captured yet")
            return False
        # workflow step messages first when there are some: a step delivered twice
        # (while running, or after it finished) must not run its body twice
        steps = sorted(
            t
            for t, raw in self._captured.items()
            if str((raw.get("headers") or {}).get("task", "")).startswith("workflows.step")  # .<slug> too
        )
        others = sorted(set(self._captured) - set(steps))
        want = self.rng.randint(2, 6)
        tags = self.rng.sample(steps, min(len(steps), (want + 1) // 2))
        tags += self.rng.sample(others, min(len(others), want - len(tags)))
        sent = []
        for tag in tags:
            raw = json.loads(json.dumps(self._captured[tag]))
            raw.setdefault("properties", {})["delivery_tag"] = uuid.uuid4().hex  # a new delivery of it
            headers = raw.get("headers") or {}
            self._client().lpush(self.queue, json.dumps(raw))
            sent.append({"task": headers.get("task"), "id": headers.get("id")})
        self.log.emit("fault_start", fault="duplicate_delivery", messages=sent)
        self.log.emit("fault_end", fault="duplicate_delivery")
        return True

    # -- admin faults -----------------------------------------------------------------

    def _storm(self) -> bool | None:
        """A burst of 10-20 enable/disable calls of the storm plugins (each flips
        the state it last had) within about a second, without waiting for the
        workers; half the time a plugin under test is disabled in the middle of
        the burst and enabled again at its end."""
        if self.host is None:
            self.log.emit("fault_skipped", fault="storm", reason="no admin host")
            return False
        toggles = self.rng.randint(10, 20)
        enabled: dict[str, bool] = {}
        calls: list[tuple[str, str]] = []
        for _ in range(toggles):
            slug = self.rng.choice(STORM_PLUGINS)
            if slug not in enabled:
                record = self.host.view.plugin(slug)
                enabled[slug] = record.enabled if record is not None else True
            calls.append(("disable" if enabled[slug] else "enable", slug))
            enabled[slug] = not enabled[slug]
        target = self.rng.choice(self.under_test) if self.under_test and self.rng.random() < 0.5 else None
        if target is not None:
            calls.insert(len(calls) // 2, ("disable", target))
            calls.append(("enable", target))
        gap = self.rng.uniform(0.5, 1.0) / len(calls)
        self.log.emit("fault_start", fault="storm", toggles=len(calls), under_test=target)
        done = 0
        try:
            for op, slug in calls:
                done += self._admin_call(op, slug)
                time.sleep(gap)
        finally:
            self.log.emit("fault_end", fault="storm", committed=done)
        return True

    def _admin_call(self, op: str, slug: str) -> int:
        """One enable/disable, recorded as roles.py's admins record theirs."""
        from tests.history.roles import _describe, _result

        self._storm_calls += 1
        fields = {"call": self._storm_calls, "actor": f"{self.log.proc}:{self._storm_calls}", "op": op,
                  "wait": False, "slug": slug}  # fmt: skip
        self.log.emit("admin_start", **fields)
        try:
            result = getattr(self.host, op)(slug, actor=fields["actor"], wait=False)
        except Exception as exc:  # noqa: BLE001 - recorded; the checker judges it
            self.log.emit("admin_error", **fields, **_describe(exc))
            return 0
        self.log.emit("admin_return", **fields, **_result(result))
        return 1
