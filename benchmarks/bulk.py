"""Bulk dispatch: ``host.run_capability_many(slug, inputs)`` vs a bare loop of ``task.apply_async``.

No worker runs: the messages queue and are purged. Both sides send the same N
inputs to the same broker from this process, interleaved in rounds after a warm-up.
The bare side is what a Celery user writes without pluginhost: a loop of
``apply_async`` (each call acquires a producer from the pool). The pluginhost side
validates every input, checks the store once, then publishes on one producer.

    python benchmarks/bulk.py [--n 10000] [--broker redis|amqp] [--rounds 5]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import claimed, loadavg, median, parser, payload, purge, summary_row, verdict  # noqa: E402

QUEUE = "bench.bulk"
TARGET = 1.0


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=10_000, help="inputs per batch")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    with claimed(args) as run:
        run.header(
            "bulk dispatch: host.run_capability_many vs a bare loop of apply_async",
            N=f"{args.n} inputs per batch, {args.rounds} interleaved rounds, one warm-up batch each",
            broker=run.broker_label,
            store=run.pg_url,
            worker="none (messages queue, purged after each batch)",
        )
        from benchmarks.apps.bench import CAPABILITY, make_app

        b = make_app(run.conf(run.pg_url, QUEUE), "bulk")
        b.host.sync()
        b.host.enable(CAPABILITY)
        inputs = [payload(i) for i in range(args.n)]

        def bare() -> None:
            for item in inputs:
                b.bare.apply_async(args=(item,))

        def many() -> None:
            b.host.run_capability_many(CAPABILITY, inputs)

        timings: dict[str, list[tuple[float, float]]] = {"bare": [], "many": []}
        for fn in (bare, many):  # warm-up
            fn()
            purge(b.app, QUEUE)
        for _ in range(args.rounds):
            for name, fn in (("bare", bare), ("many", many)):
                wall, cpu = time.perf_counter(), time.process_time()
                fn()
                timings[name].append((time.perf_counter() - wall, time.process_time() - cpu))
                purge(b.app, QUEUE)
        bare_s = median([w for w, _ in timings["bare"]])
        many_s = median([w for w, _ in timings["many"]])
        bare_cpu = median([c for _, c in timings["bare"]]) / args.n * 1e6
        many_cpu = median([c for _, c in timings["many"]]) / args.n * 1e6
        ratio = bare_s / many_s
        rounds = [bw / mw for (bw, _), (mw, _) in zip(timings["bare"], timings["many"])]
        print(f"\n  bare apply_async loop    : {args.n / bare_s:8.0f} calls/s   CPU {bare_cpu:.1f} us/call")
        print(f"  host.run_capability_many : {args.n / many_s:8.0f} calls/s   CPU {many_cpu:.1f} us/call")
        print(
            f"  ratio (throughput)       : {ratio:.3f}   target >= {TARGET}  {verdict(ratio, TARGET)}"
            f"   (per round {min(rounds):.2f}..{max(rounds):.2f})"
        )
        run.write_rows(
            [
                summary_row(
                    f"bulk dispatch of {args.n}, PostgreSQL + {run.broker_name}",
                    f"{args.n / bare_s:.0f} calls/s",
                    f"{args.n / many_s:.0f} calls/s",
                    ratio,
                    f">= {TARGET}",
                    ratio >= TARGET,
                )
            ],
        )
        print(f"\nload average at the end: {loadavg()}")


if __name__ == "__main__":
    main()
