"""Property tests: every bad input at a public entry point ends in a
PluginHostError (API) or one line and a non-zero exit (CLI), and nothing is
written or enqueued. Over 10,000 generated cases in all (see EXAMPLES)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from pluginhost import MemoryStore, Plugin, PluginHost, PluginHostError
from pluginhost.cli import main
from pluginhost.model import SLUG_PATTERN
from workflows import Workflows

EXAMPLES = {"slugs": 2500, "kinds": 500, "configs": 2500, "inputs": 2500, "workflows": 1500, "cli": 600}


def fast(kind: str) -> settings:
    return settings(
        deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, max_examples=EXAMPLES[kind]
    )


class Config(BaseModel):
    port: int = 25
    host: str = "localhost"


class Input(BaseModel):
    name: str
    count: int = 0


def make_host(name: str, store: Any) -> PluginHost:
    app = Celery(name, broker="memory://", backend="cache+memory://")
    app.conf.task_default_queue = "fuzz"
    h = PluginHost(app, store=store)
    h.register_capability("target", lambda payload: payload, config_model=Config, input_model=Input)
    h.register_capability("free", lambda payload: payload)
    h.sync()
    return h


@pytest.fixture(scope="module")
def host() -> PluginHost:
    """MemoryStore: same contract as the SQL store (tests/test_store.py), thousands of cases fast."""
    return make_host("fuzz", MemoryStore())


@pytest.fixture(scope="module")
def flows(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workflows]:
    h = make_host("fuzzflows", f"sqlite:///{tmp_path_factory.mktemp('fuzz') / 'flows.db'}")
    yield Workflows(h)
    h.store.close()


_channels: dict[int, Any] = {}


def queued(host: PluginHost) -> int:
    channel = _channels.get(id(host.app))
    if channel is None:
        channel = _channels[id(host.app)] = host.app.connection_for_write().default_channel
    return int(channel.queue_declare("fuzz").message_count)


def state(host: PluginHost) -> tuple[int, list[tuple[str, int]], int]:
    return host.store.revision(), [(p.slug, p.version) for p in host.store.load()[1]], queued(host)


json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20)
)
non_json = st.one_of(
    st.just(float("nan")),
    st.just(float("inf")),
    st.binary(max_size=8),
    st.frozensets(st.integers(), max_size=3),
    st.sets(st.integers(), max_size=3),
    st.complex_numbers(),
    st.just(object()),
    st.just(Path("/etc/passwd")),
)
values = st.recursive(
    st.one_of(json_scalars, non_json),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.one_of(st.text(max_size=8), st.integers()), inner, max_size=4)
    ),
    max_leaves=12,
)
hostile_text = st.one_of(
    st.text(max_size=80),
    st.sampled_from(
        [
            "",
            "a" * 65,
            "x'; DROP TABLE pluginhost_plugins; --",
            "../../etc/passwd",
            "a/b",
            "é",
            "ا",
            "a\n",
            "A",
            "-x",
            "a b",
            "\x00",
        ]
    ),
)


def is_json(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


@fast("slugs")
@given(
    slug=hostile_text,
    action=st.sampled_from(["enable", "disable", "get", "is_enabled", "config_value", "run", "register"]),
)
def test_any_slug_is_accepted_or_rejected_cleanly(host: PluginHost, slug: str, action: str) -> None:
    import re

    before = state(host)
    try:
        if action == "get":
            assert host.get(slug) is None or re.match(SLUG_PATTERN, slug)
        elif action == "is_enabled":
            assert host.is_enabled(slug) in (True, False)
        elif action == "config_value":
            host.config_value(slug, "k")
        elif action == "run":
            host.run_capability(slug, {})
        elif action == "register":
            host.register({"slug": slug, "enabled": True, "label_ar": slug})
            assert re.fullmatch(SLUG_PATTERN, slug)
            return  # a valid new record: written on purpose
        else:
            getattr(host, action)(slug)
    except PluginHostError:
        assert state(host) == before
        return
    if action in ("enable", "disable"):
        assert host.get(slug) is not None  # only existing plugins can be toggled


@fast("kinds")
@given(
    kind=st.one_of(st.text(max_size=12), st.integers(), st.none()),
    sort=st.one_of(st.integers(), st.text(max_size=3), st.floats()),
)
def test_any_kind_and_sort_are_accepted_or_rejected_cleanly(host: PluginHost, kind: Any, sort: Any) -> None:
    before = state(host)
    try:
        host.register({"slug": "fuzzkind", "kind": kind, "sort": sort})
    except PluginHostError:
        assert state(host) == before


@fast("configs")
@given(
    config=st.one_of(values, st.dictionaries(st.text(max_size=6), values, max_size=5)),
    slug=st.sampled_from(["target", "free"]),
)
def test_any_config_is_validated_before_anything_is_written(host: PluginHost, config: Any, slug: str) -> None:
    before = state(host)
    try:
        host.configure(slug, config)
    except PluginHostError:
        assert state(host) == before
        return
    assert isinstance(config, dict) and is_json(config)
    stored = host.get(slug).config
    if slug == "target":
        assert Config.model_validate(stored)


@fast("inputs")
@given(
    payload=st.one_of(values, st.dictionaries(st.text(max_size=6), values, max_size=5)),
    slug=st.sampled_from(["target", "free", "nope"]),
)
def test_any_input_is_validated_before_anything_is_enqueued(host: PluginHost, payload: Any, slug: str) -> None:
    for name in ("target", "free"):
        if not host.is_enabled(name):
            host.enable(name)
    before = state(host)
    try:
        host.run_capability(slug, payload)
    except PluginHostError:
        assert state(host) == before
        return
    assert slug != "nope" and (payload is None or (isinstance(payload, dict) and is_json(payload)))
    if slug == "target":
        Input.model_validate(payload)
    assert queued(host) == before[2] + 1


step = st.fixed_dictionaries(
    {"slug": st.one_of(st.sampled_from(["target", "free"]), hostile_text)},
    optional={
        "on_disabled": st.one_of(st.sampled_from(["skip", "fail"]), st.text(max_size=5)),
        "retries": st.one_of(st.integers(), st.text(max_size=3)),
        "type": st.sampled_from(["step", "bogus"]),
    },
)
definitions = st.one_of(
    st.fixed_dictionaries(
        {
            "name": hostile_text,
            "steps": st.lists(
                st.one_of(step, st.fixed_dictionaries({"steps": st.lists(step, max_size=3)})), max_size=4
            ),
        }
    ),
    values,
    st.text(max_size=60),
    st.builds(lambda d: json.dumps(d, default=str), st.dictionaries(st.text(max_size=5), json_scalars, max_size=3)),
)


@fast("workflows")
@given(definition=definitions)
def test_any_workflow_definition_is_rejected_cleanly_or_stored(flows: Workflows, definition: Any) -> None:
    before = [(w.name, flows.version(w.name)) for w in flows.list()]
    try:
        flows.define(definition)
    except PluginHostError:
        assert [(w.name, flows.version(w.name)) for w in flows.list()] == before
        return
    assert isinstance(definition, (dict, str))


cli_args = st.lists(
    st.one_of(
        hostile_text, st.sampled_from(["--json", "--input", "{", "level=", "=x", "--wait", "--limit", "-1", "--kind"])
    ),
    max_size=4,
)


@fast("cli")
@given(
    command=st.sampled_from(
        ["show", "enable", "disable", "configure", "config", "run", "nav", "audit", "sort", "bogus", "workflows"]
    ),
    args=cli_args,
)
def test_any_cli_arguments_end_in_one_line_or_success(host: PluginHost, command: str, args: list[str]) -> None:
    before = state(host)
    runner = CliRunner()
    result = runner.invoke(main, ["--app", "tests.test_fuzz:_cli_host", command, *args], catch_exceptions=True)
    if result.exit_code == 0:
        return
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(("error:", "Usage")), result.stderr
    if command in ("show", "config", "nav", "audit", "bogus"):
        assert state(host) == before


_cli_host: PluginHost | None = None


@pytest.fixture(scope="module", autouse=True)
def _expose_host_to_cli(host: PluginHost) -> Iterator[None]:
    global _cli_host
    _cli_host = host
    yield
    _cli_host = None


def test_the_case_count_is_over_ten_thousand() -> None:
    assert sum(EXAMPLES.values()) >= 10_000
    assert not math.isnan(sum(EXAMPLES.values()))


def test_hostile_slugs_and_config_are_stored_as_data(tmp_path: Path) -> None:
    """All SQL is parameterised: a slug or config full of SQL is just text."""
    h = PluginHost(Celery("sql", broker="memory://"), store=f"sqlite:///{tmp_path / 'sql.db'}")
    evil = {"q": "'); DROP TABLE pluginhost_plugins; --", "k'; --": 1}
    h.register(Plugin(slug="x.y-z_1", label_en="'; DELETE FROM pluginhost_audit; --", config=evil))
    assert h.get("x.y-z_1").config == evil
    assert len(h.audit()) == 1 and len(h.list()) == 1
    assert MemoryStore is not None
