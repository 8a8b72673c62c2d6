"""Toggle storm: does a storm of toggles of *other* plugins slow down the task stream?

    python benchmarks/storm.py [--plugins 10000] [--workers 16] [--pool solo|prefork]
                               [--rate 50] [--seconds 30] [--storm-rate 10] [--quick]

Setup: a PostgreSQL store of ``--plugins`` plugins (the benchmark app's capability
plugin ``bench`` and ``p1..pN``, inserted by SQL), ``--workers`` workers of
``benchmarks/apps/bench.py`` on one Redis queue (``solo`` by default: one process
per worker, 16 of them on 2 CPUs; ``--pool prefork`` runs concurrency 1, a main
process and one child each), and a producer subprocess that calls
``host.run_capability("bench", {"sent": time.time()})`` at ``--rate`` runs/s (the
real dispatch path, its own store check and catch-up included). The capability
body records ``RPUSH "<sent> <time.time()>"`` as its first statement.

Task latency = body start - the producer's time just before ``run_capability``
(enqueue -> body start), over the runs *sent* in a phase; p50/p99 nearest-rank.

Phases, ``--seconds`` each, after a warm-up (until every worker has run the
capability, so loaded its view, and the store is quiet; then ``--warmup`` s): *quiet* (no toggles), then *storm*: an
admin (a second ``PluginHost`` in this process) calls ``host.disable`` /
``host.enable`` (``wait=False``: the commit and the refresh broadcast, as an admin
UI would) on ``--storm-rate`` different plugins per second, cycling through 50
plugins that no task uses, each flipped from its previous state (``--admin sql``:
the same by ``UPDATE``, no broadcast, so the workers find the changes by their
poll, in batches, and the producer by its own check). Target: storm p99 / quiet
p99 <= 1.2.

The store's work in each phase: statements from ``pg_stat_statements`` when the
extension is installed *and* loaded (``shared_preload_libraries``); otherwise
``pg_stat_database`` deltas of the benchmark's database (``xact_commit``: every
pluginhost read is one autocommit transaction, so about one per statement;
``tup_returned``, ``tup_fetched``). CPU: user + system time
(``/proc/<pid>/stat``) of the PostgreSQL backends serving this database (the
processes named ``postgres`` listed in ``pg_stat_activity`` for it), sampled every
0.5 s so backends that start during a phase count; PostgreSQL's background
processes (WAL writer, checkpointer) and other databases are not counted.
PostgreSQL 15 flushes an idle backend's ``pg_stat_database`` counters up to ~10 s
late, hence the 11 s ``--warmup``: with less, the workers' first loads show in the
quiet phase's tuple counts.

The CPU time of the workers (every process of each) and of the producer in each
phase is printed too (``/proc/<pid>/task/*/schedstat``).

``--quick``: 4 workers, 10 s phases (a smoke run; its ratio is noisy).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg  # noqa: E402

from benchmarks.common import (  # noqa: E402
    REPO,
    RedisDb,
    _killpg,
    bench_conf,
    celery_conf,
    cpu_ns,
    create_pg_database,
    header,
    loadavg,
    parser,
    pct,
    purge,
    queue_length,
    running_workers,
    server_versions,
    summary_row,
    versions,
    write_rows,
)

QUEUE = "bench.storm"
KEY = "bench:latency"
TARGET = 1.2
OTHERS = 50  # plugins the storm cycles through
TICK = os.sysconf("SC_CLK_TCK")


# -- the producer subprocess ----------------------------------------------------------


def produce(rate: float) -> None:
    """``run_capability`` at ``rate``/s, each stamped with its send time, until SIGTERM."""
    from benchmarks.apps.bench import CAPABILITY, conf_from_env, make_app

    b = make_app(conf_from_env(), "producer")
    stop: list[int] = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    interval = 1.0 / rate
    nxt = time.perf_counter()
    while not stop:
        b.host.run_capability(CAPABILITY, {"sent": time.time()})
        nxt += interval
        delay = nxt - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        elif delay < -0.5:  # fell behind (a loaded machine): do not burst to catch up
            nxt = time.perf_counter()


# -- the store's work -------------------------------------------------------------------


class StoreMeter:
    """Statements and backend CPU of one database, per phase."""

    def __init__(self, dbname: str) -> None:
        self.dbname = dbname
        self.conn = psycopg.connect(f"host=127.0.0.1 port=5432 user=postgres dbname={dbname}", autocommit=True)
        self.statements = self._statements_available()
        self.cpu: dict[int, int] = {}  # backend pid -> utime+stime ticks, last seen
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._sample_loop, daemon=True)
        self._thread.start()

    @property
    def method(self) -> str:
        if self.statements:
            return "pg_stat_statements (calls, this database)"
        return (
            "pg_stat_database deltas (pg_stat_statements not loaded: not in shared_preload_libraries);"
            " CPU of this database's backends from /proc/<pid>/stat"
        )

    def _statements_available(self) -> bool:
        try:
            if not self.conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'pg_stat_statements'").fetchone():
                return False
            self.conn.execute("SELECT count(*) FROM pg_stat_statements")
            return True
        except psycopg.Error:
            return False

    def _backends(self) -> list[int]:
        rows = self.conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()", (self.dbname,)
        )
        return [int(r[0]) for r in rows]

    def _sample(self) -> None:
        with self._lock:
            for pid in self._backends():
                try:
                    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                except (OSError, IndexError):
                    continue
                self.cpu[pid] = int(fields[11]) + int(fields[12])  # utime, stime (ticks)

    def _sample_loop(self) -> None:
        while not self._stop.wait(0.5):
            try:
                self._sample()
            except psycopg.Error:
                return

    def snapshot(self) -> dict[str, Any]:
        self._sample()
        with self._lock:
            cpu = dict(self.cpu)
        row = self.conn.execute(
            "SELECT xact_commit, tup_returned, tup_fetched FROM pg_stat_database WHERE datname = %s",
            (self.dbname,),
        ).fetchone()
        snap: dict[str, Any] = {"cpu": cpu, "xact": row[0], "returned": row[1], "fetched": row[2]}
        if self.statements:
            snap["calls"] = self.conn.execute(
                "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid"
                " WHERE d.datname = %s",
                (self.dbname,),
            ).fetchone()[0]
        return snap

    def delta(self, a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        cpu_s = sum(v - a["cpu"].get(pid, 0) for pid, v in b["cpu"].items()) / TICK
        out = {
            "cpu_s": cpu_s,
            "xact": b["xact"] - a["xact"],
            "returned": b["returned"] - a["returned"],
            "fetched": b["fetched"] - a["fetched"],
        }
        if "calls" in a and "calls" in b:
            out["calls"] = int(b["calls"] - a["calls"])
        return out

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.conn.close()


# -- the run ---------------------------------------------------------------------------------


def latencies(redis: RedisDb, a: float, b: float) -> list[float]:
    """Latencies (ms) of the runs sent in [a, b)."""
    out = []
    for raw in redis.client.lrange(KEY, 0, -1):
        sent, started = (float(x) for x in raw.split()[:2])
        if a <= sent < b:
            out.append((started - sent) * 1000)
    return out


def storm(admin: Any, sql: psycopg.Connection[Any] | None, seconds: float, per_s: float) -> int:
    """Toggle ``per_s`` different plugins per second for ``seconds`` (``host.disable`` /
    ``enable``, or with ``sql`` an ``UPDATE`` that only the workers' poll and the
    producer's own check notice); returns the toggles."""
    state = {f"p{k}": True for k in range(1, OTHERS + 1)}
    slugs = list(state)
    interval = 1.0 / per_s
    t_end = time.perf_counter() + seconds
    nxt = time.perf_counter()
    n = 0
    while time.perf_counter() < t_end:
        slug = slugs[n % len(slugs)]
        if sql is not None:
            sql.execute("UPDATE pluginhost_plugins SET enabled = %s WHERE slug = %s", (not state[slug], slug))
        else:
            (admin.disable if state[slug] else admin.enable)(slug)
        state[slug] = not state[slug]
        n += 1
        nxt += interval
        delay = nxt - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
    return n


def warm_up(redis: RedisDb, meter: StoreMeter, pids: list[int], seconds: float, limit: float = 120.0) -> None:
    """Until every worker has run the capability (and so loaded its view of every
    plugin) and the store has been quiet (no full load: under 5,000 tuples returned)
    for a second, then ``seconds`` more; at most ``limit`` s."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        ran = {int(raw.split()[2]) for raw in redis.client.lrange(KEY, 0, -1)}
        before = meter.snapshot()
        time.sleep(1.0)
        if set(pids) <= ran and meter.delta(before, meter.snapshot())["returned"] < 5_000:
            break
    else:
        print(f"  WARNING: warm-up not finished after {limit:.0f} s (a worker ran nothing, or the store kept loading)")
    time.sleep(seconds)


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--plugins", type=int, default=10_000)
    p.add_argument("--workers", type=int, default=16)
    p.add_argument("--pool", choices=("solo", "prefork"), default="solo", help="prefork: concurrency 1")
    p.add_argument("--rate", type=float, default=50.0, help="producer runs/s")
    p.add_argument("--seconds", type=float, default=30.0, help="length of each phase")
    p.add_argument("--storm-rate", type=float, default=10.0, help="toggles/s in the storm phase")
    p.add_argument(
        "--warmup", type=float, default=11.0, help="seconds after the workers are warm (past the stats flush delay)"
    )
    p.add_argument(
        "--admin",
        choices=("host", "sql"),
        default="host",
        help="storm toggles by host.disable/enable (default) or by direct SQL (no broadcast: the poll finds them)",
    )
    p.add_argument("--quick", action="store_true", help="4 workers, 10 s phases (smoke run)")
    p.add_argument("--produce", action="store_true", help="(internal) run as the producer subprocess")
    p.set_defaults(db="pluginhost_bench_storm")
    args = p.parse_args()
    if args.produce:
        produce(args.rate)
        return
    if args.quick:
        args.workers, args.seconds = 4, 10.0

    from benchmarks.apps.bench import CAPABILITY, make_app
    from pluginhost.control import poll_interval

    specs = [
        {"name": f"{args.pool}-{i:02d}", "pool": args.pool, "concurrency": 1, "queues": [QUEUE]}
        for i in range(args.workers)
    ]
    redis = RedisDb(args.redis_db)
    producer: subprocess.Popen[bytes] | None = None
    meter: StoreMeter | None = None
    sql: psycopg.Connection[Any] | None = None
    try:
        pg_url = create_pg_database(args.db)
        conf = bench_conf(celery_conf(args.broker, redis, pg_url, QUEUE), redis, "latency", KEY)
        b = make_app(conf, "admin")
        host, app = b.host, b.app
        host.sync()
        host.enable(CAPABILITY)
        with psycopg.connect(pg_url.replace("+psycopg", ""), autocommit=True) as conn:
            conn.execute(
                "INSERT INTO pluginhost_plugins (slug, kind, enabled, config, sort, label_en, label_ar, version,"
                " updated_at) SELECT 'p' || g, 'capability', true, '{}', g, 'Plugin ' || g, 'إضافة ' || g, 1, now()"
                " FROM generate_series(1, %s) g",
                (args.plugins - 1,),
            )
            conn.execute("ANALYZE pluginhost_plugins")
            total = conn.execute("SELECT count(*) FROM pluginhost_plugins").fetchone()[0]
        host.view.reload()
        purge(app, QUEUE)
        meter = StoreMeter(args.db)
        if args.admin == "sql":
            sql = psycopg.connect(pg_url.replace("+psycopg", ""), autocommit=True)
        header(
            "storm: task latency (enqueue -> body start) with and without a storm of toggles of other plugins",
            plugins=f"{total:,} in {pg_url}",
            workers=f"{args.workers} x {args.pool} concurrency 1 (Redis db {redis.index})",
            stream=f"producer subprocess, host.run_capability at {args.rate:.0f}/s",
            phases=f"warm-up {args.warmup:.0f} s, quiet {args.seconds:.0f} s, storm {args.seconds:.0f} s",
            storm=(
                (
                    "host.disable/enable (wait=False) of a second PluginHost"
                    if args.admin == "host"
                    else f"direct SQL UPDATE (no broadcast; workers poll every {poll_interval(app)} s)"
                )
                + f", {args.storm_rate:.0f} different plugins/s, cycling through {OTHERS}"
            ),
            store=meter.method,
            versions=versions(),
            servers=server_versions(redis),
        )
        with running_workers(specs, conf, app) as workers:
            env = dict(os.environ, BENCH_CONF=json.dumps(conf), PYTHONPATH=str(REPO))
            producer = subprocess.Popen(
                [sys.executable, __file__, "--produce", "--rate", str(args.rate), "--broker", args.broker],
                cwd=REPO, env=env, start_new_session=True,
            )  # fmt: skip
            runners = [pid for w in workers for pid in ([w.pid] if args.pool == "solo" else w.children())]
            warm_up(redis, meter, runners, args.warmup)
            phases: dict[str, dict[str, Any]] = {}
            procs = {"workers": [pid for w in workers for pid in (w.pid, *w.children())], "producer": [producer.pid]}
            for name in ("quiet", "storm"):
                c0 = {k: cpu_ns(v) for k, v in procs.items()}
                s0, t0, l0 = meter.snapshot(), time.time(), loadavg()
                if name == "storm":
                    toggles = storm(host, sql, args.seconds, args.storm_rate)
                else:
                    time.sleep(args.seconds)
                    toggles = 0
                t1 = time.time()
                phases[name] = {"t0": t0, "t1": t1, "toggles": toggles, "store": meter.delta(s0, meter.snapshot()),
                                "load": f"{l0} -> {loadavg()}",
                                "cpu": {k: (cpu_ns(v) - c0[k]) / 1e9 for k, v in procs.items()}}  # fmt: skip
            if producer.poll() is not None:
                raise RuntimeError(f"the producer exited early (status {producer.returncode})")
            producer.send_signal(signal.SIGTERM)
            producer.wait(10)
            time.sleep(3.0)  # the last runs reach a body
            backlog = queue_length(app, QUEUE)
            for w in workers:
                if w.proc.poll() is not None:
                    raise RuntimeError(f"worker {w.name} died:\n{w.log_tail()}")

        rows = report(args, redis, phases, backlog, meter)
        write_rows(args.json_out, rows)
    finally:
        if producer is not None and producer.poll() is None:
            _killpg(producer.pid, signal.SIGTERM)
            try:
                producer.wait(10)
            except subprocess.TimeoutExpired:
                _killpg(producer.pid, signal.SIGKILL)
                producer.wait(5)
        if meter is not None:
            meter.close()
        if sql is not None:
            sql.close()
        redis.release()
    print(f"load average at the end {loadavg()}")


def report(args: Any, redis: RedisDb, phases: dict[str, dict[str, Any]], backlog: int, meter: StoreMeter) -> list[Any]:
    lat = {name: latencies(redis, ph["t0"], ph["t1"]) for name, ph in phases.items()}
    print()
    for name, ph in phases.items():
        xs, st = lat[name], ph["store"]
        secs = ph["t1"] - ph["t0"]
        statements = (
            f"{st['calls']:,} statements" if "calls" in st else f"{st['xact']:,} commits (~statements)"
        ) + f" ({(st.get('calls', st['xact'])) / secs:.0f}/s)"
        print(
            f"  {name:<5}: {len(xs)} runs ({len(xs) / secs:.1f}/s), latency p50 {pct(xs, 50):.2f} ms,"
            f" p99 {pct(xs, 99):.2f} ms, max {max(xs, default=float('nan')):.1f} ms; toggles {ph['toggles']}"
            f" ({ph['toggles'] / secs:.1f}/s)\n"
            f"         store: backend CPU {st['cpu_s']:.2f} s ({100 * st['cpu_s'] / secs:.1f}% of one CPU),"
            f" {statements}, {st['returned']:,} tuples returned, {st['fetched']:,} fetched; load {ph['load']}\n"
            f"         CPU of the {args.workers} workers {ph['cpu']['workers']:.2f} s,"
            f" of the producer {ph['cpu']['producer']:.2f} s"
        )
    if backlog:
        print(f"  WARNING: {backlog} messages still queued at the end (the workers fell behind)")
    q99, s99 = pct(lat["quiet"], 99), pct(lat["storm"], 99)
    ratio = s99 / q99 if q99 else float("nan")
    ok = ratio <= TARGET
    print(f"  storm p99 / quiet p99 = {ratio:.2f} (target <= {TARGET}: {'met' if ok else 'MISSED'})")
    q, s = phases["quiet"]["store"], phases["storm"]["store"]
    key = "calls" if "calls" in q else "xact"
    what = "statements" if key == "calls" else "commits"
    workers = f"{args.workers} {args.pool} workers" + (", toggles by SQL" if args.admin == "sql" else "")
    return [
        summary_row(
            f"storm: task latency p99, {args.storm_rate:.0f} toggles/s of other plugins vs none"
            f" ({workers}, {args.plugins:,} plugins, {args.rate:.0f} runs/s)",
            f"quiet p99 {q99:.1f} ms (p50 {pct(lat['quiet'], 50):.1f})",
            f"storm p99 {s99:.1f} ms (p50 {pct(lat['storm'], 50):.1f})",
            ratio,
            f"<= {TARGET}",
            ok,
        ),
        summary_row(
            f"storm: store backend CPU s and {what} per phase (quiet vs storm)",
            f"{q['cpu_s']:.2f} s, {q[key]:,} {what}",
            f"{s['cpu_s']:.2f} s, {s[key]:,} {what}",
            s["cpu_s"] / q["cpu_s"] if q["cpu_s"] else None,
        ),
    ]


if __name__ == "__main__":
    main()
