"""Step conditions (``Step(..., when="plan == 'pro'")``, CEL over the context):
checked when a workflow is defined, evaluated by the worker on the context the
step receives, shown by ``plan``."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import pytest

from workflows import Parallel, Step, Workflow
from workflows.errors import ConditionFailed, InvalidWorkflow

COND = Workflow(
    "cond",
    steps=[
        Step("step_a"),
        Parallel(Step("step_b", when="plan == 'pro'"), Step("step_c", when="a == 1 && seats > 10")),
        Step("step_d", when="'b' in order || plan != 'pro'"),
    ],
)


def test_a_condition_that_does_not_parse_is_refused_at_define_naming_the_step() -> None:
    with pytest.raises(InvalidWorkflow, match=r"step 'step_b': condition 'plan ==' does not parse at column 6"):
        Step("step_b", when="plan ==")
    bad = {"name": "x", "steps": [{"slug": "a"}, {"slug": "b", "when": "plan == 'pro' &&"}]}
    with pytest.raises(InvalidWorkflow, match=r"at 'steps\[1\]'.*step 'b': condition"):
        Workflow.parse(bad)
    assert Workflow.parse(COND.model_dump_json()) == COND  # the condition survives JSON


def test_plan_shows_which_steps_an_input_would_run(core: ModuleType) -> None:
    core.flows.define(COND)
    by_slug = {p.slug: p for p in core.flows.plan("cond", {"plan": "free", "seats": 20})}
    assert (by_slug["step_a"].outcome, by_slug["step_a"].reason) == ("run", None)
    assert (by_slug["step_b"].outcome, by_slug["step_b"].reason) == ("skip", "condition false")
    # 'a' comes from step_a: the input alone cannot tell
    assert by_slug["step_c"].outcome == "depends" and "undeclared reference to 'a'" in str(by_slug["step_c"].reason)
    # 'order' comes from step_a, but CEL's || is true when either side is, whatever the other
    assert by_slug["step_d"].outcome == "run"
    assert [p.outcome for p in core.flows.plan("cond")] == ["run"] * 4  # no input: toggles only


@pytest.mark.parametrize("backend", ["embedded", "redis"], indirect=True)
def test_a_false_condition_skips_its_step_and_a_true_one_runs_it(core: ModuleType, workers: Any) -> None:
    workers("tests.apps.core", pool="prefork")
    core.flows.define(COND)
    pro = core.flows.start("cond", {"tag": "pro", "plan": "pro", "seats": 3})
    free = core.flows.start("cond", {"tag": "free", "plan": "free", "seats": 30})
    assert pro.get(timeout=60)["b"] == 2
    out = free.get(timeout=60)
    assert "b" not in out and out["c"] == 3 and out["d"] == 4
    rows = {
        tag: {s.slug: (s.status, s.error) for s in core.flows.run(r.id).steps}
        for tag, r in (("pro", pro), ("free", free))
    }
    assert rows["pro"] == {
        "step_a": ("succeeded", None),
        "step_b": ("succeeded", None),
        "step_c": ("skipped", "condition false"),
        "step_d": ("skipped", "condition false"),  # step_b adds no 'b' to order, and the plan is pro
    }
    assert rows["free"]["step_b"] == ("skipped", "condition false") and rows["free"]["step_c"][0] == "succeeded"
    assert core.executions_of("step_b", "free") == 0 and core.executions_of("step_c", "pro") == 0


@pytest.mark.parametrize("backend", ["redis"], indirect=True)
def test_a_condition_that_cannot_be_evaluated_fails_the_run_without_retrying(core: ModuleType, workers: Any) -> None:
    workers("tests.apps.core", pool="prefork")
    core.flows.define(COND)
    res = core.flows.start("cond", {"tag": "noplan", "seats": 30})  # step_b's 'plan' is missing
    with pytest.raises(ConditionFailed, match="undeclared reference to 'plan'"):
        res.get(timeout=60)
    run = core.flows.run(res.id)
    steps = {s.slug: s for s in run.steps}
    assert run.status == "failed" and (steps["step_b"].status, steps["step_b"].attempts) == ("failed", 1)
    assert steps["step_b"].error.startswith("ConditionFailed: condition \"plan == 'pro'\"")
    assert steps["step_d"].status == "cancelled"
