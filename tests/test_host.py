"""PluginHost in one process: every Go-API method, validation and errors (no worker)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from pydantic import BaseModel

from pluginhost import (
    CapabilityDisabled,
    CapabilityNotFound,
    ConcurrentUpdate,
    InvalidConfig,
    InvalidInput,
    InvalidPlugin,
    Kind,
    MemoryStore,
    Plugin,
    PluginHost,
    PluginNotFound,
)


class SmtpConfig(BaseModel):
    host: str = "localhost"
    port: int = 25


class Greeting(BaseModel):
    name: str


@pytest.fixture(params=["memory", "sqlite"])
def host(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[PluginHost]:
    app = Celery("unit", broker="memory://", backend="cache+memory://")
    store: Any = MemoryStore() if request.param == "memory" else f"sqlite:///{tmp_path / 'ph.db'}"
    h = PluginHost(app, store=store)

    @h.capability(
        "greet",
        plugin="email",
        config_model=SmtpConfig,
        input_model=Greeting,
        label_en="Greet",
        label_ar="تحية",
        sort=2,
    )
    def greet(payload: Greeting, ctx: Any) -> dict[str, Any]:
        return {"hello": payload.name, "via": f"{ctx.config.host}:{ctx.config.port}", "plugin": ctx.plugin.slug}

    @h.capability("echo", on_disabled="skip", sort=1)
    def echo(payload: dict[str, Any]) -> dict[str, Any]:
        return payload

    yield h
    h.store.close()


def test_declaring_creates_plugin_rows_on_first_use_only(tmp_path: Path) -> None:
    app = Celery("lazy", broker="memory://")
    db = tmp_path / "lazy.db"
    h = PluginHost(app, store=f"sqlite:///{db}")
    h.register_capability("noop", lambda payload: None)
    assert not db.exists()  # declaring touched nothing
    assert [p.slug for p in h.list()] == ["noop"]


def test_capabilities_are_named_celery_tasks(host: PluginHost) -> None:
    assert host.capabilities() == ["echo", "greet"]
    assert host.task("greet").name == "pluginhost.capability.greet"
    assert "pluginhost.capability.greet" in host.app.tasks
    assert host.task("greet").acks_late is True


def test_get_list_nav_and_is_enabled(host: PluginHost) -> None:
    assert host.get("email").label_ar == "تحية"
    assert host.get("missing") is None
    assert [p.slug for p in host.list()] == ["echo", "email"]
    host.register(Plugin(slug="menu", kind=Kind.ui, sort=0, label_en="Menu", label_ar="القائمة"))
    assert [p.slug for p in host.nav()] == ["menu", "echo", "email"]
    assert [p.slug for p in host.nav(kind="ui")] == ["menu"]
    host.disable("echo")
    assert [p.slug for p in host.nav()] == ["menu", "email"]
    assert host.is_enabled("email") and not host.is_enabled("echo") and not host.is_enabled("nope")


def test_call_capability_gets_live_config(host: PluginHost) -> None:
    assert host.call_capability("greet", {"name": "Ada"})["via"] == "localhost:25"
    host.configure("email", {"host": "mx", "port": "2525"})
    assert host.config_value("email", "port") == 2525  # validated and normalised
    assert host.call_capability("greet", {"name": "Ada"}) == {"hello": "Ada", "via": "mx:2525", "plugin": "email"}


def test_disable_blocks_dispatch_and_in_process_calls(host: PluginHost) -> None:
    host.disable("email", actor="ops")
    with pytest.raises(CapabilityDisabled, match="plugin 'email' is disabled"):
        host.run_capability("greet", {"name": "x"})
    with pytest.raises(CapabilityDisabled):
        host.call_capability("greet", {"name": "x"})
    host.disable("echo")
    assert host.call_capability("echo", {"a": 1}) is None  # on_disabled="skip"
    host.enable("email")
    assert host.call_capability("greet", {"name": "x"})["hello"] == "x"


@pytest.mark.parametrize(
    "payload, error, fragment",
    [
        ({"nam": "x"}, InvalidInput, "field 'name' is required"),
        ({"name": 5}, InvalidInput, "field 'name'"),
        ([1, 2], InvalidInput, "expected a JSON object"),
        ({"name": float("inf")}, InvalidInput, "finite"),
        ({"name": {1, 2}}, InvalidInput, "not JSON"),
    ],
)
def test_bad_input_is_rejected_before_dispatch(host: PluginHost, payload: Any, error: type, fragment: str) -> None:
    with pytest.raises(error, match=fragment):
        host.run_capability("greet", payload)


def test_unknown_capability(host: PluginHost) -> None:
    with pytest.raises(CapabilityNotFound, match="'nope'.*declared: echo, greet"):
        host.run_capability("nope", {})


def test_invalid_config_names_field_and_value_and_writes_nothing(host: PluginHost) -> None:
    before = host.get("email")
    with pytest.raises(InvalidConfig, match="field 'port'.*'abc'"):
        host.configure("email", {"port": "abc"})
    with pytest.raises(InvalidConfig, match="expected a JSON object"):
        host.configure("email", "port=25")  # type: ignore[arg-type]
    assert host.get("email") == before
    assert [a.action for a in host.audit("email")] == ["create"]


def test_admin_calls_validate_slugs_and_existence(host: PluginHost) -> None:
    with pytest.raises(InvalidPlugin):
        host.enable("Bad Slug")
    with pytest.raises(PluginNotFound):
        host.disable("ghost")
    with pytest.raises(InvalidPlugin):
        host.register({"slug": "x", "kind": "widget"})


def test_audit_records_actor_before_and_after(host: PluginHost) -> None:
    host.disable("email", actor="ana")
    host.set_sort("email", 9, actor="ben")
    entries = host.audit("email")
    assert [(e.action, e.actor) for e in entries][:2] == [("sort", "ben"), ("disable", "ana")]
    assert entries[0].changes() == {"sort": (2, 9)}
    assert host.audit(actor="ana")[0].action == "disable"


def test_expected_version_guards_against_lost_updates(host: PluginHost) -> None:
    v = host.get("email").version
    host.disable("email", expected_version=v)
    with pytest.raises(ConcurrentUpdate):
        host.enable("email", expected_version=v)
    assert not host.is_enabled("email")


def test_register_upserts_and_refreshes(host: PluginHost) -> None:
    host.register(Plugin(slug="email", enabled=False, sort=5, label_en="Mail"))
    p = host.get("email")
    assert (p.enabled, p.sort, p.label_en) == (False, 5, "Mail")


def test_with_store_swaps_the_source_of_truth(host: PluginHost) -> None:
    other = MemoryStore([Plugin(slug="email", enabled=False)])
    assert host.with_store(other) is host
    assert not host.is_enabled("email")
    assert host.get("echo") is not None  # declared capabilities are synced into the new store


def test_from_app_returns_the_attached_host(host: PluginHost) -> None:
    assert PluginHost.from_app(host.app) is host


def test_a_bad_declaration_fails_at_registration(host: PluginHost) -> None:
    with pytest.raises(InvalidPlugin, match="already declared"):
        host.register_capability("greet", lambda p: p)
    with pytest.raises(InvalidPlugin, match=r"\(payload\) or \(payload, ctx\)"):
        host.register_capability("three", lambda a, b, c: a)
    with pytest.raises(InvalidPlugin, match="on_disabled"):
        host.register_capability("pol", lambda p: p, on_disabled="explode")  # type: ignore[arg-type]
    with pytest.raises(InvalidPlugin, match="invalid capability slug"):
        host.register_capability("Bad", lambda p: p)


def test_refresh_after_a_change_made_by_another_host(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    a = PluginHost(Celery("a", broker="memory://"), store=url)
    b = PluginHost(Celery("b", broker="memory://"), store=url)
    a.register(Plugin(slug="shared"))
    assert b.is_enabled("shared")
    a.disable("shared")
    assert not b.is_enabled("shared")  # b checks the store revision before reading
    b.refresh()
    assert not b.get("shared").enabled


def test_pickle_is_refused_for_capabilities(host: PluginHost) -> None:
    from pluginhost.control import unsafe_serialisation

    with pytest.raises(InvalidPlugin, match="not pickle"):
        host.register_capability("pickled", lambda p: p, serializer="pickle")
    assert unsafe_serialisation(host.app) is None
    host.app.conf.accept_content = ["json", "pickle"]
    assert "accept_content includes pickle" in (unsafe_serialisation(host.app) or "")
