"""The history checker (tests/history/): its rules on small hand-written histories,
the event log across processes, and one short fixed-seed run under faults.

The hand-written histories show that each rule can fail: a history that breaks
G1, G2/G3, G4 or G6 is reported with the slice that shows it, and the same history
without the break is not.

``test_a_short_history_under_faults_has_no_violations`` is the CI version of the
randomized test (``python -m benchmarks soak --minutes N`` is the long one): real
PostgreSQL (a database and a login role of its own, reached through a TCP proxy),
a private Redis broker and result backend, 4 real workers (prefork c2, threads,
solo, prefork with --max-tasks-per-child), 2 producers, 2 admins and every fault
kind of tests/history/faults.py; 60-120 s in all. Its one-line summary is printed
(``pytest -s`` or ``-rP``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests import harness
from tests.history import checker
from tests.history.checker import Final
from tests.history.events import Event, EventLog, read_history
from tests.history.faults import KINDS

SEED = 20261202
PIDS = {"a0": 100, "a1": 101, "p0": 200, "p1": 201, "w1": 301, "w2": 302, "injector": 1}
HOST = {"w1": "w1@box", "w2": "w2@box"}


class Story:
    """A hand-written history: ``story.at(ms, proc, kind, **fields)``."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def at(self, ms: float, proc: str, kind: str, **data: Any) -> Story:
        self.events.append(Event(t=int(ms * 1_000_000), proc=proc, pid=PIDS.get(proc, 999), kind=kind, data=data))
        return self

    def call(self, start: float, end: float | None, proc: str, n: int, op: str, slug: str | None = "alpha",
             *, error: str | None = None, **result: Any) -> Story:  # fmt: skip
        fields: dict[str, Any] = {"call": n, "actor": f"{proc}:{n}", "op": op, "wait": "acks" in result}
        if slug is not None:
            fields["slug"] = slug
        if "config" in result:
            fields["config"] = result.pop("config")
        self.at(start, proc, "admin_start", **fields)
        if end is not None:
            if error:
                self.at(end, proc, "admin_error", **fields, error=error, message="...")
            else:
                self.at(end, proc, "admin_return", **fields, **result)
        return self

    def dispatch(self, start: float, end: float, proc: str, op: str, outcome: str = "accepted",
                 plugin: str = "alpha") -> Story:  # fmt: skip
        self.at(start, proc, "dispatch_start", op=op, slug=f"{plugin}_job", plugin=plugin)
        return self.at(end, proc, f"dispatch_{outcome}", op=op)

    def body(self, start: float, end: float | None, worker: str, *, plugin: str = "alpha",
             slug: str = "alpha_job", tag: str | None = None) -> Story:  # fmt: skip
        fields = {"slug": slug, "plugin": plugin, "hostname": HOST[worker], "task_id": "t", "op": None, "tag": tag}
        self.at(start, worker, "body_start", **fields)
        if end is not None:
            self.at(end, worker, "body_end", **fields)
        return self

    def check(self, final: Final | None = None, **kw: Any) -> checker.Report:
        return checker.check(self.events, final or empty_final(), **kw)


def empty_final(**kw: Any) -> Final:
    return Final(plugins=kw.pop("plugins", {}), audit=kw.pop("audit", []), runs=kw.pop("runs", []), **kw)


def rules(report: checker.Report) -> list[str]:
    return [v.rule for v in report.violations]


# -- G1 -------------------------------------------------------------------------------


def test_g1_a_dispatch_accepted_after_a_disable_returned_is_reported_with_its_slice() -> None:
    story = Story().call(100, 110, "a0", 1, "disable")
    story.call(140, 145, "p0", 1, "enable", slug="beta")  # a no-op elsewhere
    story.dispatch(150, 152, "p0", "p0#1")
    story.call(400, 410, "a1", 1, "enable")
    report = story.check()
    assert rules(report) == ["G1"]
    text = report.violations[0].format(report.t0)
    assert "dispatch p0#1 of 'alpha_job' started 40.0 ms after disable a0:1 returned" in text
    slice_kinds = [line.split()[5] for line in text.splitlines() if line.startswith("*")]
    assert slice_kinds == ["admin_start", "admin_return", "dispatch_start", "dispatch_accepted", "admin_start"]
    assert "admin_return" in text.split("context")[1]  # the dispatcher's own no-op call meanwhile
    assert report.checked["G1 windows"] == 1 and report.checked["G1 dispatches in windows"] == 1


def test_g1_dispatches_outside_the_window_are_not_violations() -> None:
    story = Story()
    story.dispatch(90, 105, "p0", "p0#1")  # started before the disable returned
    story.call(100, 110, "a0", 1, "disable")
    story.dispatch(150, 152, "p0", "p0#2", outcome="refused")  # refused inside: right
    story.call(400, 410, "a1", 1, "enable")
    story.dispatch(390, 405, "p0", "p0#3")  # accepted after the enable started: may follow its commit
    story.dispatch(420, 421, "p1", "p1#1")  # after the enable
    story.dispatch(150, 152, "p1", "p1#2", plugin="beta")  # another plugin
    report = story.check()
    assert report.violations == []
    assert report.checked["G1 dispatches in windows"] == 1


def test_g1_windows_are_found_among_several_of_one_plugin() -> None:
    story = Story().call(100, 110, "a0", 1, "disable").call(150, 160, "a1", 1, "enable")
    story.call(200, 210, "a0", 2, "disable").call(220, 230, "a1", 2, "disable")  # the second a no-op
    story.call(400, 405, "a1", 3, "enable")
    story.dispatch(120, 130, "p0", "p0#1")  # first window
    story.dispatch(165, 170, "p0", "p0#2")  # enabled between the windows: fine
    story.dispatch(240, 250, "p0", "p0#3")  # inside both later windows
    story.dispatch(390, 401, "p0", "p0#4")  # accepted after the enable started: fine
    report = story.check()
    assert [v.message.split()[1] for v in report.violations] == ["p0#1", "p0#3"]
    assert report.checked["G1 windows"] == 3


def test_g1_a_disable_overlapped_by_an_enable_opens_no_window() -> None:
    story = Story().call(100, 300, "a0", 1, "disable")
    story.call(150, 200, "a1", 1, "enable")
    story.dispatch(320, 322, "p0", "p0#1")
    report = story.check()
    assert [v for v in report.violations if v.rule == "G1"] == []
    assert report.checked["G1 ambiguous disables"] == 1


def test_g1_an_enable_that_raised_still_closes_the_window() -> None:
    story = Story().call(100, 110, "a0", 1, "disable")
    story.call(200, 2300, "a1", 1, "enable", error="StoreUnavailable")  # may have committed
    story.dispatch(2400, 2401, "p0", "p0#1")
    assert rules(story.check()) == []
    story.dispatch(150, 152, "p0", "p0#2")
    assert rules(story.check()) == ["G1"]


def test_g1_deadline_a_dispatch_that_hangs_is_reported_unless_the_broker_restarted() -> None:
    story = Story().dispatch(1000, 7500, "p0", "p0#1")
    assert rules(story.check(deadline_s=5.0)) == ["G1-deadline"]
    story.at(2000, "injector", "fault_start", fault="broker_restart").at(
        3000, "injector", "fault_end", fault="broker_restart"
    )
    assert rules(story.check(deadline_s=5.0)) == []
    hung = Story().at(1000, "p0", "dispatch_start", op="p0#9", slug="alpha_job", plugin="alpha")
    hung.at(9000, "injector", "role_stopped", role_proc="p0", how="SIGKILL")
    assert rules(hung.check(deadline_s=5.0)) == ["G1-deadline"]


# -- G2/G3 ----------------------------------------------------------------------------


def test_g2_g3_a_body_started_in_a_worker_after_it_acknowledged_is_reported() -> None:
    story = Story().call(100, 130, "a0", 1, "disable", acks=[HOST["w1"]])
    story.body(160, 170, "w1")
    story.call(500, 510, "a1", 1, "enable")
    report = story.check()
    assert rules(report) == ["G2/G3"]
    assert "body started in w1@box (pid 301) 30.0 ms after disable a0:1 returned with w1@box's acknowledgement" in (
        report.violations[0].message
    )


def test_g2_g3_bodies_outside_an_acknowledged_window_are_not_violations() -> None:
    story = Story().body(90, 200, "w1")  # started before the ack came back
    story.call(100, 130, "a0", 1, "disable", acks=[HOST["w1"]])
    story.body(160, 170, "w2")  # w2 did not acknowledge
    story.body(160, 170, "w1", plugin="beta", slug="beta_job")  # another plugin
    story.call(500, 510, "a1", 1, "enable")
    story.body(520, 530, "w1")  # after the enable started
    assert story.check().violations == []


def test_g2_g3_an_unacknowledged_disable_bounds_nothing_in_workers() -> None:
    story = Story().call(100, 1130, "a0", 1, "disable", acks=[])  # a stopped worker did not answer
    story.body(1200, 1210, "w1")
    assert rules(story.check()) == []


# -- G4 -------------------------------------------------------------------------------


def run(status: str, tag: str = "p0-1", steps: list[tuple[str, str]] | None = None) -> dict[str, Any]:
    return {"id": f"run-{tag}", "status": status, "tag": tag, "error": None,
            "steps": [{"position": i, "slug": s, "status": st, "attempts": 1}
                      for i, (s, st) in enumerate(steps or [])]}  # fmt: skip


def test_g4_a_run_left_unfinished_and_not_swept_is_reported() -> None:
    story = Story().at(10, "p0", "flow_start", op="p0#1", tag="p0-1", run_id="run-p0-1")
    story.body(20, 100, "w1", slug="wf_prep", tag="p0-1")
    report = story.check(empty_final(runs=[run("running", steps=[("wf_prep", "succeeded"), ("wf_done", "pending")])]))
    assert rules(report) == ["G4"]
    assert "not terminal, and sweep did not report it" in report.violations[0].message
    assert (
        story.check(empty_final(runs=[run("running", steps=[("wf_prep", "succeeded")])], swept=["run-p0-1"])).violations
        == []
    )
    assert story.check(empty_final(runs=[run("failed", steps=[("wf_prep", "succeeded")])])).violations == []


def test_g4_a_step_body_that_runs_again_after_it_finished_is_reported() -> None:
    story = Story().body(20, 100, "w1", slug="wf_left", tag="p0-1").body(300, 380, "w2", slug="wf_left", tag="p0-1")
    report = story.check()
    assert rules(report) == ["G4"]
    assert "ran again in w2@box (pid 302) 200.0 ms after an execution in w1@box (pid 301) had finished" in (
        report.violations[0].message
    )
    # the same, when the first execution's worker was SIGKILLed before its delivery was acknowledged
    story.at(150, "injector", "fault_start", fault="worker_kill", hostname=HOST["w1"], pids=[301])
    assert story.check().violations == []


def test_g4_a_step_body_running_twice_at_once_is_reported_unless_its_worker_was_lost() -> None:
    story = Story().body(20, 300, "w1", slug="wf_done", tag="p0-1").body(100, 200, "w2", slug="wf_done", tag="p0-1")
    assert rules(story.check()) == ["G4"]
    story.at(50, "injector", "fault_start", fault="worker_stop", hostname=HOST["w1"], pids=[301])
    assert story.check().violations == []
    died = Story().body(20, None, "w1", slug="wf_done", tag="p0-2").body(900, 950, "w2", slug="wf_done", tag="p0-2")
    assert rules(died.check()) == ["G4"]  # never finished, worker not lost: a second delivery was not required
    died.at(500, "injector", "fault_start", fault="worker_kill", hostname=HOST["w1"], pids=[301])
    assert died.check().violations == []


def test_g4_a_step_recorded_succeeded_whose_body_never_ran_is_reported() -> None:
    story = Story().body(20, 100, "w1", slug="wf_prep", tag="p0-1")
    final = empty_final(runs=[run("succeeded", steps=[("wf_prep", "succeeded"), ("wf_right", "succeeded")])])
    report = story.check(final)
    assert rules(report) == ["G4"]
    assert "step 'wf_right'" in report.violations[0].message and "never started" in report.violations[0].message
    skipped = empty_final(runs=[run("succeeded", steps=[("wf_prep", "succeeded"), ("wf_right", "skipped")])])
    assert story.check(skipped).violations == []


# -- G6 -------------------------------------------------------------------------------


def record(version: int, enabled: bool, config: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"slug": "alpha", "kind": "capability", "enabled": enabled, "config": config or {}, "sort": 0,
            "label_en": "", "label_ar": "", "version": version}  # fmt: skip


def row(i: int, actor: str, action: str, before: dict[str, Any] | None, after: dict[str, Any]) -> dict[str, Any]:
    return {"id": i, "at": "2026-12-02T00:00:00Z", "actor": actor, "slug": "alpha", "action": action,
            "before": before, "after": after}  # fmt: skip


def g6_story() -> tuple[Story, list[dict[str, Any]]]:
    story = Story().call(100, 110, "a0", 1, "disable", version=2, enabled=False, record_config={})
    story.call(200, 210, "a1", 1, "disable", version=2, enabled=False, record_config={})  # a no-op
    story.call(300, 310, "a0", 2, "configure", config={"n": 1}, version=3, enabled=False, record_config={"n": 1})
    audit = [
        row(1, "sync", "create", None, record(1, True)),
        row(2, "a0:1", "disable", record(1, True), record(2, False)),
        row(3, "a0:2", "configure", record(2, False), record(3, False, {"n": 1})),
    ]
    return story, audit


def test_g6_an_audit_log_equal_to_the_committed_changes_passes() -> None:
    story, audit = g6_story()
    report = story.check(empty_final(plugins={"alpha": record(3, False, {"n": 1})}, audit=audit))
    assert report.violations == []
    assert report.checked["G6 committed calls"] == 2 and report.checked["G6 returned records"] == 3


def test_g6_a_lost_update_breaks_the_chain() -> None:
    story, audit = g6_story()
    audit[2] = row(3, "a0:2", "configure", record(1, True), record(2, True, {"n": 1}))  # written from a stale read
    report = story.check(empty_final(plugins={"alpha": record(2, True, {"n": 1})}, audit=audit))
    assert "G6" in rules(report)
    assert any("do not chain" in v.message for v in report.violations)


def test_g6_a_call_that_raised_but_committed_is_reported() -> None:
    story, audit = g6_story()
    story.call(400, 2400, "a1", 2, "enable", error="StoreUnavailable")
    audit.append(row(4, "a1:2", "enable", record(3, False, {"n": 1}), record(4, True, {"n": 1})))
    report = story.check(empty_final(plugins={"alpha": record(4, True, {"n": 1})}, audit=audit))
    assert rules(report) == ["G6"]
    assert "raised StoreUnavailable, yet audit row 4 shows it committed" in report.violations[0].message


def test_g6_a_returned_record_the_audit_does_not_have_is_reported() -> None:
    story, audit = g6_story()
    story.call(400, 410, "a1", 2, "enable", version=9, enabled=True, record_config={})
    report = story.check(empty_final(plugins={"alpha": record(3, False, {"n": 1})}, audit=audit))
    assert rules(report) == ["G6"]
    assert "returned version 9, which no audit row has" in report.violations[0].message


def test_g6_a_disable_returning_an_enabled_record_and_a_final_record_off_the_log_are_reported() -> None:
    story, audit = g6_story()
    story.call(400, 410, "a1", 2, "disable", version=1, enabled=True, record_config={})
    report = story.check(empty_final(plugins={"alpha": record(4, True, {"n": 1})}, audit=audit))
    messages = " | ".join(v.message for v in report.violations)
    assert rules(report) == ["G6", "G6"]
    assert "has enabled=True after disable" in messages
    assert "is not the last audited state" in messages


# -- the event log --------------------------------------------------------------------


def test_event_logs_of_several_processes_merge_in_time_order_and_a_torn_line_is_skipped(tmp_path: Path) -> None:
    log = EventLog(tmp_path, "parent")
    log.emit("first")
    pid = os.fork()
    if pid == 0:  # a child process, as a prefork pool process is
        log.emit("child", n=1)
        os._exit(0)
    os.waitpid(pid, 0)
    log.emit("last")
    log.close()
    with open(tmp_path / "killed-1.jsonl", "w") as f:
        f.write('{"v":1,"t":1,"proc":"killed","pid":1,"kind":"ok"}\n{"v":1,"t":2,"pro')
    history = read_history(tmp_path)
    assert [e.kind for e in history.events if e.proc == "parent"] == ["first", "child", "last"]
    assert history.torn_lines == 1 and history.files == 3
    assert {e.pid for e in history.events if e.proc == "parent"} == {os.getpid(), pid}
    assert EventLog(None, "nobody").emit("nothing") == 0


# -- the run --------------------------------------------------------------------------


def _services_or_skip() -> None:
    found = [harness.check_service("postgres")]
    if shutil.which("redis-server") is None:
        found.append("redis-server is not installed")
    problems = [p for p in found if p]
    if problems:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("; ".join(problems))
        pytest.skip("; ".join(problems))


@pytest.mark.integration
def test_a_short_history_under_faults_has_no_violations(tmp_path: Path) -> None:
    from tests.history.run import RunConfig, run_history

    _services_or_skip()
    result = run_history(RunConfig(seed=SEED, chaos_s=45.0, workdir=tmp_path / "history", keep_workdir=True))
    print(result.summary_line())
    print("checked: " + result.report.details())
    assert result.problems == [], result.problems
    checked, faults = result.report.checked, result.report.faults
    # the run exercised what it claims to check (else "no violations" means nothing)
    assert sorted(faults) == sorted(KINDS), f"fault kinds injected: {dict(faults)}"
    assert checked["G1 dispatches in windows"] >= 20, result.report.details()
    assert checked["G2/G3 acknowledged windows"] >= 5, result.report.details()
    assert checked["workers with bodies"] == 4, result.report.details()
    assert checked["workflow runs"] >= 10 and checked["step executions"] >= 20, result.report.details()
    assert checked["G6 committed calls"] >= 20, result.report.details()
    assert result.report.violations == [], "\n" + result.report.format(limit=10)
