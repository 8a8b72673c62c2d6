"""Bad input gets a clear ``PluginHostError`` and writes nothing (G5), and
``configure`` has one documented meaning (replace, or ``merge=True``) that never
loses a stored secret: through the Python API on memory, SQLite and PostgreSQL
stores, through the real ``pluginhost`` command, and through the console."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from celery import Celery
from pydantic import BaseModel, Field, SecretStr

from pluginhost import (
    ConcurrentUpdate,
    InvalidArgument,
    InvalidConfig,
    InvalidInput,
    InvalidPlugin,
    MemoryStore,
    Plugin,
    PluginHost,
    PluginHostError,
)
from pluginhost.model import MASK
from tests.apps.secrets_app import EmailConfig

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
HUGE = 10**5000


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def host(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[PluginHost]:
    if request.param == "memory":
        store: Any = MemoryStore()
    elif request.param == "sqlite":
        store = f"sqlite:///{tmp_path / 'bad.db'}"
    else:
        store = request.getfixturevalue("empty_pg_url")
    h = PluginHost(Celery("bad", broker="memory://", backend="cache+memory://"), store=store)
    h.register_capability("welcome_email", lambda payload, ctx: ctx.config.model_dump(), config_model=EmailConfig)
    h.register_capability("webhook", lambda payload: payload)
    h.sync()
    yield h
    h.store.close()


def written(host: PluginHost) -> Any:
    """Everything a write could change, read from the store itself."""
    revision, plugins = host.store.load()
    rows = [p.model_dump(exclude={"updated_at"}) for p in plugins]
    return revision, rows, [(e.id, e.action, e.actor) for e in host.store.audit(limit=10_000)]


def stored_config(host: PluginHost, slug: str) -> dict[str, Any]:
    plugin = host.store.get(slug)
    assert plugin is not None
    return plugin.config


# -- configure: one meaning, secrets kept -------------------------------------------


def test_configure_refuses_unknown_keys_naming_them_and_writes_nothing(host: PluginHost) -> None:
    host.configure("welcome_email", {"sender": "a@b.c", "api_key": "real-key"})
    before = written(host)
    with pytest.raises(
        InvalidConfig,
        match=r"plugin 'welcome_email': unknown config key 'sendr' \(known: api_key, port, sender, smtp_password\)",
    ):
        host.configure("welcome_email", {"sendr": "x"})
    with pytest.raises(InvalidConfig, match="unknown config keys 'a', 'b'"):
        host.configure("welcome_email", {"b": 1, "a": 2, "sender": "x"}, merge=True)
    assert written(host) == before


def test_configure_replaces_but_keeps_a_stored_secret_that_is_left_out(host: PluginHost) -> None:
    host.configure(
        "welcome_email", {"sender": "a@b.c", "port": 2525, "api_key": "real-key", "smtp_password": "hunter2"}
    )
    host.configure("welcome_email", {"sender": "x@y.z"})
    # replaced: port is back to its default; the secrets are not
    assert stored_config(host, "welcome_email") == {
        "sender": "x@y.z",
        "port": 25,
        "api_key": "real-key",
        "smtp_password": "hunter2",
    }
    host.configure(
        "webhook", {"url": "https://a", "token": "t0k", "auth": {"password": "p", "user": "u"}, "retries": 3}
    )
    host.configure("webhook", {"url": "https://b", "auth": {"user": "v"}})
    assert stored_config(host, "webhook") == {
        "url": "https://b",
        "token": "t0k",
        "auth": {"user": "v", "password": "p"},
    }


def test_a_secret_is_cleared_only_when_set_explicitly(host: PluginHost) -> None:
    host.configure("welcome_email", {"api_key": "real-key", "smtp_password": "hunter2"})
    host.configure("welcome_email", {"smtp_password": None})
    assert stored_config(host, "welcome_email")["smtp_password"] is None
    assert stored_config(host, "welcome_email")["api_key"] == "real-key"
    host.configure("webhook", {"token": "t0k"})
    host.configure("webhook", {"token": None})
    assert stored_config(host, "webhook") == {"token": None}


def test_configure_with_merge_changes_only_the_keys_given(host: PluginHost) -> None:
    host.configure("welcome_email", {"sender": "a@b.c", "port": 2525, "api_key": "real-key"})
    host.configure("welcome_email", {"port": 587}, merge=True)
    assert stored_config(host, "welcome_email") == {
        "sender": "a@b.c",
        "port": 587,
        "api_key": "real-key",
        "smtp_password": None,
    }
    host.configure("webhook", {"url": "https://a", "retries": 1})
    host.configure("webhook", {"retries": 2}, merge=True)
    assert stored_config(host, "webhook") == {"url": "https://a", "retries": 2}
    host.configure("webhook", {"auth": {"user": "u", "password": "p"}}, merge=True)
    host.configure("webhook", {"auth": {"user": "v"}}, merge=True)  # a nested object is replaced, its secrets kept
    assert stored_config(host, "webhook") == {"url": "https://a", "retries": 2, "auth": {"user": "v", "password": "p"}}
    with pytest.raises(InvalidConfig, match="field 'port'"):
        host.configure("welcome_email", {"port": "many"}, merge=True)
    assert stored_config(host, "welcome_email")["port"] == 587


def test_secretstr_fields_are_stored_and_reach_the_capability(host: PluginHost) -> None:
    host.configure("welcome_email", {"smtp_password": "hunter2"})
    assert stored_config(host, "welcome_email")["smtp_password"] == "hunter2"
    config = host.config_for(host.store.get("welcome_email"))  # type: ignore[arg-type]
    assert config.smtp_password.get_secret_value() == "hunter2"


def test_a_secret_rotation_is_audited_as_a_masked_change(host: PluginHost) -> None:
    host.configure("welcome_email", {"api_key": "key-1", "smtp_password": "pw-1"}, actor="ana")
    host.configure("welcome_email", {"api_key": "key-2"}, actor="ana")  # rotation; the password is kept
    entry = host.audit("welcome_email", limit=1)[0]
    assert entry.summary() != "no change"
    api_before, api_after = entry.before["config"]["api_key"], entry.after["config"]["api_key"]  # type: ignore[index]
    assert api_before == MASK and api_after == f"{MASK} (changed)"
    assert entry.after["config"]["smtp_password"] == MASK  # type: ignore[index]  # kept: unchanged
    assert "(changed)" in entry.masked().summary()
    text = json.dumps([e.model_dump(mode="json") for e in host.audit("welcome_email")])
    assert "key-1" not in text and "key-2" not in text and "pw-1" not in text


def test_an_unset_secret_is_shown_apart_from_a_set_one(host: PluginHost) -> None:
    host.configure("webhook", {"token": None})
    host.configure("webhook", {"token": "t0k"})
    entry = host.audit("webhook", limit=1)[0]
    assert entry.before["config"] == {"token": None}  # type: ignore[index]
    assert entry.after["config"] == {"token": MASK}  # type: ignore[index]
    assert entry.summary() == 'config: {"token": null} -> {"token": "********"}'


def test_invalid_config_never_echoes_a_secret_value(host: PluginHost) -> None:
    before = written(host)
    with pytest.raises(InvalidConfig) as raised:
        host.configure("welcome_email", {"api_key": ["s3cr3t-value"]})
    assert "field 'api_key'" in str(raised.value) and "s3cr3t-value" not in str(raised.value)
    with pytest.raises(InvalidConfig) as raised:
        host.configure("welcome_email", {"smtp_password": {"p": "s3cr3t-value"}})
    assert "field 'smtp_password'" in str(raised.value) and "s3cr3t-value" not in str(raised.value)
    with pytest.raises(InvalidConfig) as raised:
        host.configure("webhook", {"auth": {"password": b"s3cr3t-value"}})
    assert "auth.password" in str(raised.value) and "s3cr3t-value" not in str(raised.value)
    assert written(host) == before


def test_a_config_model_with_a_secret_field_named_like_data_is_refused_at_registration() -> None:
    class Hidden(BaseModel):
        auth: SecretStr = SecretStr("")

    class Marked(BaseModel):
        pin: str = Field("", json_schema_extra={"secret": True})

    h = PluginHost(Celery("decl", broker="memory://"), store=MemoryStore())
    for model in (Hidden, Marked):
        with pytest.raises(InvalidPlugin, match="is a secret but its name does not look like one"):
            h.register_capability(f"c_{model.__name__.lower()}", lambda p: p, config_model=model)
    assert h.capabilities() == []


def test_concurrent_merges_lose_no_key(host: PluginHost) -> None:
    errors: list[BaseException] = []

    def merge(worker: int) -> None:
        try:
            for i in range(15):
                host.configure("webhook", {f"k{worker}_{i}": i}, merge=True, actor=f"t{worker}")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=merge, args=(w,)) for w in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(stored_config(host, "webhook")) == 45


def test_a_merge_with_an_expected_version_is_not_retried(host: PluginHost) -> None:
    version = host.store.get("webhook").version  # type: ignore[union-attr]
    host.configure("webhook", {"a": 1}, merge=True)
    before = written(host)
    with pytest.raises(ConcurrentUpdate, match=f"expected version {version}"):
        host.configure("webhook", {"b": 2}, merge=True, expected_version=version)
    assert written(host) == before


# -- wrong error types ----------------------------------------------------------------


@pytest.mark.parametrize("sort", [2**31, -(2**31) - 1, 2**40, HUGE], ids=["2**31", "-2**31-1", "2**40", "10**5000"])
def test_a_sort_out_of_the_columns_range_is_invalid_plugin(host: PluginHost, sort: int) -> None:
    before = written(host)
    with pytest.raises(
        InvalidPlugin, match=r"plugin 'webhook': sort must be a 32-bit integer \(-2147483648 to 2147483647\)"
    ):
        host.set_sort("webhook", sort)
    assert written(host) == before
    host.set_sort("webhook", 2**31 - 1)
    assert host.store.get("webhook").sort == 2**31 - 1  # type: ignore[union-attr]


@pytest.mark.parametrize("actor", ["ops\x00", "ops\ud800", 5, "x" * 201])
@pytest.mark.parametrize("call", ["disable", "configure", "set_sort", "register"])
def test_a_bad_actor_is_invalid_argument(host: PluginHost, actor: Any, call: str) -> None:
    before = written(host)
    calls = {
        "disable": lambda: host.disable("webhook", actor=actor),
        "configure": lambda: host.configure("webhook", {"x": 1}, actor=actor),
        "set_sort": lambda: host.set_sort("webhook", 7, actor=actor),
        "register": lambda: host.register(Plugin(slug="fresh"), actor=actor),
    }
    with pytest.raises(InvalidArgument, match="actor"):
        calls[call]()
    assert written(host) == before


@pytest.mark.parametrize("label", ["a\x00b", "a\udcffb"])
def test_a_label_postgresql_cannot_store_is_invalid_plugin(host: PluginHost, label: str) -> None:
    before = written(host)
    with pytest.raises(InvalidPlugin, match="label_en"):
        host.register({"slug": "webhook", "label_en": label})
    with pytest.raises(InvalidPlugin, match="label_ar"):
        host.register({"slug": "fresh", "label_ar": label})
    assert written(host) == before


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"limit": -1}, "limit must be an integer from 1"),
        ({"limit": 0}, "limit must be an integer from 1"),
        ({"limit": 2**70}, "limit must be an integer from 1"),
        ({"limit": "10"}, "limit must be an integer from 1"),
        ({"actor": "ops\x00"}, "actor"),
    ],
)
def test_bad_audit_arguments_are_invalid_argument(host: PluginHost, kwargs: dict[str, Any], fragment: str) -> None:
    with pytest.raises(InvalidArgument, match=fragment):
        host.audit(**kwargs)
    with pytest.raises(InvalidPlugin, match="invalid slug"):
        host.audit("Bad\x00Slug")


@pytest.mark.parametrize(
    "config, fragment",
    [
        ({"n": HUGE}, "field 'n' must be a 64-bit integer, got an integer of 16610 bits"),
        ({"n": [1, 2**64]}, r"field 'n\[1\]' must be a 64-bit integer"),
        ({"s": "a\x00b"}, "field 's' contains a NUL character"),
        ({"a\x00": 1}, "contains a NUL character"),
        ({"s": "a\ud800"}, "field 's' is not valid Unicode"),
        ({"deep": json.loads("[" * 200 + "]" * 200)}, "nested more than 100 levels"),
    ],
    ids=["10**5000", "2**64", "nul-value", "nul-key", "surrogate", "deep"],
)
@pytest.mark.parametrize("slug", ["welcome_email", "webhook"])
def test_config_postgresql_or_json_cannot_hold_is_invalid_config(
    host: PluginHost, slug: str, config: dict[str, Any], fragment: str
) -> None:
    before = written(host)
    with pytest.raises(InvalidConfig, match=fragment):
        host.configure(slug, config)
    with pytest.raises(InvalidConfig, match=fragment):
        host.configure(slug, config, merge=True)
    with pytest.raises(InvalidPlugin, match="config"):
        host.register({"slug": slug, "config": config})
    assert written(host) == before


@pytest.mark.parametrize(
    "payload",
    [{"n": HUGE}, {"s": "\x00"}, {"s": "\udcff"}, {"k": [{"n": -(2**63) - 1}]}],
    ids=["10**5000", "nul", "surrogate", "-2**63-1"],
)
def test_input_postgresql_or_json_cannot_hold_is_invalid_input(host: PluginHost, payload: dict[str, Any]) -> None:
    before = written(host)
    for slug in ("webhook", "welcome_email"):
        with pytest.raises(InvalidInput):
            host.run_capability(slug, payload)
        with pytest.raises(InvalidInput):
            host.call_capability(slug, payload)
    assert written(host) == before


def test_64_bit_integers_and_plain_text_still_pass(host: PluginHost) -> None:
    config = {"lo": -(2**63), "hi": 2**63 - 1, "text": "بريد\u2028ok", "f": 1.5}
    host.configure("webhook", config)
    assert stored_config(host, "webhook") == config
    assert host.call_capability("webhook", config) == config


# -- the console ----------------------------------------------------------------------


def test_the_consoles_sort_form_answers_422_and_writes_nothing(tmp_path: Path) -> None:
    from pluginhost.embedded import embedded_conf
    from tests import harness
    from tests.apps import web_app
    from tests.test_web import console, log_in

    conf = embedded_conf(tmp_path / "embedded")
    harness.configure_app(web_app.app, conf)
    web_app.host.with_store(conf["pluginhost_store"])
    web_app.host.sync()
    try:
        ops = log_in(console(web_app))
        before = [e.id for e in web_app.host.audit(limit=1000)]
        response = ops.form("/plugins/report/sort", {"sort": str(2**40)})
        assert response.status_code == 422, response.status_code
        assert "2147483648" in response.text or "32-bit" in response.text
        api = ops.post("/api/plugins/report/configure", json={"config": {"s": "a\u0000"}})
        assert api.status_code == 422 and api.json()["error"] == "InvalidConfig"
        assert [e.id for e in web_app.host.audit(limit=1000)] == before
    finally:
        web_app.host.store.close()
        harness.reset_app(web_app.app)


# -- the pluginhost command -----------------------------------------------------------

SECRETS_APP = "tests.apps.secrets_app:app"


@pytest.fixture
def secrets(app_conf: dict[str, Any], configure_app: Any) -> Iterator[ModuleType]:
    """tests.apps.secrets_app pointed at this test's store."""
    from tests.apps import secrets_app as module

    configure_app(module.app)
    module.host.with_store(app_conf["pluginhost_store"])
    module.host.sync()
    yield module
    module.host.store.close()


@pytest.fixture
def cli(app_conf: dict[str, Any], secrets: ModuleType) -> Any:
    """Runs the real console script (bytes arguments allowed: argv is bytes on Linux)."""

    def run(*args: str | bytes) -> subprocess.CompletedProcess[str]:
        env = {
            **os.environ,
            "PH_CONF": json.dumps(app_conf),
            "PYTHONPATH": str(ROOT),
            "COLUMNS": "200",
            "PLUGINHOST_APP": SECRETS_APP,
        }
        return subprocess.run(
            [str(BIN / "pluginhost"), *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
        )

    return run


def one_line_error(done: subprocess.CompletedProcess[str], fragment: str) -> None:
    assert done.returncode != 0, done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert fragment in lines[0], lines[0]


def cli_state(module: ModuleType) -> Any:
    return written(module.host)


@pytest.mark.parametrize("backend", ["embedded", "redis"], indirect=True)  # SQLite and PostgreSQL stores
@pytest.mark.parametrize(
    "args, fragment",
    [
        (
            ("configure", "welcome_email", "sendr=x"),
            "InvalidConfig: plugin 'welcome_email': unknown config key 'sendr'",
        ),
        (("configure", "welcome_email", "--merge", "--json", '{"sendr": "x"}'), "unknown config key 'sendr'"),
        (("configure", "welcome_email", "api_key=[1]"), "InvalidConfig: plugin 'welcome_email': field 'api_key'"),
        (
            ("configure", "webhook", "--json", '{"s": "a\\u0000"}'),
            "InvalidConfig: plugin 'webhook': field 's' contains a NUL character",
        ),
        (
            ("configure", "webhook", "--json", '{"n": ' + "9" * 5000 + "}"),
            "--json is not valid JSON: integer of more than 4300 digits",
        ),
        (
            ("configure", "webhook", "n=" + "9" * 5000),
            "value of 'n' is not valid JSON: integer of more than 4300 digits",
        ),
        (
            ("configure", "webhook", "n=" + "9" * 30),
            "InvalidConfig: plugin 'webhook': field 'n' must be a 64-bit integer",
        ),
        (
            ("run", "webhook", "--input", '{"n": ' + "9" * 5000 + "}"),
            "--input is not valid JSON: integer of more than 4300 digits",
        ),
        (
            ("run", "webhook", "--input", '{"s": "\\u0000"}'),
            "InvalidInput: capability 'webhook' input: field 's' contains a NUL character",
        ),
        (("sort", "webhook", str(2**40)), "InvalidPlugin: plugin 'webhook': sort must be a 32-bit integer"),
        (("disable", "webhook", "--actor", b"ops\xff"), "InvalidArgument: actor is not valid Unicode"),
        (("audit", "--actor", b"ops\xff"), "InvalidArgument: actor is not valid Unicode"),
        (("audit", "--limit", "-1"), "Invalid value for '--limit'"),
    ],
)
def test_cli_bad_input_is_one_line_and_writes_nothing(
    cli: Any, secrets: ModuleType, args: tuple[Any, ...], fragment: str
) -> None:
    secrets.host.configure("welcome_email", {"api_key": "real-key"})
    before = cli_state(secrets)
    done = cli(*args)
    one_line_error(done, fragment)
    assert "real-key" not in done.stderr + done.stdout
    assert cli_state(secrets) == before


@pytest.mark.parametrize("backend", ["embedded"], indirect=True)
def test_cli_configure_replaces_unless_merge_and_keeps_secrets(cli: Any, secrets: ModuleType) -> None:
    secrets.host.configure(
        "welcome_email", {"sender": "a@b.c", "port": 2525, "api_key": "real-key", "smtp_password": "hunter2"}
    )
    merged = cli("configure", "welcome_email", "--merge", "port=587")
    assert merged.returncode == 0, merged.stderr
    shown = merged.stdout.splitlines()[1].removeprefix("config: ")
    assert json.loads(shown) == {"sender": "a@b.c", "port": 587, "api_key": MASK, "smtp_password": MASK}
    replaced = cli("configure", "welcome_email", "sender=x@y.z")
    assert replaced.returncode == 0, replaced.stderr
    assert secrets.host.store.get("welcome_email").config == {
        "sender": "x@y.z",
        "port": 25,
        "api_key": "real-key",
        "smtp_password": "hunter2",
    }
    assert cli("configure", "welcome_email", "--json", '{"api_key": "rotated"}').returncode == 0
    audit = cli("audit", "welcome_email")
    assert "(changed)" in audit.stdout and "rotated" not in audit.stdout and "real-key" not in audit.stdout
    assert cli("config", "welcome_email", "smtp_password").stdout.strip() == json.dumps(MASK)
    cleared = cli("configure", "welcome_email", "--merge", "smtp_password=null")
    assert cleared.returncode == 0, cleared.stderr
    assert cli("config", "welcome_email", "smtp_password").stdout.strip() == "null"  # unset, not "********"
    helptext = cli("configure", "--help").stdout
    assert "--merge" in helptext and "replace" in helptext.lower()


def test_errors_are_plugin_host_errors() -> None:
    assert issubclass(InvalidArgument, PluginHostError)
    assert InvalidArgument("x").args == ("x",)
