"""Follow: what one toggle costs a process that holds many plugins (PostgreSQL).

    python benchmarks/follow.py [--sizes 10,1000,10000] [--toggles 200] [--memory-toggles 100]

1. Catch-up time: another connection toggles one plugin (direct SQL, committed),
   then the process brings its view to the new revision (``PluginView.catch_up``:
   the rows changed since its revision, one snapshot). p50/p99 over ``--toggles``
   toggles, at each size; the full reload (``PluginView.reload``, what every
   process did before incremental follow) beside it. Target: the catch-up at the
   largest size within 1.5x of the one at the smallest.
2. Memory: the resident set size of a process with the largest number of
   plugins, after its first load and after ``--memory-toggles`` toggles, each
   followed by a catch-up and a read of every plugin's config. Target: no growth
   beyond allocator noise (1 MiB).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg  # noqa: E402
from celery import Celery  # noqa: E402

from benchmarks.common import create_pg_database, summary_row, write_rows  # noqa: E402
from pluginhost import PluginHost  # noqa: E402

DB = "pluginhost_follow_bench"


def host_with(url: str, plugins: int) -> tuple[PluginHost, psycopg.Connection[Any]]:
    """A process's host on a store of ``plugins`` rows, and an admin connection."""
    host = PluginHost(Celery("follow", broker="memory://"), store=url)
    host.sync()  # the schema
    admin = psycopg.connect(url.replace("+psycopg", ""), autocommit=True)
    admin.execute(
        "INSERT INTO pluginhost_plugins (slug, kind, enabled, config, sort, label_en, label_ar, version, updated_at)"
        " SELECT 'p' || g, 'capability', true, '{\"n\": 1}', g, 'Plugin ' || g, 'إضافة ' || g, 1, now()"
        " FROM generate_series(1, %s) g",
        (plugins,),
    )
    admin.execute("ANALYZE pluginhost_plugins")
    host.view.reload()
    return host, admin


def toggle(admin: psycopg.Connection[Any], slug: str) -> None:
    admin.execute("UPDATE pluginhost_plugins SET enabled = NOT enabled WHERE slug = %s", (slug,))


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def pct(xs: list[float], q: float) -> float:
    return sorted(xs)[min(len(xs) - 1, int(len(xs) * q))]


def catch_up_part(sizes: list[int], toggles: int) -> tuple[list[dict[str, Any]], dict[int, float]]:
    print(f"\n== catch-up after one toggle, {toggles} toggles per size (PostgreSQL)")
    catch: dict[int, float] = {}
    full: dict[int, float] = {}
    for n in sizes:
        url = create_pg_database(DB)
        host, admin = host_with(url, n)
        view = host.view
        samples = []
        for i in range(toggles + 20):
            toggle(admin, f"p{1 + i % n}")
            t = time.perf_counter()
            view.catch_up()
            took = (time.perf_counter() - t) * 1e3
            if i >= 20:  # the first ones warm the connection and the plans
                samples.append(took)
        reads_before = view.rows_read
        view.catch_up()
        assert view.rows_read == reads_before, "a catch-up with nothing new read rows"
        reloads = []
        for _ in range(7):
            t = time.perf_counter()
            view.reload()
            reloads.append((time.perf_counter() - t) * 1e3)
        catch[n] = statistics.median(samples)
        full[n] = statistics.median(reloads)
        print(
            f"  {n:>6,} plugins: catch-up p50 {catch[n]:.3f} ms, p99 {pct(samples, 0.99):.3f} ms;"
            f" full reload p50 {full[n]:.1f} ms ({full[n] / catch[n]:.0f}x the catch-up)"
        )
        admin.close()
        host.store.close()
    small, large = sizes[0], sizes[-1]
    ratio = catch[large] / catch[small]
    verdict = "met" if ratio <= 1.5 else "MISSED"
    print(f"  catch-up ratio {large:,} / {small:,} plugins: {ratio:.2f} (target <= 1.5: {verdict})")
    print(f"  a full reload of {large:,} plugins is {full[large] / catch[small]:.0f}x the catch-up at {small:,}")
    rows = [
        summary_row(
            f"follow: catch-up after one toggle p50, {large:,} plugins vs {small:,}",
            "-",
            f"{catch[large]:.2f} ms ({small:,}: {catch[small]:.2f} ms)",
            ratio,
            "<= 1.5",
            ratio <= 1.5,
        ),
        summary_row(
            f"follow: full reload of {large:,} plugins vs catch-up at {small:,}",
            "-",
            f"{full[large]:.1f} ms vs {catch[small]:.2f} ms",
            full[large] / catch[small],
        ),
    ]
    return rows, catch


def memory_part(plugins: int, toggles: int) -> list[dict[str, Any]]:
    print(f"\n== resident memory of a process with {plugins:,} plugins, {toggles} toggles (PostgreSQL)")
    url = create_pg_database(DB)
    host, admin = host_with(url, plugins)
    view = host.view

    def round_of_toggles() -> None:
        for i in range(toggles):
            toggle(admin, f"p{1 + (i * 97) % plugins}")
            view.catch_up()
            for p in view.plugins():
                view.config_for(p)

    for p in view.plugins():
        view.config_for(p)
    gc.collect()
    before = rss_mib()
    round_of_toggles()
    gc.collect()
    after = rss_mib()
    round_of_toggles()
    gc.collect()
    again = rss_mib()
    growth = after - before
    print(
        f"  RSS after the first load {before:.1f} MiB; after {toggles} toggles {after:.1f} MiB"
        f" ({growth:+.2f} MiB); after {toggles} more {again:.1f} MiB ({again - after:+.2f} MiB)"
    )
    admin.close()
    host.store.close()
    return [
        summary_row(
            f"follow: RSS growth over {toggles} toggles, {plugins:,} plugins",
            "-",
            f"{before:.1f} -> {after:.1f} MiB ({growth:+.2f}); {toggles} more: {again - after:+.2f}",
            None,
            "<= 1 MiB",
            growth <= 1.0 and again - after <= 1.0,
        )
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,1000,10000", help="plugin counts, smallest first")
    parser.add_argument("--toggles", type=int, default=200)
    parser.add_argument("--memory-toggles", type=int, default=100)
    parser.add_argument(
        "--json-out", metavar="PATH", help="also write the summary figures as JSON rows (python -m benchmarks)"
    )
    args = parser.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    with open("/proc/loadavg") as f:
        print(f"follow benchmark; load average {' '.join(f.read().split()[:3])}; {os.cpu_count()} CPUs")
    rows, _ = catch_up_part(sizes, args.toggles)
    write_rows(args.json_out, rows)
    rows += memory_part(sizes[-1], args.memory_toggles)
    write_rows(args.json_out, rows)
    with open("/proc/loadavg") as f:
        print(f"load average at the end {' '.join(f.read().split()[:3])}")


if __name__ == "__main__":
    main()
