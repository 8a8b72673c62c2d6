"""Scale: many plugins, a large step history.

    python benchmarks/scale.py [--plugins 10000] [--history 1000000]

1. 10,000 plugins in PostgreSQL: time and memory of a full reload (what a worker
   does on start and after a change, and ``refresh()``), and the dispatch check
   (``PluginView.check_store`` + the enablement lookup) with 10,000 plugins vs 10.
   Target: ratio <= 1.1.
2. A step history of 1,000,000 rows: the workflow store operations a run makes
   (``create_run``, ``begin_step``, ``finish_step``, ``finish_run``) and
   ``runs(status=...)``/``runs(name=...)`` with that history vs an empty one.
   Target: <= 1.1. ``Workflows.prune`` keeps history bounded.
"""

from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg  # noqa: E402
from celery import Celery  # noqa: E402

from benchmarks.common import percentile, summary_row, write_rows  # noqa: E402
from pluginhost import PluginHost  # noqa: E402
from workflows import Step, Workflow, Workflows  # noqa: E402


def fresh_db(name: str) -> str:
    with psycopg.connect("postgresql://postgres@127.0.0.1/test", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"postgresql+psycopg://postgres@127.0.0.1/{name}"


def host_for(url: str, plugins: int) -> PluginHost:
    host = PluginHost(Celery("scale", broker="memory://"), store=url)
    host.register_capability("probe", lambda payload: payload)
    host.sync()
    with psycopg.connect(url.replace("+psycopg", "")) as conn:
        conn.execute(
            "INSERT INTO pluginhost_plugins"
            " (slug, kind, enabled, config, sort, label_en, label_ar, version, updated_at)"
            " SELECT 'p' || g, 'capability', g %% 2 = 0, '{\"n\": 1}', g, 'Plugin ' || g, 'إضافة ' || g, 1, now()"
            " FROM generate_series(1, %s) g",
            (plugins - 1,),
        )
    return host


def timed(fn, n: int) -> list[float]:  # type: ignore[no-untyped-def]
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e6)
    return out


def p50(xs: list[float]) -> float:
    return percentile(xs, 50)


def plugins_part(count: int) -> list[dict[str, Any]]:
    print(f"\n== {count:,} plugins vs 10 (PostgreSQL)")
    results = {}
    reload_figures = {}
    for n in (10, count):
        url = fresh_db(f"pluginhost_scale_{n}")
        host = host_for(url, n)
        tracemalloc.start()
        t = time.perf_counter()
        host.refresh()
        reload_ms = (time.perf_counter() - t) * 1e3
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        reloads = [timed(host.view.reload, 1)[0] / 1e3 for _ in range(5)]

        def check(host: PluginHost = host) -> None:
            host.view.check_store()
            host.is_enabled("probe")

        for _ in range(300):
            check()
        samples = timed(check, 3000)
        results[n] = p50(samples)
        reload_figures[n] = (p50(reloads), peak / 2**20)
        print(
            f"  {n:>6} plugins: reload p50 {p50(reloads):8.1f} ms (first {reload_ms:.1f} ms, peak memory "
            f"{peak / 2**20:.1f} MiB); dispatch check p50 {p50(samples):6.1f} us, p99 "
            f"{percentile(samples, 99):6.1f} us"
        )
        host.store.close()
    ratio = results[count] / results[10]
    print(
        f"  dispatch check ratio {count:,} / 10 plugins: {ratio:.2f}"
        f" (target <= 1.1: {'met' if ratio <= 1.1 else 'MISSED'})"
    )
    return [
        summary_row(
            f"scale: dispatch check p50, {count:,} plugins vs 10",
            "-",
            f"{results[count]:.0f} us (10: {results[10]:.0f} us)",
            ratio,
            "<= 1.1",
            ratio <= 1.1,
        ),
        summary_row(
            f"scale: full reload of {count:,} plugins, p50",
            "-",
            f"{reload_figures[count][0]:.1f} ms (10: {reload_figures[10][0]:.1f} ms)",
        ),
        summary_row(
            f"scale: peak memory of the first reload, {count:,} plugins",
            "-",
            f"{reload_figures[count][1]:.1f} MiB (10: {reload_figures[10][1]:.2f} MiB)",
        ),
    ]


def history_part(rows: int) -> list[dict[str, Any]]:
    print(f"\n== workflow store with {rows:,} step-history rows vs empty (PostgreSQL)")
    wf = Workflow("scale", steps=[Step("probe")])
    results = {}
    for n in (0, rows):
        url = fresh_db(f"pluginhost_hist_{n}")
        host = host_for(url, 1)
        flows = Workflows(host)
        flows.define(wf)
        store = flows.store
        if n:
            t = time.perf_counter()
            with psycopg.connect(url.replace("+psycopg", "")) as conn:
                conn.execute(
                    "INSERT INTO workflows_runs (id, name, version, status, input, context, created_at, finished_at)"
                    " SELECT 'old-' || g, 'old' || (g %% 50), 1,"
                    " CASE WHEN g %% 10 = 0 THEN 'failed' ELSE 'succeeded' END,"
                    " '{}', '{}', now() - interval '1 day', now() - interval '1 day' FROM generate_series(1, %s) g",
                    (n // 4,),
                )
                conn.execute(
                    "INSERT INTO workflows_steps"
                    " (run_id, position, stage, slug, status, attempts, output, started_at, finished_at)"
                    " SELECT 'old-' || r, p, p, 'probe', 'succeeded', 1, '{}',"
                    " now() - interval '1 day', now() - interval '1 day'"
                    " FROM generate_series(1, %s) r, generate_series(0, 3) p",
                    (n // 4,),
                )
                conn.execute("ANALYZE")
            print(f"  loaded {n:,} step rows ({n // 4:,} runs) in {time.perf_counter() - t:.1f} s")
            with psycopg.connect(url.replace("+psycopg", "")) as conn:
                plan = conn.execute(
                    "EXPLAIN SELECT * FROM workflows_runs WHERE status = 'failed' ORDER BY created_at DESC LIMIT 50"
                ).fetchall()
            print(f"  runs(status=...) plan: {plan[1][0].strip() if len(plan) > 1 else plan[0][0]}")

        def one_run(store=store, layout=((0, 0, "probe"),)) -> None:  # type: ignore[no-untyped-def]
            run_id = str(uuid.uuid4())
            store.create_run(run_id, "scale", 1, {"x": 1}, layout)
            store.begin_step(run_id, 0, "w", first=True)
            store.finish_step(run_id, 0, "succeeded", output={"y": 1}, plugin_version=1)
            store.finish_run(run_id, {"x": 1, "y": 1})

        for _ in range(50):
            one_run()
        runs = timed(one_run, 400)
        by_status = timed(lambda flows=flows: flows.runs(status="failed", limit=50), 200)
        by_name = timed(lambda flows=flows: flows.runs(name="old7", limit=50), 200)
        results[n] = (p50(runs), p50(by_status), p50(by_name))
        print(
            f"  {n:>9,} rows: one run's store writes p50 {p50(runs) / 1e3:6.2f} ms; runs(status=failed) p50 "
            f"{p50(by_status) / 1e3:6.2f} ms; runs(name=...) p50 {p50(by_name) / 1e3:6.2f} ms"
        )
        if n:
            t = time.perf_counter()
            pruned = flows.prune(older_than_s=3600)
            print(f"  prune(older_than_s=3600): {pruned:,} runs deleted in {time.perf_counter() - t:.1f} s")
        host.store.close()
    empty, full = results[0], results[rows]
    ratio = full[0] / empty[0]
    print(
        f"  a run's store writes, ratio {rows:,} rows / empty: {ratio:.2f}"
        f" (target <= 1.1: {'met' if ratio <= 1.1 else 'MISSED'})"
    )
    print("  (runs() returns 50 rows from the large history and none from the empty one: compare its absolute time)")
    return [
        summary_row(
            f"scale: a run's store writes p50, {rows:,} step rows vs empty",
            "-",
            f"{full[0] / 1e3:.2f} ms (empty: {empty[0] / 1e3:.2f} ms)",
            ratio,
            "<= 1.1",
            ratio <= 1.1,
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plugins", type=int, default=10_000)
    parser.add_argument("--history", type=int, default=1_000_000)
    parser.add_argument(
        "--json-out", metavar="PATH", help="also write the summary figures as JSON rows (python -m benchmarks)"
    )
    args = parser.parse_args()
    with open("/proc/loadavg") as f:
        print(f"scale benchmark; load average {' '.join(f.read().split()[:3])}")
    rows = plugins_part(args.plugins)
    write_rows(args.json_out, rows)
    rows += history_part(args.history)
    write_rows(args.json_out, rows)


if __name__ == "__main__":
    main()
