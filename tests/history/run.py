"""One history run: start everything, inject faults, settle, read the end state, check.

Shared by ``tests/test_history.py`` (short, fixed seed) and ``python -m benchmarks
soak --minutes N`` (long). What runs, all on 127.0.0.1:

- a PostgreSQL database of its own (``pluginhost_history_<tag>``) and a login role
  of its own (``ph_hist_<tag>``, not a superuser) that the workers and producers
  connect as, through a TCP proxy (tests/tcpproxy.py); admin ``a0`` connects
  through the proxy as ``postgres``, the others directly;
- a private Redis broker (restarted by the injector) and a private Redis result
  backend (tests/servers.py);
- 4 workers (tests/harness/workers.py): prefork c2, threads c2, solo, prefork c2 with
  ``--max-tasks-per-child``, and K producer and 1-2 admin processes
  (``tests/history/roles.py``), all started by ``tests/history/processes.py``;
- the fault injector, in this process's main thread (``tests/history/faults.py``).

Afterwards every fault is undone, the producers and admins are stopped, the
workflow runs are given time to finish, ``sweep`` is called once, the end state is
read (plugins, ``host.audit()``, runs with their steps) and the checker runs over
the merged history. Everything started is stopped by pid (SIGTERM, then SIGKILL of
its group after a timeout), the database and the role are dropped, in ``finally``
blocks, whatever failed.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests import harness
from tests.history import checker
from tests.history.events import EventLog, read_history
from tests.history.processes import Roles, Workers
from tests.servers import PrivateRedis
from tests.tcpproxy import TcpProxy

STORE_TIMEOUT_S = 2.0


@dataclass
class RunConfig:
    seed: int = 11
    chaos_s: float = 45.0
    producers: int = 2
    admins: int = 2
    settle_s: float = 25.0
    #: a dispatch slower than this is a hang: two store calls (revision, reload),
    #: each bounded by the store timeout, plus a second for the publish
    deadline_s: float = 2 * STORE_TIMEOUT_S + 1.0
    workdir: Path | None = None
    keep_workdir: bool = False
    say: Callable[[str], None] = field(default=lambda line: print(line, flush=True))


@dataclass
class RunResult:
    report: checker.Report
    final: checker.Final
    timings: dict[str, float]
    workdir: Path
    problems: list[str]
    torn_lines: int

    def summary_line(self) -> str:
        took = " ".join(f"{k} {v:.0f}s" for k, v in self.timings.items())
        return f"{self.report.summary()}; {took}"


# -- the store ------------------------------------------------------------------------


def _admin_conninfo(dbname: str) -> str:
    return harness.pg_conninfo(dbname)


def create_role(dbname: str, role: str) -> None:
    """A login role (no superuser) with every right on the run's tables."""
    import psycopg
    from psycopg import sql

    ident = sql.Identifier(role)
    with psycopg.connect(_admin_conninfo(dbname), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(ident))
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN NOSUPERUSER").format(ident))
        for stmt in (
            "GRANT ALL ON SCHEMA public TO {}",
            "GRANT ALL ON ALL TABLES IN SCHEMA public TO {}",
            "GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {}",
            "ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON TABLES TO {}",
            "ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON SEQUENCES TO {}",
        ):
            conn.execute(sql.SQL(stmt).format(ident))


def drop_database_and_role(dbname: str, role: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(harness.pg_conninfo(harness.PG_ADMIN_DB), autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
        if exists:
            conn.execute(sql.SQL("ALTER ROLE {} LOGIN").format(sql.Identifier(role)))
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname)))
        for _ in range(50):
            try:
                conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
                return
            except psycopg.Error:  # its last backends are still going away
                time.sleep(0.1)
        conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


# -- the run --------------------------------------------------------------------------


def run_history(cfg: RunConfig) -> RunResult:
    """One run, start to check (see the module docstring)."""
    problem = harness.check_service("postgres")
    if problem:
        raise RuntimeError(harness.service_down_message("postgres", problem))
    if shutil.which("redis-server") is None:
        raise RuntimeError("redis-server not found: the history run needs a private Redis broker")
    workdir = Path(cfg.workdir or tempfile.mkdtemp(prefix="ph-history-"))
    events_dir, log_dir = workdir / "events", workdir / "logs"
    events_dir.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}x{uuid.uuid4().hex[:6]}"
    dbname, role = f"pluginhost_history_{tag}", f"ph_hist_{tag}"
    log = EventLog(events_dir, "injector")
    timings: dict[str, float] = {}
    problems: list[str] = []
    final: checker.Final | None = None
    clock = _Clock(timings)
    harness.become_child_subreaper()

    with contextlib.ExitStack() as cleanup:
        cleanup.callback(_collect, problems, "drop database", lambda: drop_database_and_role(dbname, role))
        harness.create_pg_database(dbname)
        broker, results = PrivateRedis(workdir / "broker"), PrivateRedis(workdir / "results")
        for server in (broker, results):
            cleanup.callback(_collect, problems, f"{server.name} stop", server.kill)
            server.start(30)
        proxy = TcpProxy(("127.0.0.1", harness.PG_PORT))
        cleanup.callback(_collect, problems, "proxy", proxy.close)

        admin_url = harness.pg_url(dbname)
        via_proxy = f"postgresql+psycopg://{{user}}@127.0.0.1:{proxy.port}/{dbname}"
        queue = f"phh-{tag}"
        conf: dict[str, Any] = {
            "broker_url": broker.url(0),
            "result_backend": results.url(0),
            "broker_connection_retry_on_startup": True,
            "broker_transport_options": {"visibility_timeout": 20},
            "task_default_queue": queue,
            "control_exchange": f"phhc-{tag}",
            "result_expires": 3600,
            "pluginhost_store": via_proxy.format(user=role),
            "pluginhost_store_timeout_s": STORE_TIMEOUT_S,
            "pluginhost_poll_interval": 1.0,
            "pluginhost_heartbeat_interval": 2.0,
            "pluginhost_stale_retry_s": 0.2,
            "pluginhost_auto_migrate": False,
        }

        from tests.history import app as hist

        harness.configure_app(hist.app, {**conf, "pluginhost_store": admin_url})
        cleanup.callback(_collect, problems, "orchestrator app", lambda: harness.reset_app(hist.app))
        hist.host.with_store(admin_url)
        cleanup.callback(_collect, problems, "orchestrator store", lambda: hist.host.store.close())
        with clock("setup"):
            hist.app.conf.pluginhost_auto_migrate = True
            hist.host.sync()
            hist.flows.define(hist.HIST)
            from pluginhost import Plugin
            from tests.history.faults import STORM_PLUGINS

            for slug in STORM_PLUGINS:  # what the storm fault toggles besides the plugins under test
                hist.host.register(Plugin(slug=slug, enabled=True, label_en=slug))
            create_role(dbname, role)

            workers = Workers(conf, log_dir, events_dir)
            cleanup.callback(lambda: problems.extend(workers.stop_all()))
            roles = Roles(log_dir, events_dir, log)
            cleanup.callback(lambda: problems.extend(roles.stop_all(timeout_s=2.0)))
            workers.start_all()
            for i in range(cfg.producers):
                roles.start("producer", f"p{i}", conf, cfg.seed)
            for i in range(cfg.admins):
                store = via_proxy.format(user="postgres") if i == 0 else admin_url
                roles.start("admin", f"a{i}", {**conf, "pluginhost_store": store}, cfg.seed)
            roles.wait_ready()

        import redis  # noqa: F401 - the injector's broker client, imported before the clock starts

        from tests.history.faults import Faults

        faults = Faults(
            log=log, rng=random.Random(f"{cfg.seed}:faults"), proxy=proxy,
            admin_conninfo=_admin_conninfo(dbname), dbname=dbname, role=role,
            broker=broker, queue=queue, workers=workers, host=hist.host, under_test=hist.PLUGINS,
        )  # fmt: skip
        cfg.say(f"history: seed {cfg.seed}, {cfg.producers} producers, {cfg.admins} admins, 4 workers, "
                f"{cfg.chaos_s:.0f} s of faults; work dir {workdir}")  # fmt: skip
        with clock("faults"):
            log.emit("phase", phase="faults")
            try:
                faults.run(until=time.monotonic() + cfg.chaos_s)
            finally:
                problems.extend(roles.stop_all())
                problems.extend(faults.undo_all())
                log.emit("phase", phase="settle")
        with clock("settle"):
            workers.wait_all_ready()  # every worker up and answering before the runs settle
            _settle(hist, events_dir, cfg.settle_s)
            swept = hist.flows.sweep(older_than_s=3.0)
            log.emit("sweep", swept=swept)
            final = read_final(hist, swept)
            (workdir / "final.json").write_text(json.dumps(final.to_dict(), default=str, indent=1))
        cleanup.callback(log.close)

    assert final is not None
    with clock("check"):
        history = read_history(events_dir)
        report = checker.check(history.events, final, deadline_s=cfg.deadline_s)
    result = RunResult(report=report, final=final, timings=timings, workdir=workdir,
                       problems=problems, torn_lines=history.torn_lines)  # fmt: skip
    (workdir / "report.txt").write_text(report.format(limit=1000) + "\n")
    if not cfg.keep_workdir and not report.violations and not problems:
        shutil.rmtree(workdir / "events", ignore_errors=True)
    return result


def _settle(hist: Any, events_dir: Path, limit_s: float, quiet_s: float = 4.0) -> None:
    """Wait until every run is terminal, or nothing moved for ``quiet_s`` (no run
    status changed and no process recorded an event), at most ``limit_s``."""
    deadline = time.monotonic() + limit_s
    last: Any = None
    since = time.monotonic()
    while time.monotonic() < deadline:
        runs = hist.flows.runs(name=hist.WORKFLOW, limit=10_000)
        if all(r.status in checker.TERMINAL_RUN_STATES for r in runs):
            return
        now = (sorted((r.id, r.status) for r in runs), sum(p.stat().st_size for p in events_dir.glob("*.jsonl")))
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return
        time.sleep(0.3)


def read_final(hist: Any, swept: list[str]) -> checker.Final:
    """The end state, read from the store as the admin (``postgres``), directly."""
    plugins = {p.slug: p.model_dump(mode="json") for p in hist.host.list()}
    audit = [e.model_dump(mode="json") for e in reversed(hist.host.audit(limit=2**31 - 1))]
    runs = []
    for summary in hist.flows.runs(name=hist.WORKFLOW, limit=10_000):
        run = hist.flows.run(summary.id)
        if run is None:
            continue
        runs.append({
            "id": run.id, "status": run.status, "tag": run.input.get("tag"), "error": run.error,
            "steps": [{"position": s.position, "slug": s.slug, "status": s.status, "attempts": s.attempts}
                      for s in run.steps],
        })  # fmt: skip
    return checker.Final(plugins=plugins, audit=audit, runs=runs, swept=list(swept))


def _collect(problems: list[str], what: str, fn: Callable[[], Any]) -> None:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the other clean-ups must run too
        problems.append(f"{what}: {exc!r}")


class _Clock:
    def __init__(self, timings: dict[str, float]) -> None:
        self.timings = timings

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:
            self.timings[name] = time.monotonic() - started
