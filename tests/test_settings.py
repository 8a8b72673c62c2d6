"""Settings: one table (pluginhost/settings.py) that the README shows, units in the
names, former names still read, bad values refused when read."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from celery import Celery

from pluginhost import InvalidArgument
from pluginhost.settings import SETTINGS, value

ROOT = Path(__file__).resolve().parents[1]


def _app(**conf: object) -> Celery:
    app = Celery("settings", broker="memory://")
    app.conf.update(conf)
    return app


def test_the_readme_table_lists_every_setting_with_its_default() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\| `(pluginhost_[a-z_]+)` \| ([^|]+) \|", readme, flags=re.M))
    assert set(rows) == {s.name for s in SETTINGS}
    for s in SETTINGS:
        shown = "-" if s.default is None else f"`{s.default!r}`" if not isinstance(s.default, str) else f"`{s.default}`"
        assert rows[s.name].strip() == shown, s.name


def test_every_setting_has_the_one_prefix_and_durations_say_seconds() -> None:
    for s in SETTINGS:
        assert s.name.startswith("pluginhost_"), s.name
        if s.number:
            assert s.name.endswith("_s"), s.name


def test_a_former_name_is_still_read_and_the_new_one_wins() -> None:
    assert value(_app(), "pluginhost_poll_interval_s") == 2.0
    assert value(_app(pluginhost_poll_interval=0.5), "pluginhost_poll_interval_s") == 0.5
    both = _app(pluginhost_poll_interval=0.5, pluginhost_poll_interval_s=0.25)
    assert value(both, "pluginhost_poll_interval_s") == 0.25
    assert value(_app(workflows_synchronous_commit=False), "pluginhost_workflows_synchronous_commit") is False


@pytest.mark.parametrize("bad", [0, -1, "soon", float("nan"), float("inf"), True])
def test_a_duration_that_is_not_a_positive_number_is_invalid(bad: object) -> None:
    with pytest.raises(InvalidArgument, match="pluginhost_defer_interval_s must be a number of seconds > 0"):
        value(_app(pluginhost_defer_interval_s=bad), "pluginhost_defer_interval_s")
