"""The step outcome a task carries to the next one (workflows/store/outcome.py):
it crosses processes, and during a rolling upgrade it crosses releases."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

import pytest
from celery import Celery

from pluginhost import InvalidArgument, PluginHost
from workflows import Workflows
from workflows.errors import UnreadableOutcome
from workflows.store.outcome import CARRIED, Outcome, branch_result, carrying, read_branch, unwrap

AT = datetime(2026, 12, 3, 8, 0, 1, 250000, tzinfo=timezone.utc)
OUTCOME = Outcome(2, "skipped", None, "plugin 'c' is disabled", None, AT)


@pytest.mark.parametrize("fmt", [1, 2])
def test_an_outcome_survives_the_json_round_trip_in_either_format(fmt: int) -> None:
    sent = json.loads(json.dumps(carrying({"user": "ana"}, [OUTCOME], fmt)))
    assert sent[0] == CARRIED
    assert isinstance(sent[2][0], list if fmt == 1 else dict)
    assert unwrap(sent) == ({"user": "ana"}, [OUTCOME])
    branch = json.loads(json.dumps(branch_result(2, {}, {"user": "ana"}, OUTCOME, fmt)))
    assert read_branch(branch) == (2, {}, {"user": "ana"}, OUTCOME)


def test_what_the_previous_release_sent_is_read() -> None:
    # format 1, exactly as 0.1 workers wrote it, and a branch result from before outcomes were carried
    old = [CARRIED, {"a": 1}, [[0, "succeeded", {"a": 1}, None, 4, "2026-12-01T10:00:00.123456+00:00"]]]
    context, (outcome,) = unwrap(old)
    assert (context, outcome.position, outcome.plugin_version, outcome.finished_at.microsecond) == (
        {"a": 1},
        0,
        4,
        123456,
    )
    assert read_branch([1, {"b": 2}, {"a": 1}]) == (1, {"b": 2}, {"a": 1}, None)
    assert unwrap({"plain": "context"}) == ({"plain": "context"}, [])


@pytest.mark.parametrize(
    "wire",
    [
        {"v": 3, "position": 0},  # a newer release
        {"v": 2, "position": 0, "status": "succeeded"},  # fields missing
        [0, "succeeded", None, None, None, "not a time"],
        "0,succeeded",
    ],
)
def test_an_outcome_that_cannot_be_read_is_a_clear_error(wire: Any) -> None:
    with pytest.raises(UnreadableOutcome, match="carried step outcome"):
        unwrap([CARRIED, {}, [wire]])


@pytest.mark.parametrize("value, expected", [(None, 2), (1, 1), (2, 2)])
def test_the_format_setting_is_read_and_checked(value: Any, expected: int, tmp_path: Any) -> None:
    app = Celery("fmt", set_as_current=False)
    app.conf.update(pluginhost_store=f"sqlite:///{tmp_path / 'fmt.db'}")
    if value is not None:
        app.conf.pluginhost_workflows_outcome_format = value
    flows = Workflows(PluginHost(app))
    assert flows.runtime.outcome_format == expected
    app.conf.pluginhost_workflows_outcome_format = 3
    with pytest.raises(InvalidArgument, match="pluginhost_workflows_outcome_format"):
        _ = flows.runtime.outcome_format
