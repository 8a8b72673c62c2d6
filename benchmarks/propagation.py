"""Toggle propagation: how long after ``host.disable()`` returns does any worker process
still *start* a capability run on a stale view? Compared with Celery's own ping.

    python benchmarks/propagation.py [--broker redis|amqp] [--toggles 100] [--rate 250]

Setup: 4 workers on one queue (prefork concurrency 2, prefork concurrency 2, threads
concurrency 2, solo), PostgreSQL store, Redis or RabbitMQ broker. A producer
*subprocess* sends the capability's Celery task continuously (``task.apply_async``,
not ``run_capability``, so runs keep arriving at workers after the disable) at
``--rate`` messages/s, pausing while more than ``--backlog`` messages wait. The
capability function records ``RPUSH "<time.time()> <pid>"`` at the start of every
execution that passed the worker-side check.

Per toggle (>= 100): let the stream flow 0.2-0.3 s (one ``app.control.ping(limit=len(WORKERS))``
is timed in that phase, so pings see the same load); ``host.disable(slug)`` (no
wait), t0 = when it returns; then ``broadcast("pluginhost_revision", limit=len(WORKERS))`` until
all 4 workers' main processes report the new revision (second figure: "ack");
keep the plugin disabled ``--off`` seconds; ``host.enable(slug)``.

Propagation of a toggle = max(0, last execution start in (t0, enable call) - t0).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    REPO,
    RedisDb,
    _killpg,
    bench_conf,
    celery_conf,
    create_pg_database,
    header,
    loadavg,
    parser,
    percentile,
    purge,
    queue_length,
    running_workers,
    server_versions,
    summary_row,
    verdict,
    versions,
    write_rows,
)

QUEUE = "bench.prop"
KEY = "bench:exec"
SENT = "bench:sent"
TARGET_P99_MS = 50.0  # 4 workers (the live-toggle issue)
TARGET_P99_MS_16 = 100.0  # 16 workers (the scale issue)
TARGET_X_PING = 3.0
WORKERS = [
    {"name": "prefork-a", "pool": "prefork", "concurrency": 2, "queues": [QUEUE]},
    {"name": "prefork-b", "pool": "prefork", "concurrency": 2, "queues": [QUEUE]},
    {"name": "threads", "pool": "threads", "concurrency": 2, "queues": [QUEUE]},
    {"name": "solo", "pool": "solo", "concurrency": 1, "queues": [QUEUE]},
]


def produce(rate: float, backlog: int) -> None:
    """Producer subprocess: the capability task, straight to the broker, paced."""
    from benchmarks.apps.bench import CAPABILITY, conf_from_env, make_app

    conf = conf_from_env()
    b = make_app(conf, "producer")
    task = b.host.task(CAPABILITY)
    import redis as redis_lib

    counter = redis_lib.Redis.from_url(conf["redis_url"])
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    interval = 1.0 / rate
    nxt = time.perf_counter()
    sent = 0
    while not stop:
        task.apply_async(args=({"n": sent},))
        sent += 1
        if sent % 50 == 0:
            counter.incrby(SENT, 50)
            while not stop and queue_length(b.app, QUEUE) > backlog:
                time.sleep(0.01)
                nxt = time.perf_counter()
        nxt += interval
        delay = nxt - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        elif delay < -0.5:
            nxt = time.perf_counter()


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--toggles", type=int, default=100)
    p.add_argument(
        "--solo", type=int, default=0, help="instead of the 4 mixed workers, this many solo workers (e.g. 16)"
    )
    p.add_argument("--rate", type=float, default=250.0, help="producer messages/s")
    p.add_argument("--backlog", type=int, default=100, help="producer pauses above this queue length")
    p.add_argument("--off", type=float, default=0.35, help="seconds the plugin stays disabled per toggle")
    p.add_argument("--produce", action="store_true", help=argparse_hidden())
    p.set_defaults(db="pluginhost_bench_prop")
    args = p.parse_args()
    if args.solo:
        global WORKERS, TARGET_P99_MS
        TARGET_P99_MS = TARGET_P99_MS_16 if args.solo >= 16 else TARGET_P99_MS
        WORKERS = [
            {"name": f"solo-{i:02d}", "pool": "solo", "concurrency": 1, "queues": [QUEUE]} for i in range(args.solo)
        ]
    if args.produce:
        produce(args.rate, args.backlog)
        return

    from benchmarks.apps.bench import CAPABILITY, make_app

    redis = RedisDb(args.redis_db)
    producer: subprocess.Popen[bytes] | None = None
    try:
        pg_url = create_pg_database(args.db)
        conf = bench_conf(celery_conf(args.broker, redis, pg_url, QUEUE), redis, "record", KEY)
        b = make_app(conf, "admin")
        host, app = b.host, b.app
        from pluginhost.control import poll_interval

        host.sync()
        host.enable(CAPABILITY)
        purge(app, QUEUE)
        header(
            "propagation: host.disable() -> last run started on a stale view, vs app.control.ping",
            toggles=args.toggles,
            broker=f"redis (db {redis.index})" if args.broker == "redis" else "amqp (RabbitMQ)",
            store=f"{pg_url} (poll fallback {poll_interval(app)} s)",
            workers="; ".join(f"{w['name']}: {w['pool']} c{w['concurrency']}" for w in WORKERS),
            stream=(
                f"producer subprocess, capability task.apply_async at {args.rate:.0f}/s"
                f" (pauses above {args.backlog} queued)"
            ),
            phases=f"enabled 0.2-0.3 s (one ping timed), disabled {args.off} s",
            versions=versions(),
            servers=server_versions(redis),
        )
        with running_workers(WORKERS, conf) as workers:
            names = [w.hostname for w in workers]
            owner: dict[int, str] = {}
            for w in workers:
                owner[w.pid] = w.name
            env = dict(os.environ, BENCH_CONF=json.dumps(conf), PYTHONPATH=str(REPO))
            producer = subprocess.Popen(
                [sys.executable, __file__, "--produce", "--rate", str(args.rate), "--backlog", str(args.backlog),
                 "--broker", args.broker],
                cwd=REPO, env=env, start_new_session=True,
            )  # fmt: skip
            # warm-up: every worker executes runs (and loads its view) before we measure
            time.sleep(1.5)
            for _ in range(5):
                app.control.ping(timeout=1.0, limit=len(WORKERS))
            for _ in range(3):
                host.disable(CAPABILITY)
                time.sleep(0.2)
                host.enable(CAPABILITY)
                time.sleep(0.3)
            redis.client.delete(KEY)

            toggles: list[dict[str, Any]] = []
            pings: list[float] = []
            ping_short = 0
            for _ in range(args.toggles):
                time.sleep(random.uniform(0.1, 0.15))
                t = time.perf_counter()
                replies = app.control.ping(timeout=1.0, limit=len(WORKERS))
                pings.append((time.perf_counter() - t) * 1000)
                if len(replies or []) < len(WORKERS):
                    ping_short += 1
                time.sleep(random.uniform(0.1, 0.15))

                host.disable(CAPABILITY)
                t0 = time.time()
                t0p = time.perf_counter()
                revision = host.view.revision  # the revision disable() committed (this host's view)
                ack_ms = None
                for _ in range(5):
                    got = app.control.broadcast("pluginhost_revision", reply=True, limit=len(WORKERS), timeout=1.0)
                    seen = {n: body.get("revision", -1) for r in got or [] for n, body in r.items()}
                    if len(seen) == len(WORKERS) and all(int(v) >= revision for v in seen.values()):
                        ack_ms = (time.perf_counter() - t0p) * 1000
                        break
                left = args.off - (time.perf_counter() - t0p)
                if left > 0:
                    time.sleep(left)
                t_enable = time.time()
                host.enable(CAPABILITY)
                toggles.append({"t0": t0, "t_enable": t_enable, "ack_ms": ack_ms, "revision": revision})
            time.sleep(0.3)
            # where the workers' processes are (prefork children run the tasks)
            for w in workers:
                for c in w.children():
                    owner[c] = w.name
            # host.workers() and disable(wait=True): how long they block (they stop
            # when every worker of the store's registry has answered), how many answered
            t = time.perf_counter()
            hw = host.workers(timeout=2.0)
            host_workers_ms = (time.perf_counter() - t) * 1000
            waited = []
            for _ in range(10):
                t = time.perf_counter()
                acked = host.disable(CAPABILITY, wait=True, timeout=2.0)
                waited.append(((time.perf_counter() - t) * 1000, len(acked)))
                host.enable(CAPABILITY)
            _killpg(producer.pid, signal.SIGTERM)
            producer.wait(10)
            sent = int(redis.client.get(SENT) or 0)
            raw = redis.client.lrange(KEY, 0, -1)
        purge(app, QUEUE)

        runs = []
        for item in raw:
            ts, pid = item.decode().split()
            runs.append((float(ts), int(pid)))
        runs.sort()
        per_worker: dict[str, int] = {}
        for _, pid in runs:
            per_worker[owner.get(pid, f"pid {pid}")] = per_worker.get(owner.get(pid, f"pid {pid}"), 0) + 1
        import bisect

        times = [r[0] for r in runs]
        props: list[float] = []
        stale_runs = 0
        stale_by: dict[str, int] = {}
        capped = 0
        worst_by: dict[str, float] = {}
        for tg in toggles:
            lo = bisect.bisect_right(times, tg["t0"])
            hi = bisect.bisect_left(times, tg["t_enable"])
            stale = runs[lo:hi]
            stale_runs += len(stale)
            for ts, pid in stale:
                who = owner.get(pid, str(pid))
                stale_by[who] = stale_by.get(who, 0) + 1
                worst_by[who] = max(worst_by.get(who, 0.0), (ts - tg["t0"]) * 1000)
            prop = (stale[-1][0] - tg["t0"]) * 1000 if stale else 0.0
            if stale and stale[-1][0] > tg["t0"] + args.off * 0.9:
                capped += 1
            props.append(prop)
        acks = [tg["ack_ms"] for tg in toggles if tg["ack_ms"] is not None]
        ack_missing = sum(1 for tg in toggles if tg["ack_ms"] is None)
        duration = toggles[-1]["t_enable"] - toggles[0]["t0"] if toggles else 0

        print(
            f"\n  runs executed during the measured toggles: {len(runs)} ({len(runs) / max(duration, 1e-9):.0f}/s), "
            f"messages sent by the producer: {sent}"
        )
        print("  runs per worker: " + ", ".join(f"{k} {v}" for k, v in sorted(per_worker.items())))
        print(f"  workers: {', '.join(names)}")
        p50, p99, mx = percentile(props, 50), percentile(props, 99), max(props)
        g50, g99 = percentile(pings, 50), percentile(pings, 99)
        print(f"\n-- propagation ({len(props)} toggles): disable() returned -> last run started on a stale view")
        print(
            f"  p50 {p50:.1f} ms   p99 {p99:.1f} ms   max {mx:.1f} ms   "
            f"(toggles with a stale run: {sum(1 for x in props if x > 0)}, stale runs: {stale_runs}"
            + (", by " + ", ".join(f"{k} {v}" for k, v in sorted(stale_by.items())) if stale_by else "")
            + (f"; {capped} lasted the whole disabled phase" if capped else "")
            + ")"
        )
        print(
            f"  p90 {percentile(props, 90):.1f} ms   p95 {percentile(props, 95):.1f} ms;  "
            "latest stale start per worker: " + ", ".join(f"{k} {v:.1f} ms" for k, v in sorted(worst_by.items()))
        )
        print(f"-- app.control.ping(timeout=1.0, limit=len(WORKERS)) ({len(pings)} pings, same load, same workers)")
        print(
            f"  p50 {g50:.1f} ms   p90 {percentile(pings, 90):.1f} ms   p99 {g99:.1f} ms   max {max(pings):.1f} ms"
            + (f"   ({ping_short} pings got < {len(WORKERS)} replies)" if ping_short else "")
        )
        print(
            f"-- ack: disable() returned -> all {len(WORKERS)} main processes report the new revision "
            "(broadcast pluginhost_revision, limit=len(WORKERS))"
        )
        if acks:
            print(
                f"  p50 {percentile(acks, 50):.1f} ms   p99 {percentile(acks, 99):.1f} ms   max {max(acks):.1f} ms"
                + (
                    f"   ({ack_missing} toggles not acknowledged by all {len(WORKERS)} within 5 tries)"
                    if ack_missing
                    else ""
                )
            )
        ratio = p99 / g99 if g99 > 0 else float("inf")
        print("\n-- targets")
        print(
            f"  propagation p99 {p99:.1f} ms          target <= {TARGET_P99_MS:.0f} ms   "
            f"{verdict(p99, TARGET_P99_MS, higher_is_better=False)}"
        )
        print(
            f"  propagation p99 / ping p99 = {ratio:.2f}  target <= {TARGET_X_PING:.0f}x     "
            f"{verdict(ratio, TARGET_X_PING, higher_is_better=False)}"
        )
        where = (f"{len(WORKERS)} solo workers" if args.solo else f"{len(WORKERS)} mixed workers") + (
            f", {'Redis' if args.broker == 'redis' else 'RabbitMQ'}, {len(props)} toggles"
        )
        write_rows(
            args.json_out,
            [
                summary_row(
                    f"propagation p99, {where}",
                    "-",
                    f"{p99:.1f} ms",
                    None,
                    f"<= {TARGET_P99_MS:.0f} ms",
                    p99 <= TARGET_P99_MS,
                ),
                summary_row(
                    f"propagation p99 / ping p99, {where}",
                    f"ping p99 {g99:.1f} ms",
                    f"{p99:.1f} ms",
                    ratio,
                    f"<= {TARGET_X_PING:.0f}",
                    ratio <= TARGET_X_PING,
                ),
            ],
        )
        print(f"\n  host.workers(timeout=2.0) took {host_workers_ms:.0f} ms for {len(hw)} workers")
        print(
            "  host.disable(wait=True, timeout=2.0) took "
            + ", ".join(f"{ms:.0f} ms ({n} acks)" for ms, n in waited)
            + " (both return when every registered worker has answered)"
        )
        print(f"  load average at the end: {loadavg()}")
    finally:
        if producer is not None and producer.poll() is None:
            _killpg(producer.pid, signal.SIGTERM)
            try:
                producer.wait(5)
            except subprocess.TimeoutExpired:
                _killpg(producer.pid, signal.SIGKILL)
        redis.release()


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
