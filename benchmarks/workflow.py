"""Workflow overhead: a pluginhost workflow vs the bare Celery canvas doing the same.

    python benchmarks/workflow.py [--runs 200] [--broker redis|amqp] [--pools prefork,solo]
                                  [--profile-runs 50] [--py-spy]

Cases (each run started and awaited one at a time; pluginhost and bare runs
interleaved, in alternating order, after a warm-up; same app, same worker):

* seq: ``Workflows.start("wfbench_seq", ctx).get()`` (five sequential steps, each a
  trivial capability; step history recorded in PostgreSQL) vs a bare
  ``chain`` of five plain ``@app.task``s with the same bodies, each taking and
  returning the context dict merged with its output.
* par: ``Workflows.start("wfbench_par", ctx).get()`` (``[Parallel(s1, s2, s3)]``)
  vs a bare ``chord([s1, s2, s3], merge)``.
* each also as users start it: ``host.run_capability("wfb_seq_flow", ctx).get()``
  on a ``WorkflowCapability`` (``run_capability`` rows).

Setup: broker Redis (db ``--redis-db`` if free, else another free index, claimed
with the owner key of tests/harness/redis_db.py, flushed before and after) or RabbitMQ,
Redis result backend, PostgreSQL store (database ``--db``, created if missing,
workflow tables emptied first), one worker subprocess per pool
(``--pool=prefork -c 2`` and ``--pool=solo``), always stopped at the end.
Then a profile pass on a solo worker times the workflow store calls, the
capability call and each task (``WFBENCH_PROFILE=1`` in ``benchmarks/apps/flows_bench.py``),
and the producer side (``Workflows.start``) in this process.

``WFBENCH_WORKFLOWS_PATH=/some/dir`` makes the app (worker and this process)
import ``workflows`` from ``/some/dir/workflows`` instead: a way to measure a
patched copy without touching the repository.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
APP_MODULE = "benchmarks.apps.flows_bench"
sys.path.insert(0, str(ROOT))

from benchmarks.common import WORKER_OPTIONS, RedisDb, percentile  # noqa: E402
from tests.harness import Worker, WorkerFactory  # noqa: E402

# -- helpers -------------------------------------------------------------------


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:7.2f}"


def load() -> str:
    try:
        return ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def ensure_database(admin_url: str, name: str) -> None:
    import psycopg

    with psycopg.connect(admin_url, autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
            conn.execute(f'CREATE DATABASE "{name}"')


def start_worker(factory: WorkerFactory, name: str, pool: str, queue: str, env: dict[str, str]) -> Worker:
    """One worker of the app in its own process group (``-c 2`` for prefork; see ``WORKER_OPTIONS``)."""
    concurrency = 2 if pool == "prefork" else None  # solo: Celery's default, as ever
    return factory(
        APP_MODULE, wait=False, name=name, pool=pool, concurrency=concurrency, queues=[queue], env=env, **WORKER_OPTIONS
    )


# -- the measurement -------------------------------------------------------------


def measure(bench: Any, runs: int, warmup: int) -> dict[str, dict[str, list[float]]]:
    """Interleaved runs of the four cases; returns end-to-end and dispatch times (s)."""
    flows = bench.flows

    def timed(send: Callable[[dict[str, Any]], Any]) -> Callable[[int], tuple[float, float, Any]]:
        """A case: ``send`` one run's context, await its result; (end-to-end s, dispatch s, result)."""

        def case(n: int) -> tuple[float, float, Any]:
            t0 = time.perf_counter()
            res = send({"n": n})
            t1 = time.perf_counter()
            out = res.get(timeout=30)
            return time.perf_counter() - t0, t1 - t0, out

        return case

    host = bench.host
    cases = {
        "seq/pluginhost": timed(lambda ctx: flows.start(bench.SEQ, ctx)),
        "seq/bare": timed(lambda ctx: bench.bare_chain(ctx).apply_async()),
        "seq/run_capability": timed(lambda ctx: host.run_capability(bench.SEQ_CAP, ctx)),
        "par/pluginhost": timed(lambda ctx: flows.start(bench.PAR, ctx)),
        "par/bare": timed(lambda ctx: bench.bare_chord(ctx).apply_async()),
        "par/run_capability": timed(lambda ctx: host.run_capability(bench.PAR_CAP, ctx)),
    }
    # Same output every way (pluginhost's context is the bare canvas's result).
    for kind in ("seq", "par"):
        a, b, c = (cases[f"{kind}/{side}"](7)[2] for side in ("pluginhost", "bare", "run_capability"))
        if not a == b == c:
            raise AssertionError(f"{kind}: pluginhost returned {a}, bare {b}, run_capability {c}")
    for i in range(warmup):
        for fn in cases.values():
            fn(i)
    out: dict[str, dict[str, list[float]]] = {k: {"e2e": [], "dispatch": []} for k in cases}
    names = list(cases)
    for i in range(runs):
        # Alternate which side goes first, so drift and caching favour neither.
        order = names if i % 2 == 0 else names[::-1]
        for name in order:
            e2e, dispatch, _ = cases[name](i)
            out[name]["e2e"].append(e2e)
            out[name]["dispatch"].append(dispatch)
    return out


def check_history(bench: Any, since_runs: int) -> str:
    """Every pluginhost run so far: succeeded, with every step succeeded."""
    from sqlalchemy import func, select

    from workflows.store import runs, steps

    with bench.flows.store.engine.connect() as conn:
        by_status = dict(conn.execute(select(runs.c.status, func.count()).group_by(runs.c.status)).all())
        step_status = dict(conn.execute(select(steps.c.status, func.count()).group_by(steps.c.status)).all())
    total = sum(by_status.values())
    ok = by_status.get("succeeded", 0) == total and set(step_status) == {"succeeded"}
    return f"runs {by_status}, steps {step_status} ({'all recorded' if ok and total >= since_runs else 'MISMATCH'})"


def report(pool: str, data: dict[str, dict[str, list[float]]], ready_s: float) -> list[str]:
    lines = [f"\n== {pool} (worker ready in {ready_s:.1f}s; load average {load()}) =="]
    lines.append(f"{'case':18} {'n':>4} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'mean ms':>8} {'dispatch p50':>13}")
    for name, d in data.items():
        e = d["e2e"]
        lines.append(
            f"{name:18} {len(e):4d} {ms(percentile(e, 50))} {ms(percentile(e, 90))} {ms(percentile(e, 99))}"
            f" {ms(statistics.fmean(e))} {ms(percentile(d['dispatch'], 50))}"
        )
    for kind in ("seq", "par"):
        b = data[f"{kind}/bare"]["e2e"]
        for side, how in (("pluginhost", "flows.start"), ("run_capability", "run_capability")):
            a = data[f"{kind}/{side}"]["e2e"]
            r50, r99 = percentile(a, 50) / percentile(b, 50), percentile(a, 99) / percentile(b, 99)
            verdict = "meets" if r50 <= 1.3 else "MISSES"
            lines.append(
                f"ratio {kind} {how}/bare: p50 {r50:.2f}x  p99 {r99:.2f}x  "
                f"(+{(percentile(a, 50) - percentile(b, 50)) * 1e3:.1f} ms at p50; target p50 <= 1.3x: {verdict})"
            )
    return lines


JSON_ROWS: list[dict[str, Any]] = []  # --json-out: this run's rows so far


def write_json_rows(path: str | None, pool: str, data: dict[str, dict[str, list[float]]]) -> None:
    """``--json-out``: add this pool's seq/par p50 rows (the ratios ``report`` prints) and
    write all rows so far to ``path`` as a JSON list (read by ``python -m benchmarks``)."""
    if not path:
        return
    import json

    rows = JSON_ROWS
    for (kind, what), (side, how) in itertools.product(
        (("seq", "5 steps vs chain"), ("par", "3 parallel vs chord")),
        (("pluginhost", "flows.start"), ("run_capability", "run_capability")),
    ):
        a, b = data[f"{kind}/{side}"]["e2e"], data[f"{kind}/bare"]["e2e"]
        r50 = percentile(a, 50) / percentile(b, 50)
        rows.append(
            {
                "figure": f"workflow {kind} p50 ({what}, {how}), {pool}, {len(a)} runs",
                "bare": f"{percentile(b, 50) * 1e3:.1f} ms",
                "pluginhost": f"{percentile(a, 50) * 1e3:.1f} ms",
                "ratio": r50,
                "target": "<= 1.3",
                "passed": r50 <= 1.3,
            }
        )
    Path(path).write_text(json.dumps(rows, indent=1))


def profile(bench: Any, app: Any, worker: Worker, runs: int) -> list[str]:
    """Per-operation timings: worker side from ``wfbench.stats``, producer side here
    (each round: one seq and one par workflow, one bare chain, one bare chord)."""
    bench.install_profiling()  # this process: Workflows.start's store calls

    producer: dict[str, list[float]] = {
        "start(): prepare+apply_async": [],
        "bare chain apply_async": [],
    }
    for i in range(10):  # warm-up (connections, code paths), then reset the counters
        bench.flows.start(bench.SEQ, {"n": i}).get(timeout=30)
        bench.flows.start(bench.PAR, {"n": i}).get(timeout=30)
    bench.stats.apply_async(queue=bench.QUEUE).get(timeout=10)
    bench.STATS.clear()
    for i in range(runs):
        t = time.perf_counter()
        res = bench.flows.start(bench.SEQ, {"n": i})
        producer["start(): prepare+apply_async"].append(time.perf_counter() - t)
        res.get(timeout=30)
        bench.flows.start(bench.PAR, {"n": i}).get(timeout=30)
        t = time.perf_counter()
        res = bench.bare_chain({"n": i}).apply_async()
        producer["bare chain apply_async"].append(time.perf_counter() - t)
        res.get(timeout=30)
        bench.bare_chord({"n": i}).apply_async().get(timeout=30)
    worker_stats = bench.stats.apply_async(queue=bench.QUEUE).get(timeout=10)
    local = {k: list(v) for k, v in bench.STATS.items()}
    lines = [f"\n== profile: solo worker, {runs} rounds of seq, par, bare chain, bare chord (load average {load()}) =="]
    lines.append(f"{'operation':58} {'calls':>6} {'mean ms':>8} {'max ms':>8} {'ms/run*':>8}")

    def rows(stats: dict[str, list[float]], where: str) -> None:
        for name in sorted(stats):
            n, total, mx = stats[name]
            lines.append(f"{where + ' ' + name:58} {int(n):6d} {ms(total / n)} {ms(mx)} {ms(total / (2 * runs))}")

    rows(worker_stats, "[worker]")
    rows(local, "[producer]")
    for name, v in producer.items():
        lines.append(f"{'[producer] ' + name + ' (seq, p50)':58} {len(v):6d} {ms(percentile(v, 50))} {ms(max(v))}")
    lines.append(
        "* ms/run: total time / (seq + par workflow runs); .sql = the statements, .txn = pool checkout + BEGIN + COMMIT"
    )

    def mean(stats: dict[str, list[float]], name: str) -> float:
        n, total, _ = stats.get(name, [0, 0.0, 0.0])
        return total / n if n else 0.0

    per_step = mean(worker_stats, "store.begin_step") + mean(worker_stats, "store.post_step")
    body = mean(worker_stats, "step.run_step (whole body)")
    step_task = mean(worker_stats, "task workflows.step")
    bare_task = statistics.fmean([mean(worker_stats, f"task wfbench.bare.s{i}") for i in range(1, 6)])
    with bench.flows.store.engine.connect() as conn:
        probe = []
        for _ in range(50):
            t = time.perf_counter()
            conn.exec_driver_sql("SELECT 1").all()
            probe.append(time.perf_counter() - t)
    lines.append(
        f"summary: history writes per step (begin_step + post_step, the last step's finish_step apart)"
        f" {per_step * 1e3:.2f} ms of a"
        f" {body * 1e3:.2f} ms step body; workflows.step task {step_task * 1e3:.2f} ms vs bare task"
        f" {bare_task * 1e3:.2f} ms; per par run:"
        f" workflows.merge task {mean(worker_stats, 'task workflows.merge') * 1e3:.2f} ms"
        f" vs bare merge {mean(worker_stats, 'task wfbench.bare.merge') * 1e3:.2f} ms,"
        f" producer create_newest_run {mean(local, 'store.create_newest_run') * 1e3:.2f} ms;"
        f" PostgreSQL round trip (SELECT 1) p50 {percentile(probe, 50) * 1e3:.2f} ms"
    )
    return lines


def py_spy(worker: Worker, bench: Any, seconds: float, out_dir: Path) -> list[str]:
    """Sample the solo worker while seq workflows run back to back; top functions by own time."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(exe).exists():
        return ["\n(py-spy not installed: pip install py-spy)"]
    out = out_dir / "wfbench-pyspy.txt"
    spy = subprocess.Popen(
        [
            exe,
            "record",
            "--pid",
            str(worker.proc.pid),
            "--duration",
            str(int(seconds)),
            "--format",
            "raw",
            "--rate",
            "500",
            "--output",
            str(out),
            "--nonblocking",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    t0 = time.monotonic()
    n = 0
    while spy.poll() is None and time.monotonic() - t0 < seconds + 10:
        bench.flows.start(bench.SEQ, {"n": n}).get(timeout=30)
        n += 1
    spy.wait(30)
    if not out.exists():
        return [f"\n(py-spy failed: {spy.stderr.read().decode(errors='replace')[-300:] if spy.stderr else ''})"]
    return summarize_pyspy(out, n)


def summarize_pyspy(path: Path, runs: int) -> list[str]:
    """py-spy's collapsed stacks: where the worker's samples go (inclusive, by frame;
    and by the library of the innermost frame)."""
    inclusive: dict[str, str | tuple[str, ...]] = {
        "any task (celery trace_task)": "trace_task (celery/app/trace.py",
        "workflows step task body (Runtime.run_step)": "Runtime.run_step (",
        "  WorkflowStore.begin_step": "WorkflowStore.begin_step (",
        "  WorkflowStore.finish_step": "WorkflowStore.finish_step (",
        "  the capability call (host.call_capability[_with])": (
            "PluginHost.call_capability (",
            "PluginHost.call_capability_with (",
        ),
        "workflows.merge: WorkflowStore.merge_stage": "WorkflowStore.merge_stage (",
        "workflows.finish: WorkflowStore.finish_run": "WorkflowStore.finish_run (",
        "bare tasks (bare_step + bare_merge)": ("bare_step (", "bare_merge ("),
    }
    leaf = {
        "psycopg (waiting for PostgreSQL)": "psycopg/",
        "sqlalchemy": "sqlalchemy/",
        "redis-py (broker + results)": "redis/",
        "kombu": "kombu/",
        "celery": "celery/",
        "pydantic": "pydantic",
    }
    total = 0
    inc = dict.fromkeys(inclusive, 0)
    own = dict.fromkeys(leaf, 0)
    for line in path.read_text().splitlines():
        stack, _, n_s = line.rpartition(" ")
        if not n_s.isdigit():
            continue
        n = int(n_s)
        total += n
        for name, key in inclusive.items():
            if any(k in stack for k in ((key,) if isinstance(key, str) else key)):
                inc[name] += n
        innermost = stack.rsplit(";", 1)[-1]
        for name, key in leaf.items():
            if key in innermost:
                own[name] += n
                break
    lines = [f"\n== py-spy: solo worker, {runs} seq runs back to back, {total} samples (non-idle) =="]
    for name, n in inc.items():
        lines.append(f"  {name:48} {100 * n / max(1, total):5.1f}% (inclusive)")
    for name, n in own.items():
        lines.append(f"  innermost frame in {name:29} {100 * n / max(1, total):5.1f}%")
    return lines


# -- main ------------------------------------------------------------------------


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=200)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--broker", choices=("redis", "amqp"), default="redis")
    p.add_argument("--pools", default="prefork,solo", help="comma-separated: prefork (-c 2), solo")
    p.add_argument("--profile-runs", type=int, default=50, help="0: no profile pass")
    p.add_argument("--py-spy", action="store_true", help="also sample the solo worker with py-spy for 8 s")
    p.add_argument("--redis-db", type=int, default=11)
    p.add_argument("--db", default="pluginhost_wfbench")
    p.add_argument("--queue", default="wfbench")
    p.add_argument(
        "--json-out", metavar="PATH", help="also write the summary figures as JSON rows (python -m benchmarks)"
    )
    args = p.parse_args()

    t_start = time.monotonic()
    ensure_database("postgresql://postgres@127.0.0.1/postgres", args.db)
    redis = RedisDb(args.redis_db)  # the harness's owner-key protocol, shared with the other benchmarks
    try:
        run(args, redis.url)
    finally:
        redis.release()
    print(f"\ntotal {time.monotonic() - t_start:.0f}s; load average at end {load()}")
    return 0


def run(args: argparse.Namespace, redis_url: str) -> None:
    broker = redis_url if args.broker == "redis" else "amqp://guest:guest@127.0.0.1:5672//"
    store = f"postgresql+psycopg://postgres@127.0.0.1/{args.db}"
    settings = {
        "WFBENCH_BROKER": broker,
        "WFBENCH_BACKEND": redis_url,
        "WFBENCH_STORE": store,
        "WFBENCH_QUEUE": args.queue,
    }
    os.environ.update(settings)  # read by the app module, here and in the worker
    os.environ.pop("WFBENCH_PROFILE", None)
    sys.path.insert(0, str(ROOT))

    import celery
    import kombu
    import sqlalchemy

    bench = __import__(APP_MODULE, fromlist=["app"])  # defines both workflows (migrates the store)
    import workflows

    app = bench.app
    with bench.flows.store.engine.begin() as conn:
        conn.exec_driver_sql("TRUNCATE workflows_signals, workflows_waits, workflows_steps, workflows_runs")
        sync_commit = conn.exec_driver_sql("SHOW synchronous_commit").scalar()
    if args.broker == "amqp":
        app.control.purge()

    print("workflow benchmark: pluginhost workflows vs bare Celery canvas")
    print(
        f"  python {platform.python_version()}, celery {celery.__version__}, kombu {kombu.__version__},"
        f" sqlalchemy {sqlalchemy.__version__}, {os.cpu_count()} cores, load average at start {load()}"
    )
    print(f"  broker {broker}, result backend {redis_url}, store {store} (synchronous_commit={sync_commit})")
    print(f"  workflows package: {Path(workflows.__file__).parent}")
    print(f"  runs {args.runs} per case after {args.warmup} warm-up rounds, interleaved; pools {args.pools}")
    print(
        f"  seq: {bench.SEQ} = {' -> '.join(bench.SEQ_SLUGS)} vs chain(5 tasks);"
        f" par: {bench.PAR} = [Parallel({', '.join(bench.PAR_SLUGS)})] vs chord(3, merge)",
        flush=True,
    )

    logs = Path(tempfile.mkdtemp(prefix="ph-wfbench-"))  # the workers' logs, py-spy's output
    # the workers' settings reach the app through the WFBENCH_* variables; these are for pings
    factory = WorkerFactory({"broker_url": app.conf.broker_url, "control_exchange": app.conf.control_exchange}, logs)
    worker: Worker | None = None
    try:
        total_runs = 0
        for pool in [x.strip() for x in args.pools.split(",") if x.strip()]:
            worker = start_worker(factory, f"wfbench-{pool}-{os.getpid()}", pool, args.queue, {})
            ready = worker.wait_ready(60.0)
            data = measure(bench, args.runs, args.warmup)
            total_runs += 2 * (args.runs + args.warmup + 1)
            worker.stop(group=True)
            worker = None
            block = report(pool if pool != "prefork" else "prefork -c 2", data, ready)
            write_json_rows(
                args.json_out,
                f"{'prefork c2' if pool == 'prefork' else pool}, {dict(redis='Redis', amqp='RabbitMQ')[args.broker]}",
                data,
            )
            block.append("history: " + check_history(bench, total_runs))
            print("\n".join(block), flush=True)
        if args.profile_runs > 0 or args.py_spy:
            worker = start_worker(
                factory, f"wfbench-profile-{os.getpid()}", "solo", args.queue, {"WFBENCH_PROFILE": "1"}
            )
            worker.wait_ready(60.0)
            if args.py_spy:
                print("\n".join(py_spy(worker, bench, 8, logs)), flush=True)
            if args.profile_runs > 0:
                print("\n".join(profile(bench, app, worker, args.profile_runs)), flush=True)
    finally:
        if worker is not None:
            worker.stop(group=True)


if __name__ == "__main__":
    sys.exit(main())
