"""The ``pluginhost`` command (and ``celery -A app pluginhost``): every command,
its output, and one-line errors with a non-zero exit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
APP = "tests.apps.core:app"

pytestmark = pytest.mark.parametrize("backend", ["embedded"], indirect=True)


@pytest.fixture
def cli(app_conf: dict[str, Any], core: ModuleType) -> Any:
    """Runs the real console script with this test's settings."""

    def run(*args: str, app: str | None = APP, program: str = "pluginhost") -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "PH_CONF": json.dumps(app_conf), "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
        env.pop("PLUGINHOST_APP", None)
        if app is not None and program == "pluginhost":
            env["PLUGINHOST_APP"] = app
        return subprocess.run(
            [str(BIN / program), *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
        )

    return run


def one_line_error(done: subprocess.CompletedProcess[str], fragment: str) -> None:
    assert done.returncode != 0, done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert fragment in lines[0], lines[0]


def test_list_show_and_json_output(cli: Any, core: ModuleType) -> None:
    done = cli("list")
    assert done.returncode == 0 and "work" in done.stdout and "عمل" in done.stdout
    rows = json.loads(cli("list", "--json").stdout)
    assert {r["slug"] for r in rows} >= {"work", "named", "step_a"}
    shown = json.loads(cli("show", "work").stdout)
    assert shown["label_ar"] == "عمل" and shown["config"] == {"colour": "blue", "level": 1}


def test_enable_disable_configure_config_and_audit(cli: Any, core: ModuleType) -> None:
    assert cli("disable", "work", "--actor", "ops").returncode == 0
    assert not core.host.is_enabled("work")
    assert cli("enable", "work").returncode == 0
    assert core.host.is_enabled("work")
    done = cli("configure", "work", "level=3", "colour=red")
    assert done.returncode == 0
    state, config = done.stdout.splitlines()
    assert state.startswith("work: enabled=yes sort=")
    assert json.loads(config.removeprefix("config: ")) == {"colour": "red", "level": 3}
    assert cli("config", "work", "level").stdout.strip() == "3"
    assert cli("configure", "work", "--json", '{"level": 4}').returncode == 0
    assert core.host.get("work").config == {"colour": "blue", "level": 4}
    audit = json.loads(cli("audit", "work", "--json").stdout)
    assert [a["action"] for a in audit][:4] == ["configure", "configure", "enable", "disable"]
    assert audit[3]["actor"] == "ops"
    assert "configure" in cli("audit", "work").stdout


def test_nav_sort_capabilities_and_sync(cli: Any, core: ModuleType) -> None:
    assert cli("sort", "step_b", "--", "-5").returncode == 0
    nav = [line for line in cli("nav").stdout.splitlines() if "│" in line]
    assert [cell.strip() for cell in nav[0].split("│")][1:3] == ["-5", "step_b"]
    assert "الخطوة أ" in cli("nav", "--lang", "ar").stdout
    caps = cli("capabilities").stdout
    assert "pluginhost.capability.work" in caps and "skip" in caps
    assert cli("sync").returncode == 0
    assert cli("db", "upgrade").stdout.strip() == "schema is up to date"


def test_run_with_wait_on_a_real_worker(cli: Any, core: ModuleType, workers: Any) -> None:
    workers("tests.apps.core", pool="solo")
    done = cli("run", "named", "--input", '{"name": "Ada"}', "--wait")
    assert done.returncode == 0 and json.loads(done.stdout) == "hello Ada"
    task_id = cli("run", "work", "--input", "{}").stdout.strip()
    assert len(task_id) == 36
    refreshed = cli("refresh", "--wait")
    assert refreshed.returncode == 0 and "acknowledged by 1 worker(s)" in refreshed.stdout
    listing = cli("workers")
    assert listing.returncode == 0 and "1 worker(s)" in listing.stdout


def test_the_same_commands_as_a_celery_subcommand(cli: Any, core: ModuleType) -> None:
    done = cli("-A", "tests.apps.core", "pluginhost", "list", "--json", program="celery")
    assert done.returncode == 0, done.stderr
    assert "work" in {r["slug"] for r in json.loads(done.stdout)}
    bad = cli("-A", "tests.apps.core", "pluginhost", "disable", "ghost", program="celery")
    assert bad.returncode != 0 and "PluginNotFound" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize(
    "args, fragment",
    [
        (("show", "ghost"), "PluginNotFound: plugin 'ghost' not found"),
        (("enable", "Bad Slug"), "InvalidPlugin: invalid slug 'Bad Slug'"),
        (("disable", "ghost"), "PluginNotFound"),
        (("configure", "work", "level=abc"), "InvalidConfig: plugin 'work': field 'level'"),
        (("configure", "work", "--json", "[1]"), "InvalidConfig: plugin 'work': expected a JSON object"),
        (("configure", "work", "--json", "{bad"), "--json is not valid JSON"),
        (("configure", "work"), "give KEY=VALUE pairs"),
        (("configure", "work", "novalue"), "expected KEY=VALUE"),
        (("config", "work", "missing"), "has no config key 'missing'"),
        (("config", "work", "levl"), "has no config key 'levl'; did you mean 'level'?"),
        (("show", "wrk"), "PluginNotFound: plugin 'wrk' not found; did you mean 'work'?"),
        (("disable", "wrok"), "plugin 'wrok' not found; did you mean 'work'?"),
        (("configure", "wrok", "level=1"), "plugin 'wrok' not found; did you mean 'work'?"),
        (("sort", "wrok", "3"), "plugin 'wrok' not found; did you mean 'work'?"),
        (("audit", "wrok"), "plugin 'wrok' not found; did you mean 'work'?"),
        (("audit", "ghost"), "PluginNotFound: plugin 'ghost' not found"),
        (("run", "nmaed"), "capability 'nmaed' is not declared on this host; did you mean 'named'?"),
        (("run", "named"), "InvalidInput: capability 'named' input: field 'name' is required"),
        (("run", "work", "--input", "{not json"), "--input is not valid JSON"),
        (("run", "named", "--input", '{"nom": 1}'), "InvalidInput: capability 'named' input: field 'name' is required"),
        (("run", "ghost"), "CapabilityNotFound"),
        (("nav", "--kind", "widget"), "unknown kind 'widget'"),
        (("sort", "work", "high"), "Invalid value for 'POSITION'"),
        (("frobnicate",), "No such command 'frobnicate'"),
    ],
)
def test_bad_input_is_one_line_and_a_non_zero_exit(
    cli: Any, core: ModuleType, args: tuple[str, ...], fragment: str
) -> None:
    before = [(p.slug, p.version) for p in core.host.list()]
    one_line_error(cli(*args), fragment)
    assert [(p.slug, p.version) for p in core.host.list()] == before


def test_every_mutation_prints_the_new_state_and_with_wait_the_acks(cli: Any, core: ModuleType, workers: Any) -> None:
    def state() -> str:
        p = core.host.get("work")
        return f"work: enabled={'yes' if p.enabled else 'no'} sort={p.sort} version={p.version}"

    for args in (("disable", "work"), ("enable", "work"), ("sort", "work", "7")):
        done = cli(*args)
        assert done.returncode == 0 and done.stdout.splitlines() == [state()], (args, done.stdout)
    assert "sort=7" in state()
    workers("tests.apps.core", pool="solo")
    for args in (("disable", "work", "--wait", "--timeout", "5"), ("sort", "work", "2", "--wait", "--timeout", "5")):
        lines = cli(*args).stdout.splitlines()
        assert lines[0] == state() and lines[1].startswith("acknowledged by 1 worker(s): "), (args, lines)
    lines = cli("configure", "work", "level=9", "--wait", "--timeout", "5").stdout.splitlines()
    assert lines[0] == state() and json.loads(lines[1].removeprefix("config: "))["level"] == 9
    assert lines[2].startswith("acknowledged by 1 worker(s): ")


def test_run_without_input_names_every_missing_field_and_enqueues_nothing(cli: Any, core: ModuleType) -> None:
    done = cli("run", "two_fields")
    one_line_error(done, "InvalidInput: capability 'two_fields' input: fields 'name', 'email' are required")


def test_an_app_module_that_cannot_be_imported_gets_a_hint(cli: Any, core: ModuleType) -> None:
    done = cli("list", app="no_such_shop:app")
    one_line_error(done, "cannot import app module 'no_such_shop'")
    assert "working directory" in done.stderr and "PYTHONPATH" in done.stderr


def test_run_input_file_validates_every_line_first_then_runs_each_once(
    cli: Any, core: ModuleType, workers: Any, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"name": "a"}\n{"name": "b"}\n{"nom": "c"}\n', encoding="utf-8")
    one_line_error(
        cli("run", "named", "--input-file", str(bad)), "input 2: capability 'named' input: field 'name' is required"
    )
    assert f"{bad} line 3" in cli("run", "named", "--input-file", str(bad)).stderr
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"name": "a"}\n{"name": \n', encoding="utf-8")
    one_line_error(cli("run", "named", "--input-file", str(broken)), f"{broken} line 2 is not valid JSON")

    workers("tests.apps.core", pool="solo")  # only now: whatever was enqueued above would run
    good = tmp_path / "good.jsonl"
    good.write_text("".join(f'{{"name": "n{i}"}}\n' for i in range(5)) + "\n", encoding="utf-8")
    done = cli("run", "named", "--input-file", str(good), "--wait")
    assert done.returncode == 0, done.stderr
    assert [json.loads(line) for line in done.stdout.splitlines()] == [f"hello n{i}" for i in range(5)]
    assert core.executions_of("named") == 5  # the refused batches enqueued nothing
    ids = cli("run", "named", "--input-file", str(good)).stdout.split()
    assert len(ids) == 5 and len(set(ids)) == 5
    one_line_error(cli("run", "named", "--input", "{}", "--input-file", str(good)), "not both")


def test_a_disabled_capability_is_refused_by_the_cli(cli: Any, core: ModuleType) -> None:
    core.host.disable("work")
    one_line_error(cli("run", "work"), "CapabilityDisabled: plugin 'work' is disabled")


def test_missing_or_broken_app(cli: Any) -> None:
    one_line_error(cli("list", app=None), "no app given: pass --app module:app or set PLUGINHOST_APP")
    one_line_error(cli("list", app="no.such.module:app"), "cannot import app module 'no.such.module'")
    one_line_error(cli("list", app="tests.apps.core:flows"), "is not a Celery app or PluginHost")
