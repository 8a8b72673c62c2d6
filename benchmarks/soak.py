"""The long history run: ``python -m benchmarks soak --minutes N [--seed S]``.

The same run as ``tests/test_history.py`` (tests/history/run.py), for N minutes of
faults instead of 45 s: K producers, 1-2 admins, 4 workers, every fault kind at
random. Prints the operations checked, the faults injected per kind and the
violations, each with the minimal slice of history that shows it. Exit status 0
when nothing was found and everything was cleaned up, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks soak", description=__doc__.splitlines()[0])
    p.add_argument(
        "--minutes", type=float, required=True, help="minutes of faults (start-up and the check come on top)"
    )
    p.add_argument("--seed", type=int, default=None, help="random seed (default: from the clock; printed)")
    p.add_argument("--producers", type=int, default=3)
    p.add_argument("--admins", type=int, default=2, choices=(1, 2))
    p.add_argument(
        "--work-dir", type=Path, help="where events, logs and the report go (default: a new temporary directory)"
    )
    p.add_argument("--keep", action="store_true", help="keep the event files even when nothing was found")
    p.add_argument("--show", type=int, default=20, help="violations printed in full (all are in <work dir>/report.txt)")
    args = p.parse_args(argv)
    if args.minutes <= 0:
        p.error("--minutes must be positive")

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.history.run import RunConfig, run_history

    seed = args.seed if args.seed is not None else int(time.time()) % 1_000_000
    cfg = RunConfig(
        seed=seed, chaos_s=args.minutes * 60, producers=args.producers, admins=args.admins,
        settle_s=60.0, workdir=args.work_dir, keep_workdir=args.keep,
    )  # fmt: skip
    result = run_history(cfg)
    report = result.report
    print()
    print(report.format(limit=args.show))
    print()
    print(f"operations checked: {report.operations} ({report.details()})")
    print(f"faults injected: {sum(report.faults.values())} ("
          + ", ".join(f"{k} {v}" for k, v in sorted(report.faults.items())) + ")")  # fmt: skip
    print(f"violations: {len(report.violations)}")
    if result.problems:
        print("clean-up problems:\n  " + "\n  ".join(result.problems))
    print(f"seed {seed}; {result.summary_line()}; report in {result.workdir / 'report.txt'}")
    return 1 if report.violations or result.problems else 0


if __name__ == "__main__":
    sys.exit(main())
