"""The README demo: live toggles on a real worker, on the embedded default.

    python examples/demo.py

Starts a Celery worker (prefork, 2 processes) on the embedded default (no
servers: filesystem broker, SQLite store and results, in a fresh folder), then:

1. runs a capability; queues a second run for later; disables the capability
   live; shows that a new dispatch is refused and that the queued run is refused
   by the worker without executing; re-enables it;
2. starts onboarding workflows (short durations: the verification wait times
   out after 3 s, the tips come 5 s later): two users verify their address (a
   signal by e-mail), two do not and get a reminder, the pro plan gets a
   workspace; while every run sleeps before its tips, the tips step is disabled,
   and the sleeping runs skip it when they wake; re-enabled, a new run sends
   them. Prints every run's step table.

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
# the onboarding workflow's waits, in seconds for the demo (3 days and 1 day in the example)
os.environ["ONBOARDING_VERIFY_TIMEOUT"] = "3s"
os.environ["ONBOARDING_TIPS_AFTER"] = "5s"
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


def wait_runs(ids: list[str], label: str, until: tuple[str, ...] = ("succeeded", "failed")) -> None:
    with Progress(console=console, transient=True) as progress:
        bar = progress.add_task(label, total=len(ids))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            runs = [flows.run(i) for i in ids]
            there = sum(1 for run in runs if run and run.status in until)
            progress.update(bar, completed=there)
            if there == len(ids):
                return
            time.sleep(0.1)
    expect(False, f"{label}: every run got there within 120 s")


#: the step table's column heads (the steps' slugs do not fit 80 columns)
HEADS = {
    "create_account": "account",
    "welcome_email": "welcome",
    "send_reminder": "reminder",
    "provision_workspace": "workspace",
    "send_tips": "tips",
    "notify_crm": "crm",
}


def step_table(ids: list[str]) -> Table:
    table = Table(
        title="onboarding runs (one row per run, one column per step)",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
    )
    table.add_column("run", no_wrap=True)
    table.add_column("user", no_wrap=True)
    for step in ONBOARDING.flat():
        table.add_column(HEADS.get(step.slug, step.slug))
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
        user = f"{run.input['email'].split('@')[0]} {run.input.get('plan', 'free')}"
        table.add_row(run_id[:6], user, *cells, run.status)
    return table


def statuses(run_id: str) -> dict[str, str]:
    run = flows.run(run_id)
    return {s.slug: s.status for s in run.steps} if run else {}


def part_two() -> None:
    console.rule("2. onboarding: waits, a signal, conditions, a step toggled while runs sleep")
    say("define", f"onboarding version {flows.define(ONBOARDING, actor='demo')}")
    users = [("ada", "pro"), ("bob", "free"), ("cy", "pro"), ("dee", "free")]
    runs = {
        name: host.run_capability("onboard", {"email": f"{name}@example.com", "name": name, "plan": plan}).id
        for name, plan in users
    }
    say("start", "4 runs: each sends a welcome e-mail, then waits for its address to be verified (3 s at most)")
    wait_runs(list(runs.values()), "waiting for verification", until=("waiting",))
    for name in ("ada", "bob"):
        flows.signal_by_key("onboarding", f"{name}@example.com", "email_verified", {"verified_via": "link"})
    say("signal", "ada and bob verified (a signal by e-mail address); cy and dee did not")
    wait_runs(list(runs.values()), "asleep before the tips", until=("sleeping",))
    host.disable("send_tips", actor="demo", wait=True)
    say("disable", "every run sleeps before its tips (5 s): send_tips disabled now")
    wait_runs(list(runs.values()), "waking up")
    host.enable("send_tips", actor="demo", wait=True)
    say("enable", "send_tips enabled again; one more run, verified at once")
    last = host.run_capability("onboard", {"email": "eve@example.com", "name": "eve"})
    wait_runs([last.id], "eve waits", until=("waiting",))
    flows.signal(last.id, "email_verified", {})
    result = last.get(timeout=60)
    ids = [*runs.values(), last.id]
    console.print(step_table(ids))
    expect(all(flows.run(i).status == "succeeded" for i in ids), "every run succeeded")
    verified = [statuses(runs[n])["send_reminder"] for n in ("ada", "bob")]
    expect(verified == ["skipped", "skipped"], "verified users got no reminder (condition false)")
    reminded = [statuses(runs[n])["send_reminder"] for n in ("cy", "dee")]
    expect(reminded == ["succeeded", "succeeded"], "the others got one after the wait timed out")
    workspaces = [statuses(runs[n])["provision_workspace"] for n, _ in users]
    expect(workspaces == ["succeeded", "skipped", "succeeded", "skipped"], "only pro plans got a workspace")
    expect(all(statuses(i)["send_tips"] == "skipped" for i in runs.values()), "runs asleep at the toggle skip it")
    expect(statuses(last.id)["send_tips"] == "succeeded", "after re-enabling, the tips go out again")
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
