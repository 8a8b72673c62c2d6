"""A run's timeline (steps, waits and signals in time order) and the runs that
sleep or wait now, with their wake-up time or awaited signal; through the JSON API
and the pages. No worker: waits are reached through the store, as a worker would."""

from __future__ import annotations

import re
import time
from types import ModuleType
from typing import Any

from tests import test_web
from tests.test_web import Operator

#: test_web's fixtures: the web test app on an embedded broker and store, and a logged-in operator.
web, ops = test_web.web, test_web.ops

NAP = {"name": "nap", "steps": [{"slug": "greet"}, {"type": "sleep", "duration": "2m"}, {"slug": "report"}]}
APPROVAL = {
    "name": "approval",
    "steps": [{"slug": "greet"}, {"type": "wait", "signal": "approved", "timeout": "3d"}, {"slug": "report"}],
}


def reach(module: ModuleType, run_id: str, stage: int, **wait: Any) -> None:
    """The run stops at its wait ``stage``, as the worker's wait task records it."""
    options: dict[str, Any] = {"kind": "sleep", "signal": None, "on_timeout": None, "seconds": 120.0}
    module.flows.waits.reach(run_id, stage, context={}, carried=[], **{**options, **wait})


def sleeping_run(module: ModuleType) -> str:
    module.flows.define(NAP)
    run_id, _canvas = module.flows.prepare("nap", {})
    reach(module, run_id, 1)
    return run_id


def waiting_run(module: ModuleType) -> str:
    module.flows.define(APPROVAL)
    run_id, _canvas = module.flows.prepare("approval", {})
    reach(module, run_id, 1, kind="signal", signal="approved", on_timeout="fail", seconds=3 * 86400.0)
    return run_id


def texts(body: dict[str, Any]) -> list[tuple[str, str]]:
    return [(e["kind"], e["text"]) for e in body["timeline"]]


def test_a_sleeping_runs_timeline_says_until_when_it_sleeps(web: ModuleType, ops: Operator) -> None:
    run_id = sleeping_run(web)
    body = ops.get(f"/api/runs/{run_id}").json()
    assert body["status"] == "sleeping"
    (wait,) = body["waits"]
    assert (wait["stage"], wait["kind"], wait["status"], wait["label"]) == (1, "sleep", "waiting", "sleep 2m")
    assert wait["duration_s"] == 120.0 and wait["wake_at"] is not None
    kinds = [kind for kind, _ in texts(body)]
    assert kinds == ["created", "sleep"]
    assert texts(body)[1][1].startswith("sleeping until ")
    ats = [e["at"] for e in body["timeline"]]
    assert ats == sorted(ats)
    html = ops.get(f"/runs/{run_id}").text
    assert 'class="timeline"' in html and "sleeping until" in html


def test_a_signal_on_the_timeline_names_its_sender_and_payload_keys(web: ModuleType, ops: Operator) -> None:
    run_id = waiting_run(web)
    waiting = texts(ops.get(f"/api/runs/{run_id}").json())
    assert ("wait", "waiting for signal approved (timeout 3d, then fail)") in waiting
    web.flows.signal(run_id, "approved", {"by": "cfo", "amount": 3}, actor="ops")
    body = ops.get(f"/api/runs/{run_id}").json()
    (signal,) = body["signals"]
    assert (signal["name"], signal["payload_keys"], signal["actor"]) == ("approved", ["amount", "by"], "ops")
    assert ("signal", "signal approved received from ops with keys amount, by") in texts(body)
    html = ops.get(f"/runs/{run_id}").text
    assert "signal approved received from ops with keys amount, by" in html


def test_a_cancelled_waiting_run_says_who_cancelled_it(web: ModuleType, ops: Operator) -> None:
    run_id = waiting_run(web)
    assert ops.post(f"/api/runs/{run_id}/cancel", json={}).status_code == 200
    body = ops.get(f"/api/runs/{run_id}").json()
    assert body["cancelled_by"] == "ops"
    last = body["timeline"][-1]
    assert last["kind"] == "cancelled" and last["text"].startswith("cancelled by ops at ")
    assert [w["status"] for w in body["waits"]] == ["cancelled"]
    assert ops.get("/api/runs?status=cancelled").json()[0]["id"] == run_id


def test_a_timeline_lists_steps_and_a_pending_wait_is_not_reached(web: ModuleType, ops: Operator) -> None:
    web.flows.define(NAP)
    run_id, _canvas = web.flows.prepare("nap", {})
    web.flows.store.fail_run(run_id, 0, "RuntimeError: boom")
    body = ops.get(f"/api/runs/{run_id}").json()
    assert [w["status"] for w in body["waits"]] == ["pending"]
    assert body["timeline"][0]["kind"] == "created" and body["timeline"][-1]["kind"] == "failed"
    assert "RuntimeError: boom" in body["timeline"][-1]["text"]


def test_runs_filter_by_sleeping_and_waiting_and_show_what_they_wait_for(web: ModuleType, ops: Operator) -> None:
    asleep, waits = sleeping_run(web), waiting_run(web)
    (sleeping,) = ops.get("/api/runs?status=sleeping").json()
    assert sleeping["id"] == asleep and sleeping["wait"]["label"] == "sleep 2m"
    (waiting,) = ops.get("/api/runs?status=waiting").json()
    assert waiting["id"] == waits and waiting["wait"]["signal"] == "approved"
    assert waiting["wait"]["wake_at"] is not None
    html = ops.get("/runs?status=waiting").text
    assert f'data-run="{waits}"' in html and f'data-run="{asleep}"' not in html
    assert "signal approved" in html and "times out" in html
    assert "wakes" in ops.get("/runs").text


def test_the_waiting_page_lists_waits_soonest_due_first(web: ModuleType, ops: Operator) -> None:
    asleep, waits = sleeping_run(web), waiting_run(web)
    rows = ops.get("/api/waiting").json()
    assert [(r["run_id"], r["name"], r["wait"]["kind"]) for r in rows] == [
        (asleep, "nap", "sleep"),
        (waits, "approval", "signal"),
    ]
    html = ops.get("/waiting").text
    assert f'href="/runs/{asleep}"' in html and f'href="/runs/{waits}"' in html
    assert "sleep 2m" in html and "wait for approved" in html
    assert ops.get("/waiting", headers={"Accept": "application/json"}).json() == rows
    assert 'href="/waiting"' in ops.get("/runs").text  # in the console's sections


def test_diagrams_draw_sleep_and_wait_stages(web: ModuleType, ops: Operator) -> None:
    run_id = sleeping_run(web)
    svg = ops.get(f"/api/runs/{run_id}/diagram.svg")
    assert svg.status_code == 200
    assert 'data-slug="sleep 2m"' in svg.text and 'data-state="sleeping"' in svg.text
    web.flows.define(APPROVAL)
    plan = ops.get("/api/workflows/approval/diagram.svg")
    assert plan.status_code == 200 and 'data-slug="wait for approved"' in plan.text
    assert ops.get("/workflows/approval").status_code == 200
    assert ops.get("/workflows").status_code == 200


def test_the_signal_form_of_a_waiting_run_names_the_awaited_signal(web: ModuleType, ops: Operator) -> None:
    html = ops.get(f"/runs/{waiting_run(web)}").text
    assert '<input type="text" name="name" required value="approved">' in html


def test_a_slept_wait_says_until_when_and_when_the_run_woke(web: ModuleType, ops: Operator) -> None:
    web.flows.define(NAP)
    run_id, _canvas = web.flows.prepare("nap", {})
    reach(web, run_id, 1, seconds=0.001)
    time.sleep(0.01)
    assert web.flows.waiting.wake_due("test-waker", run_id=run_id, stage=1) == 1  # what a worker's waker does
    body = ops.get(f"/api/runs/{run_id}").json()
    (wait,) = body["waits"]
    assert (wait["status"], wait["outcome"], wait["claimed_by"]) == ("done", "slept", "test-waker")
    (slept,) = [text for kind, text in texts(body) if kind == "sleep"]
    assert re.fullmatch(r"slept until [-\d: ]+ UTC, woke at [-\d: ]+ UTC", slept), slept
    assert body["wait"] is None  # sent on: no longer stopped at it


def test_a_timed_out_wait_is_on_the_timeline_with_what_followed(web: ModuleType, ops: Operator) -> None:
    web.flows.define({**APPROVAL, "steps": [{"slug": "greet"}, {"type": "wait", "signal": "approved", "timeout": 1}]})
    run_id, _canvas = web.flows.prepare("approval", {})
    reach(web, run_id, 1, kind="signal", signal="approved", on_timeout="fail", seconds=0.001)
    time.sleep(0.01)
    web.flows.waiting.wake_due("test-waker", run_id=run_id, stage=1)
    body = ops.get(f"/api/runs/{run_id}").json()
    assert body["status"] == "failed"
    assert ("wait", "waited for signal approved (timeout 1s, then fail)") in texts(body)
    assert ("timed_out", "timed out waiting for signal approved, then fail") in texts(body)
    assert body["timeline"][-1]["kind"] == "failed"
    svg = ops.get(f"/api/runs/{run_id}/diagram.svg").text
    assert 'data-slug="wait for approved" data-state="timed_out"' in svg


def test_a_signal_sent_before_the_wait_makes_the_wait_received_and_due(web: ModuleType, ops: Operator) -> None:
    web.flows.define(APPROVAL)
    run_id, _canvas = web.flows.prepare("approval", {})
    web.flows.signal(run_id, "approved", {}, actor="cfo")  # kept: the run has not reached its wait
    reach(web, run_id, 1, kind="signal", signal="approved", on_timeout="fail", seconds=3 * 86400.0)
    assert texts(ops.get(f"/api/runs/{run_id}").json())[1:] == [
        ("signal", "signal approved received from cfo with no payload"),
        ("wait", "waited for signal approved (timeout 3d, then fail): received, due now"),
    ]
    (row,) = ops.get("/api/waiting").json()
    assert row["wait"]["outcome"] == "received"
    assert "signal received" in ops.get("/waiting").text
