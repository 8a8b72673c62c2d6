"""Durable waits: many sleeping runs, wake-up lateness, and signal latency.

    python benchmarks/waits.py [--sleepers 10000] [--workers 4] [--signals 200] [--poll 1.0]

On Redis (broker) and PostgreSQL (store), with ``--workers`` solo workers of
``benchmarks/apps/waits_bench.py``, each claiming wake-ups every ``--poll`` s:

1. **Sleeping runs.** ``--sleepers`` runs of ``Sleep(S), Step`` are started
   (S long enough that every run is asleep before the first wakes). Reported:
   the store's rows and table size for them, the workers' resident memory
   (every process of each worker) before and while they all sleep (target: no
   growth), and, once they all woke, each wake-up's lateness (the wait row's
   ``woke_at - wake_at``: when the continuation was sent, against the due time)
   p50/p99 (target: p99 <= poll + 1 s). Next to it, bare Celery's way to wait:
   the same number of ``apply_async(countdown=S)`` messages, which the workers
   hold in memory until due (their resident memory with them).
2. **Signal to next step.** ``--signals`` runs wait for a signal; each is sent
   one at a time, and the time from ``flows.signal`` to the next step's start
   (the step body stamps it in Redis) is set against a bare task's round trip
   (``delay(...).get()``) on the same broker and workers, interleaved. Target:
   p50 and p99 <= 2x.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    WORKER_OPTIONS,
    celery_conf,
    claimed,
    parser,
    percentile,
    summary_row,
    verdict,
)
from tests.harness import WorkerFactory  # noqa: E402

QUEUE = "bench.waits"
APP = "benchmarks.apps.waits_bench"
ENV = "WAITSBENCH_CONF"


def rss_mib(workers: list[Any]) -> float:
    """Resident memory of every process of ``workers``, MiB."""
    total_kib = 0
    for w in workers:
        for pid in w.group_pids():
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total_kib += int(line.split()[1])
            except OSError:
                pass
    return total_kib / 1024


def count(engine: Any, sql: str) -> int:
    from sqlalchemy import text

    with engine.connect() as conn:
        return int(conn.execute(text(sql)).scalar() or 0)


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.5) -> float:
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)
    return time.monotonic() - started


def sleepers(mod: Any, workers: list[Any], n: int, sleep_s: float, poll: float) -> tuple[list[dict[str, Any]], str]:
    engine = mod.host.store.engine
    before = rss_mib(workers)
    began = time.monotonic()
    for _ in range(n):
        mod.flows.start("wb_sleep", {"key": "sleeper"})
    started_s = time.monotonic() - began
    asleep_s = started_s + wait_for(
        lambda: count(engine, "SELECT count(*) FROM workflows_runs WHERE status = 'sleeping'") == n,
        sleep_s,
        f"{n} runs asleep",
    )
    if asleep_s >= sleep_s:
        raise SystemExit(f"runs woke before all {n} slept ({asleep_s:.0f} s >= {sleep_s:.0f} s): use a longer sleep")
    during = rss_mib(workers)
    rows = count(engine, "SELECT count(*) FROM workflows_waits WHERE status = 'waiting'")
    size = count(
        engine,
        "SELECT pg_total_relation_size('workflows_waits') + pg_total_relation_size('workflows_runs')"
        " + pg_total_relation_size('workflows_steps')",
    )
    wait_for(
        lambda: count(engine, "SELECT count(*) FROM workflows_runs WHERE status = 'succeeded'") >= n,
        sleep_s + 600,
        f"{n} runs woke and finished",
    )
    after = rss_mib(workers)
    from sqlalchemy import text

    with engine.connect() as conn:
        late = [
            float(r[0])
            for r in conn.execute(
                text("SELECT extract(epoch FROM woke_at - wake_at) FROM workflows_waits WHERE status = 'done'")
            )
        ]
    p50, p99 = percentile(late, 50), percentile(late, 99)
    report = (
        f"  runs put to sleep      : {n} in {started_s:.1f} s (all asleep after {asleep_s:.1f} s),"
        f" sleep {sleep_s:.0f} s\n"
        f"  store                  : {rows} wait rows; runs+steps+waits tables {size / 2**20:.1f} MiB\n"
        f"  worker memory (RSS)    : {before:.0f} MiB before, {during:.0f} MiB while {n} sleep, {after:.0f} MiB after\n"
        f"  wake-up lateness       : p50 {p50:.3f} s, p99 {p99:.3f} s, max {max(late):.3f} s over {len(late)}"
        f" (poll {poll:g} s, {len(workers)} workers claiming)"
    )
    target = poll + 1.0
    growth = during - before
    out = [
        summary_row(
            f"waits: worker RSS growth with {n} sleeping runs",
            "-",
            f"{growth:+.0f} MiB",
            None,
            "no growth (< 10 MiB)",
            growth < 10,
        ),
        summary_row(
            f"waits: wake-up lateness p99 ({len(workers)} workers, poll {poll:g} s)",
            "-",
            f"{p99:.3f} s (p50 {p50:.3f})",
            None,
            f"<= {target:.1f} s",
            p99 <= target,
        ),
    ]
    return out, report


def bare_eta_memory(mod: Any, workers: list[Any], n: int, countdown: float) -> tuple[float, float]:
    """Workers' RSS before and after bare Celery holds ``n`` countdown messages."""
    before = rss_mib(workers)
    for i in range(n):
        mod.bare.apply_async((f"eta-{i}",), countdown=countdown)
    time.sleep(3)
    wait_for(lambda: _queued(mod) == 0, 120, "the workers to take every countdown message")
    time.sleep(2)
    return before, rss_mib(workers)


def _queued(mod: Any) -> int:
    return int(mod._redis.llen(QUEUE))


def signal_latency(mod: Any, k: int) -> tuple[list[float], list[float]]:
    engine = mod.host.store.engine
    ids = [mod.flows.start("wb_signal", {}).id for _ in range(k)]
    wait_for(
        lambda: count(engine, "SELECT count(*) FROM workflows_runs WHERE status = 'waiting'") == k,
        120,
        f"{k} runs waiting",
    )
    r = mod._redis
    r.delete(mod.STARTS)
    ph: list[float] = []
    bare: list[float] = []
    for i, run_id in enumerate(ids):
        for side in ("ph", "bare") if i % 2 == 0 else ("bare", "ph"):
            sent = time.time()
            if side == "ph":
                mod.flows.signal(run_id, "go", {"key": run_id})
            else:
                mod.bare.delay(f"bare-{i}").get(timeout=30)  # the round trip: sent, run, result back
                bare.append(time.time() - sent)
            got = r.blpop(mod.STARTS, timeout=30)
            if got is None:
                raise SystemExit(f"{side}: no step start within 30 s")
            if side == "ph":
                ph.append(float(got[1].decode().split()[1]) - sent)
    return ph, bare


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--sleepers", type=int, default=10_000)
    p.add_argument("--sleep-s", type=float, default=0.0, help="the sleep (default: long enough for --sleepers)")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--signals", type=int, default=200)
    p.add_argument("--poll", type=float, default=1.0, help="pluginhost_workflows_wake_poll_s")
    args = p.parse_args()
    args.broker = "redis"
    sleep_s = args.sleep_s or max(30.0, args.sleepers / 60)
    with claimed(args) as setup:
        celery = celery_conf(
            "redis",
            setup.redis,
            setup.pg_url,
            QUEUE,
            pluginhost_workflows_wake_poll_s=args.poll,
            task_ignore_result=False,
        )
        celery["result_backend"] = setup.redis.url
        conf = {"celery": celery, "redis_url": setup.redis.url, "sleep_s": sleep_s}
        os.environ[ENV] = json.dumps(conf)
        import importlib

        mod = importlib.import_module(APP)
        mod.host.sync()
        mod.flows.list()  # stores the declared workflows
        setup.header(
            "waits: sleeping runs, wake-up lateness, signal to next step",
            sleepers=args.sleepers,
            sleep=f"{sleep_s:.0f} s",
            workers=f"{args.workers} solo, each claiming every {args.poll:g} s",
            signals=args.signals,
            broker=setup.broker_label,
            store=setup.pg_url,
        )
        import tempfile

        factory = WorkerFactory(celery, Path(tempfile.mkdtemp(prefix="ph-bench-waits-")))
        rows: list[dict[str, Any]] = []
        try:
            for i in range(args.workers):
                factory(APP, wait=False, env={ENV: os.environ[ENV]}, name=f"waits{i}", pool="solo", **WORKER_OPTIONS)
            for w in factory.started:
                w.wait_ready()
            workers = list(factory.started)
            ph, bare = signal_latency(mod, args.signals)
            ph50, ph99, b50, b99 = (percentile(ph, 50), percentile(ph, 99), percentile(bare, 50), percentile(bare, 99))
            print("-- signal to next step start (interleaved with a bare task's round trip)")
            print(f"  bare round trip        : p50 {b50 * 1000:.1f} ms, p99 {b99 * 1000:.1f} ms over {len(bare)}")
            print(f"  signal -> next step    : p50 {ph50 * 1000:.1f} ms, p99 {ph99 * 1000:.1f} ms over {len(ph)}")
            for pct, a, b in (("p50", ph50, b50), ("p99", ph99, b99)):
                ratio = a / b
                print(f"  ratio {pct}              : {ratio:.2f}   target <= 2.0  {verdict(ratio, 2.0, False)}")
                rows.append(
                    summary_row(
                        f"waits: signal to next step start {pct} (bare: round trip)",
                        f"{b * 1000:.1f} ms",
                        f"{a * 1000:.1f} ms",
                        ratio,
                        "<= 2.0x",
                        ratio <= 2.0,
                    )
                )
            print(f"-- {args.sleepers} sleeping runs")
            sleep_rows, report = sleepers(mod, workers, args.sleepers, sleep_s, args.poll)
            print(report)
            rows.extend(sleep_rows)
            before, held = bare_eta_memory(mod, workers, args.sleepers, 3600.0)
            print(
                f"  bare Celery countdown  : {before:.0f} MiB before, {held:.0f} MiB holding {args.sleepers} messages"
            )
            rows.append(
                summary_row(
                    f"waits: worker RSS holding {args.sleepers} waits",
                    f"{held - before:+.0f} MiB (countdown)",
                    f"{sleep_rows[0]['pluginhost']} (store rows)",
                    None,
                    "info",
                    None,
                )
            )
        finally:
            for problem in factory.stop_all(graceful=True, group=True):
                print(f"warning: a worker did not stop cleanly: {problem}", file=sys.stderr)
        setup.write_rows(rows)


if __name__ == "__main__":
    main()
