"""``pluginhost workflows ...``: every command is the Workflows API, and bad input is one line.

Commands that only touch the store run in this process (click's ``CliRunner``);
error cases also run the real ``pluginhost`` script, so exit codes and a one-line
stderr are what a shell sees; ``start --wait`` and ``resume`` use a real worker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import inspect, update

from pluginhost.cli import main
from tests import harness
from workflows import Parallel, Step, Workflow, Workflows
from workflows.store import runs as runs_table
from workflows.store import steps as steps_table

pytestmark = pytest.mark.parametrize("backend", ["embedded"], indirect=True)

APP = "tests.apps.cli_flows:app"
PLUGINHOST = str(Path(sys.executable).with_name("pluginhost"))

ONBOARDING = Workflow(
    "onboarding",
    steps=[
        Step("greet"),
        Parallel(Step("mail"), Step("provision", retries=2, timeout=5)),
        Step("flaky", on_disabled="fail"),
    ],
)
HELLO = Workflow("hello", steps=[Step("greet")])


# -- fixtures and helpers ---------------------------------------------------------


@pytest.fixture
def cli_app(app_conf: dict[str, Any], configure_app: Callable[[Any], Any]) -> ModuleType:
    """tests.apps.cli_flows in this process, pointed at this test's broker and store."""
    from tests.apps import cli_flows

    configure_app(cli_flows.app)
    cli_flows.host.with_store(app_conf["pluginhost_store"])
    return cli_flows


@pytest.fixture
def flows(cli_app: ModuleType) -> Workflows:
    return Workflows(cli_app.host)


@pytest.fixture
def cli(cli_app: ModuleType) -> Callable[..., Result]:
    """``cli("list")`` runs ``pluginhost --app ... workflows list`` in this process."""
    runner = CliRunner()

    def invoke(*args: str, input: str | None = None) -> Result:
        return runner.invoke(main, ["--app", APP, "workflows", *args], input=input, catch_exceptions=False)

    return invoke


@pytest.fixture
def ph(app_conf: dict[str, Any]) -> Callable[..., subprocess.CompletedProcess[str]]:
    """``ph("list")`` runs the real ``pluginhost workflows list`` script."""
    env = {**os.environ, harness.PH_CONF_ENV: json.dumps(app_conf), "PLUGINHOST_APP": APP}

    def run(*args: str, input: str | None = None, app: bool = True) -> subprocess.CompletedProcess[str]:
        child_env = env if app else {k: v for k, v in env.items() if k != "PLUGINHOST_APP"}
        return subprocess.run(
            [PLUGINHOST, "workflows", *args],
            input=input,
            env=child_env,
            cwd=harness.REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    return run


@pytest.fixture
def worker(workers: harness.WorkerFactory) -> harness.Worker:
    """One solo worker on this test's queue (stopped by ``workers`` at teardown)."""
    return workers("tests.apps.cli_flows", pool="solo", concurrency=1)


def table_rows(text: str) -> list[list[str]]:
    """The body rows of the rich tables in ``text``, as lists of cells."""
    return [
        [c.strip() for c in line.strip().strip("│").split("│")] for line in text.splitlines() if line.startswith("│")
    ]


def assert_one_line_error(proc: subprocess.CompletedProcess[str] | Result, exit_code: int, *fragments: str) -> str:
    code = proc.returncode if isinstance(proc, subprocess.CompletedProcess) else proc.exit_code
    assert code == exit_code, (code, proc.stdout, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "workflow.json"
    path.write_text(text)
    return str(path)


def set_times(flows: Workflows, table: Any, when: datetime, column: str, **where: Any) -> None:
    """Back-date a run or step row (runs cannot age faster in a test otherwise)."""
    with flows.store.engine.begin() as conn:
        conn.execute(update(table).where(*(table.c[k] == v for k, v in where.items())).values({column: when}))


def ago(seconds: float) -> datetime:
    return datetime.now(timezone.utc) - timedelta(seconds=seconds)


# -- define, list, show ------------------------------------------------------------


def test_define_prints_the_version_and_a_changed_definition_gets_a_new_one(
    cli: Callable[..., Result], flows: Workflows, tmp_path: Path
) -> None:
    result = cli("define", write(tmp_path, ONBOARDING.model_dump_json()))
    assert (result.exit_code, result.stdout) == (0, "defined onboarding version 1\n")
    assert flows.get("onboarding") == ONBOARDING

    assert cli("define", write(tmp_path, ONBOARDING.model_dump_json())).stdout == "defined onboarding version 1\n"
    changed = Workflow("onboarding", steps=[Step("greet"), Step("flaky")])
    result = cli("define", "-", input=changed.model_dump_json())
    assert (result.exit_code, result.stdout) == (0, "defined onboarding version 2\n")
    assert flows.get("onboarding") == changed and flows.get("onboarding", 1) == ONBOARDING


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"name": "onboarding", "steps": [', "Invalid JSON"),
        (
            Workflow("onboarding", steps=[Step("greet"), Step("nope")]).model_dump_json(),
            "step 'nope' is not a declared capability",
        ),
        (
            (
                '{"name": "onboarding", "steps": [{"type": "step", "slug": "greet"},'
                ' {"type": "parallel", "steps": [{"type": "step", "slug": "greet"}]}]}'
            ),
            "step 'greet' appears more than once",
        ),
        (
            '{"name": "onboarding", "steps": [{"slug": "greet"}, {"steps": [{"slug": "greet2"}, {"retries": 1}]}]}',
            "invalid workflow at 'steps[1].steps[1]': invalid step: field 'slug' is required",
        ),
        (
            '{"name": "onboarding", "steps": [{"slug": "greet", "retires": 2}]}',
            "invalid workflow at 'steps[0]': invalid step at 'retires': Extra inputs are not permitted",
        ),
    ],
    ids=["bad-json", "unknown-capability", "duplicate-step", "missing-slug-located", "unknown-key-located"],
)
def test_define_rejects_a_bad_definition_in_one_line_and_stores_nothing(
    ph: Callable[..., subprocess.CompletedProcess[str]],
    flows: Workflows,
    tmp_path: Path,
    text: str,
    expected: str,
) -> None:
    proc = ph("define", write(tmp_path, text))
    assert_one_line_error(proc, 1, "error: InvalidWorkflow: ", expected)
    assert proc.stdout == ""
    assert flows.list() == []


def test_list_shows_the_newest_versions_with_parallel_groups(cli: Callable[..., Result], flows: Workflows) -> None:
    flows.define(HELLO)
    flows.define(ONBOARDING)
    flows.define(Workflow("hello", steps=[Step("greet"), Step("provision")]))
    result = cli("list")
    assert result.exit_code == 0
    assert table_rows(result.stdout) == [
        ["hello", "2", "greet -> provision"],
        ["onboarding", "1", "greet -> [mail | provision] -> flaky"],
    ]


def test_show_lists_each_steps_policy_and_whether_it_would_run_now(
    cli: Callable[..., Result], cli_app: ModuleType, flows: Workflows
) -> None:
    flows.define(ONBOARDING)
    cli_app.host.disable("mail")
    result = cli("show", "onboarding")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines()[0] == "onboarding version 1: greet -> [mail | provision] -> flaky"
    assert table_rows(result.stdout) == [
        # position, step, plugin, enabled, on_disabled, retries, timeout, now
        ["0", "greet", "greet", "yes", "skip", "0", "-", "run"],
        ["1", "mail", "mail", "no", "skip", "0", "-", "skip"],
        ["2", "provision", "provision", "yes", "skip", "2", "5s", "run"],
        ["3", "flaky", "flaky", "yes", "fail", "0", "-", "run"],
    ]


def test_show_json_round_trips_through_define_and_shows_older_versions(
    cli: Callable[..., Result], flows: Workflows
) -> None:
    flows.define(HELLO)
    flows.define(ONBOARDING.model_copy(update={"name": "hello"}))
    old = cli("show", "hello", "--version", "1", "--json")
    assert old.exit_code == 0 and Workflow.parse(old.stdout) == HELLO
    assert cli("define", "-", input=old.stdout).stdout == "defined hello version 3\n"

    missing = cli("show", "hello", "--version", "9")
    assert_one_line_error(missing, 1, "WorkflowNotFound: workflow 'hello' has no version 9")
    assert_one_line_error(cli("show", "nope"), 1, "WorkflowNotFound: no workflow named 'nope'")


def test_an_unknown_workflow_name_suggests_near_ones_everywhere(
    ph: Callable[..., subprocess.CompletedProcess[str]], flows: Workflows
) -> None:
    flows.define(ONBOARDING)
    for args in (("show", "onbording"), ("start", "onbording"), ("history", "onbording")):
        proc = ph(*args)
        assert_one_line_error(proc, 1, "no workflow named 'onbording'; did you mean 'onboarding'?")


def test_history_shows_who_defined_which_version_when(
    ph: Callable[..., subprocess.CompletedProcess[str]], flows: Workflows
) -> None:
    flows.define(HELLO, actor="alice")
    flows.define(ONBOARDING.model_copy(update={"name": "hello"}), actor="bob")
    flows.define(ONBOARDING.model_copy(update={"name": "hello"}), actor="carol")  # unchanged: no new version
    done = ph("history", "hello")
    assert done.returncode == 0, done.stderr
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in done.stdout.splitlines() if "│" in line]
    assert [(r[0], r[2]) for r in rows] == [("2", "bob"), ("1", "alice")]
    assert [v.actor for v in flows.history("hello")] == ["bob", "alice"]


# -- start, runs, run, resume ------------------------------------------------------


def test_start_wait_prints_the_run_id_the_final_context_and_the_steps(
    cli: Callable[..., Result], flows: Workflows, worker: harness.Worker
) -> None:
    flows.define(ONBOARDING)
    flows.define(HELLO)
    result = cli("start", "onboarding", "--input", '{"name": "ann"}', "--wait", "--timeout", "30")
    assert result.exit_code == 0, result.stderr
    run_id, context = result.stdout.splitlines()[:2]
    assert json.loads(context) == {
        "name": "ann",
        "greeting": "hello ann",
        "mailed": "hello ann",
        "workspace": "ws-ann",
        "flaky": "ok",
    }
    assert [(r[1], r[2], r[3]) for r in table_rows(result.stdout)] == [
        (slug, "succeeded", "1") for slug in ("greet", "mail", "provision", "flaky")
    ]
    assert flows.run(run_id) is not None and flows.run(run_id).status == "succeeded"  # type: ignore[union-attr]

    queued = cli("start", "hello")  # without --wait: the run id only
    assert queued.exit_code == 0 and flows.run(queued.stdout.strip()) is not None


def test_a_failed_step_exits_1_and_resume_finishes_the_run_from_that_step(
    cli: Callable[..., Result], cli_app: ModuleType, flows: Workflows, worker: harness.Worker
) -> None:
    flows.define(ONBOARDING)
    flows.define(HELLO)
    acks = cli_app.host.configure("flaky", {"fail": True}, wait=True, timeout=3)
    assert acks == [worker.hostname]  # the worker applies the change before the next run
    ok = cli("start", "hello", "--wait")
    assert ok.exit_code == 0, ok.stderr

    failed = cli("start", "onboarding", "--input", '{"name": "bob"}', "--wait")
    run_id = failed.stdout.splitlines()[0]
    assert_one_line_error(failed, 1, f"run {run_id} failed: RuntimeError: flaky is configured to fail")
    assert table_rows(failed.stdout)[-1][1:4] == ["flaky", "failed", "1"]

    runs = cli("runs", "--status", "failed")
    assert [r[0] for r in table_rows(runs.stdout)] == [run_id]
    assert [r[1] for r in table_rows(cli("runs", "--status", "succeeded").stdout)] == ["hello"]
    assert len(table_rows(cli("runs", "--limit", "1").stdout)) == 1

    shown = cli("run", run_id)
    assert shown.exit_code == 0
    assert "workflow  onboarding version 1" in shown.stdout
    assert "status    failed" in shown.stdout
    assert "error     RuntimeError: flaky is configured to fail" in shown.stdout
    steps = table_rows(shown.stdout)
    assert [(s[0], s[1], s[2], s[3]) for s in steps] == [
        ("0", "greet", "succeeded", "1"),
        ("1", "mail", "succeeded", "1"),
        ("2", "provision", "succeeded", "1"),
        ("3", "flaky", "failed", "1"),
    ]
    flaky_version = cli_app.host.get("flaky").version
    assert steps[3][4].isdigit() and steps[3][5] == str(flaky_version)
    assert steps[3][6] == "RuntimeError: flaky is configured to fail"

    acks = cli_app.host.configure("flaky", {"fail": False}, wait=True, timeout=3)
    assert acks == [worker.hostname]  # the worker applies the change before the next run
    resumed = cli("resume", run_id, "--wait")
    assert resumed.exit_code == 0, resumed.stderr
    assert resumed.stdout.splitlines()[0] == run_id
    assert json.loads(resumed.stdout.splitlines()[1])["flaky"] == "ok"
    after = flows.run(run_id)
    assert after is not None and after.status == "succeeded"
    assert [(s.slug, s.attempts) for s in after.steps] == [
        ("greet", 1),
        ("mail", 1),
        ("provision", 1),
        ("flaky", 2),
    ]

    assert_one_line_error(cli("resume", run_id), 1, "InvalidRunState: ", "only failed runs can be resumed")


def test_start_with_input_that_is_not_json_is_one_line_and_starts_nothing(
    ph: Callable[..., subprocess.CompletedProcess[str]], flows: Workflows
) -> None:
    flows.define(HELLO)
    proc = ph("start", "hello", "--input", "{name: ann}")
    assert_one_line_error(proc, 1, "error: InvalidInput: --input is not valid JSON")
    assert flows.runs() == []


def test_run_of_an_unknown_id_is_workflow_not_found(
    ph: Callable[..., subprocess.CompletedProcess[str]],
) -> None:
    proc = ph("run", "no-such-run")
    assert_one_line_error(proc, 1, "error: WorkflowNotFound: no workflow run 'no-such-run'")
    assert proc.stdout == ""


def test_runs_rejects_an_unknown_status(cli: Callable[..., Result]) -> None:
    assert_one_line_error(cli("runs", "--status", "bogus"), 2, "'bogus' is not one of")


# -- sweep and prune ---------------------------------------------------------------


def test_sweep_fails_runs_whose_step_has_been_running_too_long(cli: Callable[..., Result], flows: Workflows) -> None:
    flows.define(HELLO)
    stuck, _ = flows.prepare("hello", {})
    fresh, _ = flows.prepare("hello", {})
    for run_id in (stuck, fresh):
        flows.store.begin_step(run_id, 0, worker="w-dead", first=True)  # as a worker does, then it died
    set_times(flows, steps_table, ago(2 * 3600), "started_at", run_id=stuck)

    assert cli("sweep", "--older-than", "3h").stdout == ""
    assert cli("sweep").stdout == f"{stuck}\n"  # default: running for over an hour
    swept = flows.run(stuck)
    assert swept is not None and swept.status == "failed" and "lost" in (swept.error or "")
    assert flows.run(fresh).status == "running"  # type: ignore[union-attr]
    assert cli("sweep", "--older-than", "0").stdout == f"{fresh}\n"


@pytest.mark.parametrize(
    ("duration", "seconds"),
    [("30d", 30 * 86400), ("12h", 12 * 3600), ("15m", 900), ("90s", 90), ("7200", 7200)],
)
def test_prune_deletes_finished_runs_older_than_the_duration(
    cli: Callable[..., Result], flows: Workflows, duration: str, seconds: int
) -> None:
    flows.define(HELLO)
    old, newer, unfinished = (flows.prepare("hello", {})[0] for _ in range(3))
    for run_id, age_s in ((old, seconds + 60), (newer, seconds - 60)):
        flows.store.finish_run(run_id, {})
        set_times(flows, runs_table, ago(age_s), "finished_at", id=run_id)
    set_times(flows, runs_table, ago(seconds * 2), "created_at", id=unfinished)

    result = cli("prune", "--older-than", duration)
    assert (result.exit_code, result.stdout) == (0, "deleted 1 run(s)\n")
    assert flows.run(old) is None
    assert flows.run(newer) is not None and flows.run(unfinished) is not None


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["prune", "--older-than", "3x"], "Invalid value for '--older-than'"),
        (["prune", "--older-than", "-5m"], "Invalid value for '--older-than'"),
        (["prune"], "Missing option '--older-than'"),
        (["sweep", "--older-than", "soon"], "Invalid value for '--older-than'"),
    ],
    ids=["unit", "negative", "missing", "sweep"],
)
def test_a_bad_duration_is_a_one_line_usage_error(cli: Callable[..., Result], args: list[str], expected: str) -> None:
    assert_one_line_error(cli(*args), 2, expected)


def test_a_bad_duration_from_the_shell_exits_2(
    ph: Callable[..., subprocess.CompletedProcess[str]],
) -> None:
    proc = ph("prune", "--older-than", "3 weeks")
    assert_one_line_error(proc, 2, "expected a duration like 30d, 12h, 15m, 90s or seconds, got '3 weeks'")


# -- app and schema ----------------------------------------------------------------


def test_without_an_app_it_is_one_line_and_non_zero(
    ph: Callable[..., subprocess.CompletedProcess[str]],
) -> None:
    proc = ph("list", app=False)
    assert_one_line_error(proc, 1, "no app given: pass --app module:app or set PLUGINHOST_APP")
    assert proc.stdout == ""


def test_db_upgrade_creates_the_workflow_tables(cli_app: ModuleType) -> None:
    result = CliRunner().invoke(main, ["--app", APP, "db", "upgrade"], catch_exceptions=False)
    assert (result.exit_code, result.stdout) == (0, "schema is up to date\n")
    tables = set(inspect(cli_app.host.store.engine).get_table_names())  # type: ignore[attr-defined]
    assert {"workflows_definitions", "workflows_runs", "workflows_steps"} <= tables
