"""Run every benchmark of the project, one after the other, and print one summary table.

    python -m benchmarks [--quick] [--only dispatch,execution,propagation,workflow,scale,follow,bulk,storm,waits]
                         [--verbose] [--log-dir DIR]
    python benchmarks/readme_table.py LOG_DIR   (the README's summary table from a run)
    python -m benchmarks soak --minutes N [--seed S]   (the long history run: benchmarks/soak.py)

Each script (``benchmarks/<name>.py``) runs as a subprocess, never two at once (they
measure the machine), with ``--json-out`` to a file in the log directory; its own
detailed report goes to ``<log dir>/<job>.log``. The summary table has one row per
figure: figure, bare Celery, pluginhost, ratio, target, pass/fail. Propagation runs
three times: 4 mixed workers on Redis, the same on RabbitMQ, 16 solo workers on Redis;
bulk twice, on Redis and on RabbitMQ. ``summary.json`` in the log directory holds the
rows and the run's date, load and machine, which ``benchmarks/readme_table.py``
turns into the README's table.

``--quick``: small N / runs / toggles for every script (a smoke run of a few
minutes); its ratios are noisy and are not the project's figures.

Exit status 0 when every script ran, even if targets are missed (benchmarks are not
tests); 1 when a script crashed, timed out or wrote no figures (shown as an "error"
row with its log).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


@dataclass
class Job:
    name: str
    script: str
    args: list[str] = field(default_factory=list)
    quick: list[str] = field(default_factory=list)


JOBS = [
    Job("dispatch", "dispatch.py", [], ["--n", "600", "--rounds", "4", "--probe", "50"]),
    Job("execution", "execution.py", [], ["--n", "600", "--rounds", "2", "--warmup", "50"]),
    Job("propagation-redis", "propagation.py", ["--broker", "redis"], ["--toggles", "10"]),
    Job("propagation-amqp", "propagation.py", ["--broker", "amqp"], ["--toggles", "10"]),
    Job("propagation-solo16", "propagation.py", ["--broker", "redis", "--solo", "16"], ["--toggles", "10"]),
    # Own database: workflow.py empties its tables, and someone may be running
    # workflow.py by hand with the default one.
    Job("workflow", "workflow.py", ["--db", "pluginhost_wfbench_suite"],
        ["--runs", "20", "--warmup", "3", "--pools", "prefork", "--profile-runs", "0"]),
    Job("scale", "scale.py", [], ["--plugins", "2000", "--history", "40000"]),
    Job("follow", "follow.py", [], ["--sizes", "10,2000", "--toggles", "50", "--memory-toggles", "30"]),
    Job("bulk-redis", "bulk.py", ["--broker", "redis"], ["--n", "2000", "--rounds", "2"]),
    Job("bulk-amqp", "bulk.py", ["--broker", "amqp"], ["--n", "2000", "--rounds", "2"]),
    Job("storm", "storm.py", [], ["--quick"]),
    Job("waits", "waits.py", ["--db", "pluginhost_bench_waits"], ["--sleepers", "1000", "--signals", "40"]),
]  # fmt: skip

# command-line fragments of benchmark processes (scripts, their workers, other runners)
MARKERS = ("benchmarks/", "benchmarks.apps.", "-m benchmarks")
COLUMNS = ("figure", "bare Celery", "pluginhost", "ratio", "target", "pass/fail")


def selected(only: str) -> list[Job]:
    """``--only a,b``: jobs named a or b, or whose name starts with "a-" (propagation, bulk)."""
    wanted = [w.strip() for w in only.split(",") if w.strip()]
    if not wanted:
        return list(JOBS)
    jobs = [j for j in JOBS if any(j.name == w or j.name.startswith(w + "-") for w in wanted)]
    unknown = [w for w in wanted if not any(j.name == w or j.name.startswith(w + "-") for j in JOBS)]
    if unknown:
        names = ", ".join(j.name for j in JOBS)
        raise SystemExit(f"--only: unknown benchmark(s) {', '.join(unknown)} (known: {names}, propagation)")
    return jobs


def benchmark_processes() -> tuple[dict[int, str], dict[int, str]]:
    """Processes running a benchmark script, a benchmark app's worker or another runner:
    (ours: descendants of this process, foreign: the others), pid -> command line."""
    me = os.getpid()

    def parent(pid: int) -> int:
        try:
            return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            return 0

    ancestors = set()  # whoever started this runner (a shell, `timeout ...`) is not "another run"
    p = parent(me)
    while p > 1 and p not in ancestors:
        ancestors.add(p)
        p = parent(p)
    ours: dict[int, str] = {}
    foreign: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me or int(entry.name) in ancestors:
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if "python" not in cmd or not any(m in cmd for m in MARKERS):
            continue
        p, hops = parent(int(entry.name)), 0
        while p > 1 and p != me and hops < 64:
            p, hops = parent(p), hops + 1
        (ours if p == me else foreign)[int(entry.name)] = cmd
    return ours, foreign


class Watch(threading.Thread):
    """Looks at the benchmark processes every 2 s while a script runs: which are ours
    (to check afterwards that none is left behind) and which are not (someone else is
    measuring on this machine at the same time)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.ours: dict[int, str] = {}
        self.foreign: dict[int, str] = {}
        self.done = threading.Event()

    def run(self) -> None:
        while True:
            ours, foreign = benchmark_processes()
            self.ours.update(ours)
            self.foreign.update(foreign)
            if self.done.wait(2.0):
                return

    def stop(self) -> None:
        self.done.set()
        self.join()

    def leftovers(self) -> dict[int, str]:
        """Processes of ours (seen during the run) still alive, same command line."""
        ours, foreign = benchmark_processes()
        now = {**ours, **foreign}
        return {pid: cmd for pid, cmd in self.ours.items() if now.get(pid) == cmd}


def run_job(
    job: Job, quick: bool, log_dir: Path, verbose: bool, timeout: float
) -> tuple[list[dict[str, Any]], str | None]:
    """Run one script; returns (its rows, an error message or None)."""
    json_path = log_dir / f"{job.name}.json"
    log_path = log_dir / f"{job.name}.log"
    argv = [sys.executable, str(HERE / job.script), *job.args, *(job.quick if quick else []),
            "--json-out", str(json_path)]  # fmt: skip
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    timed_out = threading.Event()

    def interrupt(proc: subprocess.Popen[str]) -> None:
        # SIGINT: KeyboardInterrupt in the script, whose finally blocks stop its workers
        timed_out.set()
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()

    with open(log_path, "w") as log:
        log.write(f"$ {shlex.join(argv)}\n\n")
        log.flush()
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)  # fmt: skip
        timer = threading.Timer(timeout, interrupt, (proc,))
        timer.daemon = True
        timer.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                log.flush()
                if verbose:
                    sys.stdout.write(line)
                    sys.stdout.flush()
            rc = proc.wait()
        except KeyboardInterrupt:
            # Ctrl-C reached the script too (same process group): let it stop its workers
            try:
                rest, _ = proc.communicate(timeout=60)
                log.write(rest or "")
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
        finally:
            timer.cancel()

    rows: list[dict[str, Any]] = []
    if json_path.exists():
        try:
            rows = json.loads(json_path.read_text())
        except ValueError as e:
            return rows, f"unreadable {json_path}: {e}"
    if timed_out.is_set():
        return rows, f"timed out after {timeout:.0f} s"
    if rc != 0:
        return rows, f"exit status {rc}"
    if not rows:
        return rows, "no figures written"
    return rows, None


def error_row(job: Job, message: str, log_dir: Path) -> dict[str, Any]:
    return {"figure": f"{job.name}: {message}", "bare": "", "pluginhost": f"see {log_dir / (job.name + '.log')}",
            "ratio": None, "target": "", "passed": "error"}  # fmt: skip


def cells(row: dict[str, Any]) -> list[str]:
    ratio = row.get("ratio")
    passed = row.get("passed")
    verdict = {True: "pass", False: "FAIL", None: "info"}.get(passed, str(passed))
    return [
        str(row.get("figure", "?")),
        str(row.get("bare") or "-"),
        str(row.get("pluginhost") or "-"),
        "-" if ratio is None else f"{float(ratio):.3f}",
        str(row.get("target") or "-"),
        verdict,
    ]


def table(rows: list[dict[str, Any]]) -> str:
    body = [cells(r) for r in rows]
    widths = [max(len(c) for c in col) for col in zip(COLUMNS, *body)]
    right = {3}  # ratio

    def line(values: list[str] | tuple[str, ...]) -> str:
        return "  ".join(
            v.rjust(w) if i in right else v.ljust(w) for i, (v, w) in enumerate(zip(values, widths))
        ).rstrip()

    return "\n".join([line(COLUMNS), line(["-" * w for w in widths]), *(line(b) for b in body)])


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def main() -> int:
    if sys.argv[1:2] == ["soak"]:  # a sub-command of its own: not a benchmark, a test that runs for long
        from benchmarks import soak

        return soak.main(sys.argv[2:])
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small N/runs/toggles for every script (smoke run)")
    p.add_argument(
        "--only",
        default="",
        help="comma list of: " + ", ".join(j.name for j in JOBS) + " (propagation, bulk: all of each)",
    )
    p.add_argument("--verbose", "-v", action="store_true", help="also stream each script's output here")
    p.add_argument("--log-dir", type=Path, help="where the logs and JSON go (default: a new temporary directory)")
    p.add_argument(
        "--timeout", type=float, help="seconds per script before it is interrupted (default 600 quick, 3600)"
    )
    args = p.parse_args()
    jobs = selected(args.only)
    timeout = args.timeout or (600.0 if args.quick else 3600.0)
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="pluginhost-benchmarks-"))
    log_dir.mkdir(parents=True, exist_ok=True)

    print(f"pluginhost benchmarks{' (--quick: smoke run, small N, noisy ratios)' if args.quick else ''}: "
          f"{len(jobs)} scripts, one at a time; logs in {log_dir}")  # fmt: skip
    sys.stdout.flush()

    rows: list[dict[str, Any]] = []
    failed = 0
    leftovers: dict[int, str] = {}
    disturbed: list[str] = []
    t_all = time.monotonic()
    started = time.strftime("%Y-%m-%d %H:%M %Z")
    load_start = loadavg()
    try:
        for i, job in enumerate(jobs, 1):
            quick = " ".join(job.quick) if args.quick else ""
            print(f"[{i}/{len(jobs)}] {job.name}: benchmarks/{job.script} {' '.join(job.args)} {quick}".rstrip()
                  + f"  (load {loadavg()}; log: {log_dir / (job.name + '.log')})", flush=True)  # fmt: skip
            watch = Watch()
            watch.start()
            t = time.monotonic()
            try:
                job_rows, error = run_job(job, args.quick, log_dir, args.verbose, timeout)
            finally:
                watch.stop()
            rows.extend(job_rows)
            took = time.monotonic() - t
            if error:
                failed += 1
                rows.append(error_row(job, error, log_dir))
                print(f"      ERROR after {took:.0f} s: {error}", flush=True)
            else:
                print(f"      done in {took:.0f} s, {len(job_rows)} rows", flush=True)
            if watch.foreign:
                disturbed.append(job.name)
                print("      WARNING: other benchmark processes ran at the same time (figures distorted): "
                      + "; ".join(f"{pid} {cmd[:90]}" for pid, cmd in sorted(watch.foreign.items())[:4])
                      + (" ..." if len(watch.foreign) > 4 else ""), flush=True)  # fmt: skip
            time.sleep(1)  # let the script's workers finish exiting before looking for leftovers
            left = watch.leftovers()
            if left:
                leftovers.update(left)
                print(f"      WARNING: {len(left)} processes of {job.name} still running: "
                      + ", ".join(str(pid) for pid in sorted(left)), flush=True)  # fmt: skip
    except KeyboardInterrupt:
        print("\ninterrupted: the table below has the scripts that finished", flush=True)
        failed += 1

    out = table(rows)
    counts = {
        k: sum(1 for r in rows if r.get("passed") is v) for k, v in (("pass", True), ("FAIL", False), ("info", None))
    }
    summary = (f"{len(rows)} rows: {counts['pass']} pass, {counts['FAIL']} FAIL (target missed), {counts['info']} info"
               f"; {failed} script(s) in error; {time.monotonic() - t_all:.0f} s; logs in {log_dir}")  # fmt: skip
    if disturbed:
        summary += f"\nother benchmark processes ran during: {', '.join(disturbed)} (their figures are distorted)"
    if args.quick:
        summary += "\n--quick: small N, the ratios are a smoke test, not the project's figures"
    print("\n" + out + "\n\n" + summary)
    if leftovers:
        print("processes of these scripts left running: "
              + "; ".join(f"{p} {c[:100]}" for p, c in sorted(leftovers.items())))  # fmt: skip
    (log_dir / "summary.txt").write_text(out + "\n\n" + summary + "\n")
    run = {
        "started": started,
        "seconds": round(time.monotonic() - t_all),
        "load_start": load_start,
        "load_end": loadavg(),
        "cpus": os.cpu_count(),
        "quick": args.quick,
        "disturbed": disturbed,
        "scripts": [j.name for j in jobs],
        "errors": failed,
    }
    (log_dir / "summary.json").write_text(json.dumps({"run": run, "rows": rows}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
