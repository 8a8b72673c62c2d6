"""Operating workflow runs from the console: start a run from a form built from the
workflow's input model (or a JSON box without one), cancel a run, signal a waiting
run, and a plan row's condition and reason; through the JSON API and the pages."""

from __future__ import annotations

import re
from types import ModuleType

import pytest
from fastapi.testclient import TestClient

from pluginhost_web import create_app
from tests import test_web
from tests.test_web import AUTH, BEARER, Operator

#: test_web's fixtures: the web test app on an embedded broker and store, and a logged-in operator.
web, ops = test_web.web, test_web.ops


def run_ids(module: ModuleType) -> list[str]:
    return [r.id for r in module.flows.runs(limit=1000)]


def failed_run(module: ModuleType) -> str:
    """A run that ended (failed at its first step), without a worker."""
    run_id, _canvas = module.flows.prepare("welcome", {"name": "Ada"})
    module.flows.store.fail_run(run_id, 0, "RuntimeError: boom")
    return run_id


# -- start -------------------------------------------------------------------------


def test_starting_a_run_from_the_api_returns_its_id(web: ModuleType, ops: Operator) -> None:
    started = ops.post("/api/workflows/welcome/runs", json={"input": {"name": "Ada", "age": 36}})
    assert started.status_code == 200, started.text
    run_id = started.json()["run_id"]
    assert run_ids(web) == [run_id]
    run = web.flows.run(run_id)
    assert (run.name, run.input) == ("welcome", {"name": "Ada", "age": 36})


@pytest.mark.parametrize(
    "body, detail",
    [
        ({"input": {"age": 36}}, "workflow 'welcome' input: field 'name' is required"),
        ({"input": {"name": "Ada", "age": "old"}}, "workflow 'welcome' input: field 'age'"),
        ({"input": {"name": "Ada", "plan": "gold"}}, "workflow 'welcome' input: field 'plan'"),
        ({"input": [1, 2]}, "input"),
        ({}, "input"),
    ],
)
def test_bad_start_input_is_422_with_a_message_and_starts_nothing(
    web: ModuleType, ops: Operator, body: dict[str, object], detail: str
) -> None:
    response = ops.post("/api/workflows/welcome/runs", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["error"] == "InvalidInput" and detail in response.json()["detail"]
    assert run_ids(web) == []


def test_starting_needs_a_login_and_the_csrf_token(web: ModuleType, ops: Operator) -> None:
    anonymous = TestClient(ops.client.app)
    assert anonymous.post("/api/workflows/welcome/runs", json={"input": {"name": "A"}}).status_code == 401
    assert ops.client.post("/api/workflows/welcome/runs", json={"input": {"name": "A"}}).status_code == 403
    assert run_ids(web) == []
    scripted = anonymous.post("/api/workflows/welcome/runs", json={"input": {"name": "A"}}, headers=BEARER)
    assert scripted.status_code == 200 and run_ids(web) == [scripted.json()["run_id"]]
    unknown = ops.post("/api/workflows/nope/runs", json={"input": {}})
    assert unknown.status_code == 404 and unknown.json()["error"] == "WorkflowNotFound"


def test_the_workflow_page_has_a_form_built_from_the_input_model(web: ModuleType, ops: Operator) -> None:
    html = ops.get("/workflows/welcome").text
    form = html[html.index('<form class="start"') :]
    form = form[: form.index("</form>")]
    assert re.search(r'<input type="text" name="field.name"[^>]* required', form)
    assert '<input type="number" name="field.age" step="1"' in form
    assert '<input type="number" name="field.score" step="any"' in form
    assert '<select name="field.plan"' in form and '<option value="pro">pro</option>' in form
    assert '<input type="checkbox" name="field.newsletter"' in form
    assert '<textarea name="field.tags"' in form  # a list: JSON
    assert 'href="/workflows/welcome"' in ops.get("/workflows").text


def test_the_start_form_starts_a_run_and_leads_to_its_page(web: ModuleType, ops: Operator) -> None:
    fields = {"field.name": "Ada", "field.age": "36", "field.score": "", "field.plan": "pro", "field.tags": '["x"]'}
    response = ops.form("/workflows/welcome/runs", {**fields, "field.newsletter": "on"}, follow_redirects=False)
    assert response.status_code == 303, response.text
    [run_id] = run_ids(web)
    assert response.headers["location"] == f"/runs/{run_id}"
    assert web.flows.run(run_id).input == {"name": "Ada", "age": 36, "plan": "pro", "newsletter": True, "tags": ["x"]}
    assert f"Started run {run_id}" in ops.get(f"/runs/{run_id}").text


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"field.name": "Ada", "field.age": "old"}, "field &#39;age&#39; must be an integer, got &#39;old&#39;"),
        ({"field.name": "Ada", "field.score": "high"}, "field &#39;score&#39; must be a number, got &#39;high&#39;"),
        ({"field.name": "Ada", "field.tags": "[x"}, "field &#39;tags&#39; is not valid JSON"),
        ({"field.name": "Ada", "field.tags": '"x"'}, "field &#39;tags&#39;"),
        ({"field.name": "Ada", "field.plan": "gold"}, "field &#39;plan&#39;"),
        ({"field.name": ""}, "field &#39;name&#39; is required"),
    ],
)
def test_a_bad_start_form_shows_the_error_keeps_the_values_and_starts_nothing(
    web: ModuleType, ops: Operator, fields: dict[str, str], message: str
) -> None:
    response = ops.form("/workflows/welcome/runs", fields, follow_redirects=False)
    assert response.status_code == 422, response.text
    assert 'role="alert"' in response.text and message in response.text
    assert 'value="Ada"' in response.text or fields["field.name"] == ""  # what was typed is kept
    assert run_ids(web) == []


def test_a_workflow_without_an_input_model_takes_a_json_object(web: ModuleType, ops: Operator) -> None:
    web.flows.define({"name": "plain", "steps": [{"slug": "report"}]})
    html = ops.get("/workflows/plain").text
    assert '<textarea name="input"' in html and 'name="field.' not in html
    for text, message in (("{nope", "is not valid JSON"), ("[1]", "expected a JSON object")):
        refused = ops.form("/workflows/plain/runs", {"input": text})
        assert refused.status_code == 422 and message in refused.text, refused.text
        assert run_ids(web) == []
    started = ops.form("/workflows/plain/runs", {"input": '{"x": 1}'}, follow_redirects=False)
    assert started.status_code == 303
    [run_id] = run_ids(web)
    assert web.flows.run(run_id).input == {"x": 1}
    assert ops.post("/api/workflows/plain/runs", json={"input": {"any": ["thing"]}}).status_code == 200


# -- cancel ------------------------------------------------------------------------


def test_cancel_from_the_api_records_the_user_and_is_idempotent(web: ModuleType, ops: Operator) -> None:
    run_id, _canvas = web.flows.prepare("welcome", {"name": "Ada"})
    cancelled = ops.post(f"/api/runs/{run_id}/cancel", json={"terminate": False})
    assert cancelled.status_code == 200, cancelled.text
    body = cancelled.json()
    assert (body["id"], body["status"], body["cancelled_by"]) == (run_id, "cancelled", "ops")
    assert {s["status"] for s in body["steps"]} == {"cancelled"}
    again = ops.post(f"/api/runs/{run_id}/cancel", json={"terminate": True})
    assert again.status_code == 200 and again.json()["cancelled_by"] == "ops"
    assert ops.get("/api/runs?status=cancelled").json()[0]["id"] == run_id


def test_cancel_needs_a_login_and_the_csrf_token_and_cancels_nothing_without(web: ModuleType, ops: Operator) -> None:
    run_id, _canvas = web.flows.prepare("welcome", {"name": "Ada"})
    assert TestClient(ops.client.app).post(f"/api/runs/{run_id}/cancel", json={}).status_code == 401
    assert ops.client.post(f"/api/runs/{run_id}/cancel", json={}).status_code == 403
    assert ops.client.post(f"/runs/{run_id}/cancel", data={"csrf_token": "guess"}).status_code == 403
    assert web.flows.run(run_id).status == "pending"
    bad = ops.post(f"/api/runs/{run_id}/cancel", json={"terminate": "maybe"})
    assert bad.status_code == 422 and bad.json()["error"] == "InvalidInput"
    assert web.flows.run(run_id).status == "pending"


def test_cancel_of_a_finished_run_is_409_and_of_an_unknown_one_404(web: ModuleType, ops: Operator) -> None:
    run_id = failed_run(web)
    finished = ops.post(f"/api/runs/{run_id}/cancel", json={})
    assert finished.status_code == 409, finished.text
    assert finished.json()["error"] == "RunAlreadyFinished"
    assert re.search(r"is failed; only .* runs can be cancelled", finished.json()["detail"])
    assert web.flows.run(run_id).status == "failed"
    unknown = ops.post("/api/runs/no-such-run/cancel", json={})
    assert unknown.status_code == 404 and unknown.json()["error"] == "WorkflowNotFound"


def test_the_run_page_cancels_after_a_confirmation(web: ModuleType, ops: Operator) -> None:
    run_id, _canvas = web.flows.prepare("welcome", {"name": "Ada"})
    page = ops.get(f"/runs/{run_id}").text
    assert f'href="/runs/{run_id}/cancel"' in page
    confirm = ops.get(f"/runs/{run_id}/cancel").text
    assert f'action="/runs/{run_id}/cancel"' in confirm and 'name="terminate"' in confirm
    assert re.search(r"pending: 4\s+steps have not finished", confirm)
    assert web.flows.run(run_id).status == "pending"  # asking changes nothing
    done = ops.form(f"/runs/{run_id}/cancel", {"terminate": "true"}, follow_redirects=False)
    assert done.status_code == 303 and done.headers["location"] == f"/runs/{run_id}"
    shown = ops.get(f"/runs/{run_id}").text
    assert f"Cancelled run {run_id}" in shown and 'id="run-status">cancelled<' in shown
    assert f'href="/runs/{run_id}/cancel"' not in shown  # a finished run offers no cancel
    assert web.flows.run(run_id).cancelled_by == "ops"
    assert f'href="/runs/{failed_run(web)}/cancel"' not in ops.get(f"/runs/{failed_run(web)}").text


# -- signal ------------------------------------------------------------------------


def test_signal_from_the_api_needs_the_csrf_token_and_maps_errors(web: ModuleType, ops: Operator) -> None:
    run_id, _canvas = web.flows.prepare("welcome", {"name": "Ada"})
    assert ops.client.post(f"/api/runs/{run_id}/signal", json={"name": "approved"}).status_code == 403
    unknown = ops.post("/api/runs/no-such-run/signal", json={"name": "approved", "payload": {}})
    assert unknown.status_code == 404
    bad = ops.post(f"/api/runs/{run_id}/signal", json={"name": "approved", "payload": [1]})
    assert bad.status_code == 422 and bad.json()["error"] == "InvalidInput"
    refused = ops.post(f"/api/runs/{run_id}/signal", json={"name": "not waited for", "payload": {}})
    assert refused.status_code == 422 and refused.json()["error"] == "InvalidSignal", refused.text


def test_a_signal_from_the_api_is_kept_for_the_runs_wait_with_who_sent_it(web: ModuleType, ops: Operator) -> None:
    web.flows.define({"name": "approval", "steps": [{"slug": "greet"}, {"type": "wait", "signal": "approved"}]})
    run_id, _canvas = web.flows.prepare("approval", {})  # not at its wait yet: the signal is kept
    sent = ops.post(f"/api/runs/{run_id}/signal", json={"name": "approved", "payload": {"by": "cfo"}})
    assert sent.status_code == 200, sent.text
    (kept,) = web.flows.run(run_id).signals
    assert (kept.name, kept.payload_keys, kept.consumed_at) == ("approved", ["by"], None)
    assert kept.actor == "ops"
    again = ops.post(f"/api/runs/{run_id}/signal", json={"name": "approved", "payload": {}})
    assert again.status_code == 422 and again.json()["error"] == "InvalidSignal"


def test_the_signal_form_shows_only_on_a_waiting_run(web: ModuleType, ops: Operator) -> None:
    run_id, _canvas = web.flows.prepare("welcome", {"name": "Ada"})
    assert 'class="signal"' not in ops.get(f"/runs/{run_id}").text  # pending: nothing to signal


def test_the_signal_page_form_rejects_a_payload_that_is_not_a_json_object(web: ModuleType, ops: Operator) -> None:
    run_id, _canvas = web.flows.prepare("welcome", {"name": "Ada"})
    refused = ops.form(f"/runs/{run_id}/signal", {"name": "approved", "payload": "[1]"})
    assert refused.status_code == 422 and "expected a JSON object" in refused.text


# -- plan --------------------------------------------------------------------------


def test_a_plan_row_shows_the_steps_condition_and_why_it_would_not_run(web: ModuleType, ops: Operator) -> None:
    web.flows.define({"name": "gated", "steps": [{"slug": "greet", "when": "plan == 'pro'"}, {"slug": "report"}]})
    web.host.disable("report")
    plan = ops.get("/api/workflows/gated/plan").json()
    assert [(s["slug"], s["when"], s["reason"]) for s in plan] == [
        ("greet", "plan == 'pro'", None),
        ("report", None, "plugin 'report' is disabled"),
    ]
    html = ops.get("/workflows/gated").text
    assert '<td class="when" data-label="When"><code>plan == &#39;pro&#39;</code></td>' in html
    assert '<td class="reason" data-label="Why">plugin &#39;report&#39; is disabled</td>' in html
    assert "plugin &#39;report&#39; is disabled" in ops.get("/workflows").text


def test_the_workflow_page_answers_json_and_404s_an_unknown_name(web: ModuleType, ops: Operator) -> None:
    as_json = ops.get("/workflows/welcome", headers={"Accept": "application/json"})
    assert as_json.json() == ops.get("/api/workflows/welcome").json()
    assert ops.get("/workflows/nope").status_code == 404
    run_id, _canvas = web.flows.prepare("welcome", {"name": "Ada"})
    confirm = ops.get(f"/runs/{run_id}/cancel", headers={"Accept": "application/json"})
    assert confirm.json() == ops.get(f"/api/runs/{run_id}").json()
    assert web.flows.run(run_id).status == "pending"


def test_a_console_without_workflows_has_no_run_operations(web: ModuleType) -> None:
    client = TestClient(create_app(web.host, auth=AUTH))
    assert client.post("/api/workflows/welcome/runs", json={"input": {}}, headers=BEARER).status_code == 404
    assert client.post("/api/runs/x/cancel", json={}, headers=BEARER).status_code == 404
