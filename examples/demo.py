"""The README demo: live toggles on a real worker, on the embedded default.

    python examples/demo.py

Starts a Celery worker (prefork, 2 processes) on the embedded default (no
servers: filesystem broker, SQLite store and results, in a fresh folder), then:

1. runs a capability; queues a second run for later; disables the capability
   live; shows that a new dispatch is refused and that the queued run is refused
   by the worker without executing; re-enables it;
2. starts onboarding workflows, disables a step while they are in flight, shows
   that running and new workflows skip it, re-enables it, and prints every run's
   step table.

Exits 0 if everything behaved as described, 1 otherwise.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(tempfile.mkdtemp(prefix="demo-", dir=os.environ.get("PLUGINHOST_DEMO_DIR") or None))
os.environ["PLUGINHOST_DATA"] = str(DATA)
os.environ.pop("PLUGINHOST_BROKER_URL", None)
sys.path.insert(0, str(ROOT))

from rich import box  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.markup import escape  # noqa: E402
from rich.progress import Progress  # noqa: E402
from rich.table import Table  # noqa: E402

from examples.onboarding.app import ONBOARDING, accounts, flows, host, rows  # noqa: E402
from pluginhost import CapabilityDisabled  # noqa: E402

# The terminal's width (COLUMNS, else the terminal, else 80 when piped); every
# line is laid out to fit it rather than left for the terminal to break.
WIDTH = shutil.get_terminal_size((80, 24)).columns
console = Console(width=WIDTH)
failures: list[str] = []
STARTED = time.monotonic()


def say(step: str, text: str) -> None:
    head = f"{time.monotonic() - STARTED:6.2f}s {step:<8} "
    # wrapped here at word boundaries; continuation lines start under the text
    lines = textwrap.wrap(text, width=max(WIDTH - len(head), 20)) or [""]
    console.print(f"[dim]{head[:8]}[/][bold cyan]{head[8:]}[/]{escape(lines[0])}")
    for more in lines[1:]:
        console.print(" " * len(head) + escape(more))


def expect(ok: bool, what: str) -> None:
    console.print(f"    {'[green]ok[/]' if ok else '[red]FAILED[/]'}  {what}")
    if not ok:
        failures.append(what)


def start_worker() -> subprocess.Popen[bytes]:
    log = open(DATA / "worker.log", "wb")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "examples.onboarding.app",
            "worker",
            "--pool=prefork",
            "-c",
            "2",
            "-n",
            "demo@%h",
            "-Q",
            "onboarding",
            "--without-gossip",
            "--without-mingle",
            "--loglevel=INFO",
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"worker exited early; see {DATA / 'worker.log'}")
        if host.workers(timeout=0.5):
            return proc
    raise SystemExit("worker did not answer within 60 s")


def stop_worker(proc: subprocess.Popen[bytes]) -> float:
    """Stop the worker with Celery's remote-control ``shutdown``; return the seconds taken.

    Not a signal: the filesystem transport has no event loop, so the worker drains
    its queue for up to 2 s before it looks at a signal's shutdown flag, and a
    SIGQUIT sent to the process group kills a pool child that may hold the pool's
    queue lock, after which the main process waits on that lock for ever. The
    ``shutdown`` command is read like a task message (10 ms polling) and starts a
    warm shutdown at once; the rest is the prefork pool's own stop (billiard's
    threads wake once a second), about 2 s.
    """
    started = time.monotonic()
    if proc.poll() is None:
        host.app.control.shutdown(destination=["demo@" + socket.gethostname()])
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
            expect(False, "the worker stopped by itself (it had to be killed)")
    return time.monotonic() - started


def part_one() -> None:
    console.rule("1. a capability, toggled live")
    r = host.run_capability("create_account", {"email": "ada@example.com", "name": "Ada"})
    say("run", f"create_account -> {r.get(timeout=30)}")
    later = host.run_capability("create_account", {"email": "late@example.com"}, countdown=2)
    say("queue", f"a second run is queued for 2 s from now (task {later.id[:8]})")
    acked = host.disable("create_account", actor="demo", wait=True, timeout=1.0)
    say("disable", f"create_account disabled; acknowledged by {', '.join(acked) or 'no worker'}")
    expect(bool(acked), "the worker acknowledged the new revision")
    try:
        host.run_capability("create_account", {"email": "refused@example.com"})
        expect(False, "a new dispatch is refused")
    except CapabilityDisabled as exc:
        say("dispatch", f"refused before enqueue: {exc}")
        expect(True, "a new dispatch is refused")
    try:
        later.get(timeout=30)
        expect(False, "the queued run is refused by the worker")
    except CapabilityDisabled as exc:
        say("worker", f"the queued run was refused just before it ran: {exc}")
        expect(True, "the queued run is refused by the worker")
    emails = [row["email"] for row in rows(accounts)]
    expect("late@example.com" not in emails, "the queued run wrote nothing")
    host.enable("create_account", actor="demo", wait=True)
    r = host.run_capability("create_account", {"email": "back@example.com"})
    say("enable", f"create_account enabled again -> {r.get(timeout=30)}")


def wait_runs(ids: list[str], label: str) -> None:
    with Progress(console=console, transient=True) as progress:
        bar = progress.add_task(label, total=len(ids) * 5)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            runs = [flows.run(i) for i in ids]
            done = sum(1 for run in runs if run for s in run.steps if s.status not in ("pending", "running"))
            progress.update(bar, completed=done)
            if all(run and run.status in ("succeeded", "failed") for run in runs):
                return
            time.sleep(0.1)


def step_table(ids: list[str]) -> Table:
    # light borders and two-line headers: the table is 70 columns wide, and narrower
    # terminals get wrapped headers rather than cut-off statuses
    table = Table(
        title="onboarding runs (one row per run, one column per step)",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
    )
    table.add_column("run", no_wrap=True)
    for step in ONBOARDING.flat():
        table.add_column(step.slug.replace("_", "\n", 1))
    table.add_column("status", no_wrap=True)
    shown = {
        "succeeded": "[green]ok[/]",
        "skipped": "[yellow]skip[/]",
        "failed": "[red]FAIL[/]",
        "cancelled": "[red]cancel[/]",
    }
    for run_id in ids:
        run = flows.run(run_id)
        assert run is not None
        cells = [shown.get(s.status, s.status) for s in run.steps]
        table.add_row(run_id[:8], *cells, run.status)
    return table


def statuses(run_id: str) -> dict[str, str]:
    run = flows.run(run_id)
    return {s.slug: s.status for s in run.steps} if run else {}


def part_two() -> None:
    console.rule("2. onboarding workflows, a step toggled while they run")
    say("define", f"onboarding version {flows.define(ONBOARDING, actor='demo')}")
    early = [
        host.run_capability("onboard", {"email": f"user{i}@example.com", "name": f"User {i}"}).id for i in range(4)
    ]
    say("start", f"{len(early)} onboarding runs started")
    time.sleep(0.3)
    host.disable("notify_crm", actor="demo", wait=True)
    say("disable", "notify_crm disabled while those runs are in flight")
    late = [flows.start("onboarding", {"email": f"new{i}@example.com"}).id for i in range(2)]
    say("start", f"{len(late)} more runs started after the toggle")
    wait_runs(early + late, "running")
    host.enable("notify_crm", actor="demo", wait=True)
    say("enable", "notify_crm enabled again")
    final = [flows.start("onboarding", {"email": "last@example.com"}).id]
    wait_runs(final, "running")
    console.print(step_table(early + late + final))
    expect(all(flows.run(i).status == "succeeded" for i in early + late + final), "every run succeeded")
    expect(all(statuses(i)["notify_crm"] == "skipped" for i in early), "runs in flight skipped notify_crm")
    expect(all(statuses(i)["notify_crm"] == "skipped" for i in late), "runs started while disabled skipped it")
    expect(statuses(final[0])["notify_crm"] == "succeeded", "after re-enabling, notify_crm runs again")
    result = host.run_capability("onboard", {"email": "final@example.com"}).get(timeout=60)
    say("result", f"run_capability('onboard').get() -> {sorted(result)}")


def main() -> int:
    console.print("[bold]pluginhost demo[/] on the embedded default (no servers); its files:")
    console.print(f"  {DATA}", overflow="fold")
    worker = start_worker()
    try:
        say("worker", f"started: {', '.join(host.workers())}")
        part_one()
        part_two()
    finally:
        took = stop_worker(worker)
        say("worker", f"stopped in {took:.1f} s (remote-control shutdown)")
    if failures:
        console.print(f"[red]{len(failures)} expectation(s) failed[/]; worker log: {DATA / 'worker.log'}")
        return 1
    shutil.rmtree(DATA, ignore_errors=True)
    console.print("[bold green]demo finished: every expectation held[/]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
