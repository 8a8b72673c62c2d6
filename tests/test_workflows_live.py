"""Workflows on real workers: chain and chord with context merging, live step
toggles (G4), retry, failure and resume, definition edits, WorkflowCapability."""

from __future__ import annotations

import time
from types import ModuleType
from typing import Any

import kombu
import psycopg
import pytest

from pluginhost import CapabilityDisabled, InvalidInput
from tests import harness
from workflows import InvalidRunState, InvalidWorkflow, Parallel, Step, Workflow, WorkflowNotFound


def statuses(flows: Any, run_id: str) -> dict[str, str]:
    run = flows.run(run_id)
    return {s.slug: s.status for s in run.steps}


def test_chain_and_chord_merge_the_context_in_declaration_order(core: ModuleType, workers: Any) -> None:
    workers("tests.apps.core", pool="prefork")
    res = core.flows.start("flow", {"tag": "merge", "order": []})
    out = res.get(timeout=60)
    assert out["a"] == 1 and out["b"] == 2 and out["c"] == 3 and out["d"] == 4 and out["e"] == 1
    assert out["shared"] == "c"  # parallel outputs merge in declaration order: c after b
    assert out["order"] == ["a", "d"] and out["tag"] == "merge"
    run = core.flows.run(res.id)
    assert run.status == "succeeded" and run.output == out
    assert [(s.slug, s.status, s.attempts) for s in run.steps] == [
        ("step_a", "succeeded", 1),
        ("step_b", "succeeded", 1),
        ("step_c", "succeeded", 1),
        ("step_d", "succeeded", 1),
        ("step_e", "succeeded", 1),
    ]
    assert all(s.started_at and s.finished_at and s.plugin_version == 1 for s in run.steps)


def test_workflow_capability_runs_through_run_capability(core: ModuleType, workers: Any) -> None:
    workers("tests.apps.core", pool="prefork")
    res = core.host.run_capability("run_flow", {"tag": "cap"})
    out = res.get(timeout=60)
    assert out["e"] == 1
    run = core.flows.run(res.id)  # the result id is the run id
    assert run is not None and run.name == "flow" and run.status == "succeeded"
    core.host.disable("run_flow")
    with pytest.raises(CapabilityDisabled):
        core.host.run_capability("run_flow", {})


def _first_queued_task(app: Any, queue: str) -> str:
    """The task name of the message at the head of ``queue`` (put back unacknowledged)."""
    with app.connection_for_write() as conn:
        bound = kombu.Queue(queue, no_declare=True).bind(conn.default_channel)
        message = None
        deadline = time.monotonic() + 10
        while message is None and time.monotonic() < deadline:
            message = bound.get(no_ack=False)
            time.sleep(0.02)
        assert message is not None, f"nothing queued in {queue}"
        message.requeue()
        return str(message.headers["task"])


def test_run_capability_sends_a_workflows_canvas_with_no_capability_task(
    core: ModuleType, workers: Any, app_conf: dict[str, Any]
) -> None:
    """Issue 15 part 3: run_capability on a WorkflowCapability records the run and
    sends the workflow's first step itself; no capability task is queued to be
    replaced (Task.replace) by the canvas."""
    res = core.host.run_capability("run_flow", {"tag": "no-hop"})
    assert _first_queued_task(core.app, app_conf["task_default_queue"]) == "workflows.step.step_a"
    assert core.flows.run(res.id).status == "pending"  # the result id is the run id, recorded at dispatch
    workers("tests.apps.core", pool="prefork")
    assert res.get(timeout=60)["e"] == 1
    assert core.flows.run(res.id).status == "succeeded"


def test_a_workflow_capability_disabled_after_dispatch_fails_its_run_before_any_step(
    core: ModuleType, workers: Any
) -> None:
    """G2 for a run sent without the capability task: its first stage checks the
    capability's plugin and fails the run with the error that task would have."""
    res = core.host.run_capability("run_flow", {"tag": "gated"})  # queued, no worker yet
    core.host.disable("run_flow")  # the live toggle, before any worker took the run
    workers("tests.apps.core", pool="prefork")
    with pytest.raises(CapabilityDisabled, match="^plugin 'run_flow' is disabled$"):
        res.get(timeout=60)
    run = harness.wait_finished(core.flows, res.id)
    assert run.status == "failed" and "plugin 'run_flow' is disabled" in (run.error or "")
    assert [s.status for s in run.steps] == ["failed", "cancelled", "cancelled", "cancelled", "cancelled"]
    assert core.executions_of("step_a", "gated") == 0
    core.host.enable("run_flow")
    assert core.flows.resume(res.id).get(timeout=60)["tag"] == "gated"  # resumable like any failed run


def test_one_stage_workflows_run_through_start_and_run_capability(core: ModuleType, workers: Any) -> None:
    """A workflow of one parallel stage is a chord on its own, one of one step a
    single task: the result id is still the run id and the rows are recorded."""
    workers("tests.apps.core", pool="prefork")
    core.flows.define(core.FAN)
    core.flows.define(core.SINGLE)
    fan = core.host.run_capability("run_fan", {"tag": "fan"})
    single = core.flows.start("single", {"tag": "single"})
    assert fan.get(timeout=60) == {"tag": "fan", "b": 2, "c": 3, "shared": "c"}
    assert single.get(timeout=60) == {"tag": "single", "a": 1, "order": ["a"]}
    for res, slugs in ((fan, ["step_b", "step_c"]), (single, ["step_a"])):
        run = core.flows.run(res.id)
        assert run is not None and run.status == "succeeded" and run.output == res.get()
        assert [(s.slug, s.status, s.attempts) for s in run.steps] == [(slug, "succeeded", 1) for slug in slugs]


def test_outcomes_lost_with_the_workers_database_connections_are_recorded_by_the_next_task(
    core: ModuleType, workers: Any, app_conf: dict[str, Any]
) -> None:
    """Fault (PostgreSQL store): while runs are in their parallel stage (step_b
    sleeps), every other connection to the store database is terminated. A step
    whose outcome write died with its connection says so in the worker log; the task
    that carries the outcome (the merge, then step_d's running mark) records it. Every
    run succeeds and every step row is complete."""
    store_url = app_conf["pluginhost_store"]
    if not store_url.startswith("postgresql"):
        pytest.skip("the fault (terminating the store's connections) needs PostgreSQL")
    worker = workers("tests.apps.core", pool="prefork", concurrency=2)
    results = [core.flows.start("flow", {"tag": f"cut{i}", "b_sleep": 0.8}) for i in range(3)]
    time.sleep(0.4)
    dbname = store_url.rsplit("/", 1)[1].split("?")[0]
    with psycopg.connect(harness.pg_conninfo(dbname), autocommit=True) as admin:
        cut = admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchone()
    assert cut and cut[0] > 0
    outputs = [r.get(timeout=60) for r in results]
    assert all(out["d"] == 4 and out["e"] == 1 for out in outputs)
    for res in results:
        run = core.flows.run(res.id)
        assert run.status == "succeeded", (run.status, run.error)
        assert [(s.slug, s.status) for s in run.steps] == [
            (slug, "succeeded") for slug in ("step_a", "step_b", "step_c", "step_d", "step_e")
        ]
        assert all(s.output and s.finished_at and s.started_at and s.attempts >= 1 for s in run.steps)
    assert "the next task records it" in worker.log_path.read_text(errors="replace")


def test_disabling_a_middle_step_while_runs_are_in_flight(core: ModuleType, workers: Any) -> None:
    workers("tests.apps.core", pool="prefork", concurrency=2)
    flows, host = core.flows, core.host
    # runs that will still be before step_d when it is disabled (step_b sleeps)
    slow = [flows.start("flow", {"tag": f"slow{i}", "b_sleep": 1.5}).id for i in range(2)]
    time.sleep(0.5)
    host.disable("step_d", wait=True)
    fresh = flows.start("flow", {"tag": "fresh"}).id
    done = [harness.wait_finished(flows, i) for i in slow + [fresh]]
    assert all(r.status == "succeeded" for r in done), [
        (r.status, r.error, [(s.slug, s.status) for s in r.steps]) for r in done
    ]
    for run_id in slow + [fresh]:
        st = statuses(flows, run_id)
        assert st["step_d"] == "skipped" and st["step_e"] == "succeeded"
        assert "d" not in flows.run(run_id).output  # the context passed through unchanged
    assert core.executions_of("step_d", "fresh") == 0
    # a run already past the step is unaffected by the toggle
    host.enable("step_d", wait=True)
    past = flows.start("flow", {"tag": "past"})
    past.get(timeout=60)
    host.disable("step_d", wait=True)
    assert statuses(flows, past.id)["step_d"] == "succeeded"


def test_fail_policy_fails_the_run_and_cancels_later_steps(core: ModuleType, workers: Any) -> None:
    workers("tests.apps.core", pool="prefork")
    flows, host = core.flows, core.host
    flows.define(Workflow("strict", steps=[Step("step_a"), Step("step_d", on_disabled="fail"), Step("step_e")]))
    host.disable("step_d", wait=True)
    res = flows.start("strict", {"tag": "strict"})
    with pytest.raises(CapabilityDisabled, match="step 'step_d'"):
        res.get(timeout=60)
    run = harness.wait_finished(flows, res.id)
    assert run.status == "failed" and "plugin 'step_d' is disabled" in run.error
    assert statuses(flows, res.id) == {"step_a": "succeeded", "step_d": "failed", "step_e": "cancelled"}
    assert core.executions_of("step_e", "strict") == 0


def test_retry_then_failure_then_resume(core: ModuleType, workers: Any) -> None:
    workers("tests.apps.core", pool="prefork")
    flows = core.flows
    # step_d fails twice (retries=1 allows two attempts): the run fails
    res = flows.start("flow", {"tag": "resume", "d_fail_until": 2})
    with pytest.raises(ValueError, match="not ready"):
        res.get(timeout=60)
    run = harness.wait_finished(flows, res.id)
    st = {s.slug: (s.status, s.attempts) for s in run.steps}
    assert st["step_d"] == ("failed", 2) and st["step_e"] == ("cancelled", 0)
    assert run.status == "failed" and "ValueError: step_d is not ready yet" in run.error
    # the third attempt succeeds: resume continues from step_d with the saved context
    out = flows.resume(res.id).get(timeout=60)
    assert out["d"] == 4 and out["a"] == 1 and out["shared"] == "c"
    run = flows.run(res.id)
    assert run.status == "succeeded"
    assert [s.status for s in run.steps] == ["succeeded"] * 5
    assert core.executions_of("step_a", "resume") == 1  # finished steps did not run again
    assert core.executions_of("step_d", "resume") == 3


def test_resume_rejects_unknown_and_unfinished_runs(core: ModuleType) -> None:
    with pytest.raises(WorkflowNotFound):
        core.flows.resume("no-such-run")
    run_id, _canvas = core.flows.prepare("flow", {})  # recorded, never sent
    with pytest.raises(InvalidRunState, match="pending"):
        core.flows.resume(run_id)


def test_a_definition_edit_applies_to_new_runs_only(core: ModuleType, workers: Any) -> None:
    workers("tests.apps.core", pool="prefork", concurrency=2)
    flows = core.flows
    old = flows.start("flow", {"tag": "v1", "b_sleep": 1.0})
    time.sleep(0.3)
    v2 = flows.define(Workflow("flow", steps=[Step("step_a"), Step("step_e")]))
    assert v2 == 2 and flows.version("flow") == 2
    new = flows.start("flow", {"tag": "v2"})
    assert set(new.get(timeout=60)) >= {"a", "e"}
    assert "d" in old.get(timeout=60)  # the running run finished on version 1
    assert flows.run(old.id).version == 1 and flows.run(new.id).version == 2
    assert [s.slug for s in flows.run(new.id).steps] == ["step_a", "step_e"]


@pytest.mark.parametrize("backend", ["embedded"], indirect=True)
@pytest.mark.parametrize(
    "definition, fragment",
    [
        ({"name": "x", "steps": []}, "at least 1"),
        ({"name": "Bad Name", "steps": [{"slug": "step_a"}]}, "workflow name"),
        ({"name": "x", "steps": [{"slug": "step_a"}, {"slug": "step_a"}]}, "more than once"),
        ({"name": "x", "steps": [{"slug": "nope"}]}, "not a declared capability"),
        ({"name": "x", "steps": [{"steps": []}]}, "at least 1"),
        ({"name": "x", "steps": [{"slug": "step_a", "retries": -1}]}, "greater than or equal"),
        ("{not json", "Invalid JSON"),
        ({"name": "x", "steps": [{"slug": "step_a", "surprise": 1}]}, "Extra inputs"),
    ],
)
def test_bad_definitions_are_rejected_and_nothing_is_stored(core: ModuleType, definition: Any, fragment: str) -> None:
    before = [(w.name, core.flows.version(w.name)) for w in core.flows.list()]
    with pytest.raises(InvalidWorkflow, match=fragment):
        core.flows.define(definition)
    assert [(w.name, core.flows.version(w.name)) for w in core.flows.list()] == before


@pytest.mark.parametrize("backend", ["embedded"], indirect=True)
def test_start_rejects_unknown_workflows_and_bad_input(core: ModuleType) -> None:
    with pytest.raises(WorkflowNotFound):
        core.flows.start("ghost", {})
    with pytest.raises(InvalidInput):
        core.flows.start("flow", [1, 2])  # type: ignore[arg-type]
    assert core.flows.runs() == []


@pytest.mark.parametrize("backend", ["embedded"], indirect=True)
def test_plan_is_a_dry_run_under_current_toggles(core: ModuleType) -> None:
    core.flows.define(
        Workflow("planned", steps=[Step("step_a"), Parallel(Step("step_b"), Step("step_c", on_disabled="fail"))])
    )
    core.host.disable("step_c")
    plan = {p.slug: p.outcome for p in core.flows.plan("planned")}
    assert plan == {"step_a": "run", "step_b": "run", "step_c": "fail"}


@pytest.mark.parametrize("backend", ["embedded", "redis"], indirect=True)
def test_a_definition_stored_again_after_the_tables_were_emptied_is_read_anew(
    core: ModuleType, empty_store: Any
) -> None:
    """Definitions are parsed once per stored version; a store emptied and defined
    again (same name, same version number, other steps) is not served from that cache."""
    core.flows.define(Workflow("renewed", steps=[Step("step_a"), Step("step_b")]))
    assert [p.slug for p in core.flows.plan("renewed")] == ["step_a", "step_b"]
    empty_store()
    assert core.flows.define(Workflow("renewed", steps=[Step("step_c")])) == 1
    assert [p.slug for p in core.flows.plan("renewed")] == ["step_c"]
