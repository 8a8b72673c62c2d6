"""The web console (pluginhost_web) through its HTTP interface: every JSON endpoint
and page, authentication, CSRF, escaping, secrets, metrics, the ``pluginhost web``
command, and admin changes acknowledged by a real worker."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
from celery import Celery
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from pluginhost import CapabilityDisabled
from pluginhost.embedded import embedded_conf
from pluginhost_web import NoCredentials, WebAuth, create_app
from tests import harness

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "test-token-0123456789abcdef"
USERS = {"ops": "ops-pass", "admin": "admin-pass"}
AUTH = WebAuth(users=USERS, token=TOKEN, secret=b"a-fixed-secret-for-the-tests-000")
BEARER = {"Authorization": f"Bearer {TOKEN}"}
HOSTILE = "<script>alert(1)</script>"
#: What a browser on the console's own page sends with every POST (TestClient's host is "testserver").
ORIGIN = "http://testserver"
EVIL = "http://attacker.example"
LOCAL = "http://127.0.0.1:8000"


# -- fixtures and helpers ---------------------------------------------------------


def _use(module: ModuleType, conf: dict[str, Any]) -> ModuleType:
    module.host.with_store(conf["pluginhost_store"])
    module.host.sync()
    module.flows.define(module.WELCOME)
    return module


@pytest.fixture
def web(tmp_path: Path) -> Iterator[ModuleType]:
    """The web test app on an embedded broker and store in tmp (no worker)."""
    from tests.apps import web_app as module

    conf = embedded_conf(tmp_path / "embedded")
    harness.configure_app(module.app, conf)
    yield _use(module, conf)
    module.host.store.close()
    harness.reset_app(module.app)


@pytest.fixture
def web_live(app_conf: dict[str, Any], configure_app: Any) -> Iterator[ModuleType]:
    """The web test app on this test's backend, for tests with real workers."""
    from tests.apps import web_app as module

    configure_app(module.app)
    yield _use(module, app_conf)
    module.host.store.close()


def browser(app: Any, origin: str | None = ORIGIN, **options: Any) -> TestClient:
    """A client that behaves like a browser on the console's page: it sends ``Origin``."""
    headers = {"Origin": origin} if origin else {}
    return TestClient(app, headers=headers, **options)


def console(module: ModuleType, **options: Any) -> TestClient:
    options = {"auth": AUTH, "ack_timeout_s": 0.2, "workers_timeout_s": 0.2, **options}
    return browser(create_app(module.host, flows=module.flows, **options))


def without_origin(source: TestClient, **options: Any) -> TestClient:
    """Another client on the same app with the same cookies but no ``Origin`` header."""
    bare = TestClient(source.app, **options)
    bare.cookies = source.cookies
    return bare


@dataclass
class Operator:
    """A logged-in browser session: cookie jar plus the session's CSRF token."""

    client: TestClient
    csrf: str

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return self.client.get(path, **kw)

    def post(self, path: str, **kw: Any) -> httpx.Response:
        headers = {"X-CSRF-Token": self.csrf, **kw.pop("headers", {})}
        return self.client.post(path, headers=headers, **kw)

    def form(self, path: str, data: dict[str, Any], **kw: Any) -> httpx.Response:
        return self.client.post(path, data={"csrf_token": self.csrf, **data}, **kw)


def form_token(html: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert found, "no CSRF field in the page"
    return found[1]


def log_in(client: TestClient, user: str = "ops", password: str | None = None) -> Operator:
    page = client.get("/login")
    response = client.post(
        "/login",
        data={"username": user, "password": password or USERS[user], "csrf_token": form_token(page.text)},
        follow_redirects=False,
    )
    assert response.status_code == 303, response.text
    return Operator(client, client.get("/api/session").json()["csrf_token"])


@pytest.fixture
def ops(web: ModuleType) -> Operator:
    return log_in(console(web))


def audit_ids(module: ModuleType) -> list[int]:
    return [e.id for e in module.host.audit(limit=1000)]


def metric(client: TestClient, name: str, **labels: str) -> float:
    text = client.get("/metrics", headers=BEARER).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


# -- authentication ----------------------------------------------------------------


def test_nothing_is_served_without_credentials(web: ModuleType) -> None:
    client = console(web)
    for path in ("/api/plugins", "/api/workers", "/api/runs", "/metrics", "/openapi.json"):
        response = client.get(path)
        assert response.status_code == 401, path
        assert response.json()["error"] == "NotAuthenticated"
        assert response.headers["www-authenticate"] == "Bearer"
    page = client.get("/plugins?x=1", follow_redirects=False)
    assert page.status_code == 303 and page.headers["location"] == "/login?next=%2Fplugins%3Fx%3D1"
    assert client.get("/api/plugins", headers={"Authorization": "Bearer wrong"}).status_code == 401
    before = audit_ids(web)
    assert client.post("/api/plugins/greet/disable").status_code == 401
    assert audit_ids(web) == before and web.host.is_enabled("greet")
    assert client.get("/static/console.css").status_code == 200  # the login page needs its style


def test_create_app_refuses_to_start_without_credentials(web: ModuleType) -> None:
    with pytest.raises(NoCredentials, match="pluginhost_web_users"):
        create_app(web.host, auth=WebAuth())
    with pytest.raises(NoCredentials, match="non-empty password"):
        WebAuth(users={"ops": ""})
    configured = Celery("configured", set_as_current=False)
    configured.conf.pluginhost_web_users = {"conf-user": "pw"}
    from_conf = WebAuth.from_app(configured, environ={"PLUGINHOST_WEB_TOKEN": "env-token"})
    assert dict(from_conf.users) == {"conf-user": "pw"} and from_conf.token == "env-token"
    env = {"PLUGINHOST_WEB_USER": "env-user", "PLUGINHOST_WEB_PASSWORD": "pw2"}
    assert dict(WebAuth.from_app(web.app, environ=env).users) == {"env-user": "pw2"}
    assert WebAuth.from_app(web.app, environ={}).configured is False
    with pytest.raises(NoCredentials):
        create_app(web.host)  # neither configuration nor environment has credentials


def local_console(module: ModuleType, host_name: str = "127.0.0.1:8000", origin: str | None = LOCAL) -> TestClient:
    """A ``--insecure-local`` console, asked from the loopback address for ``host_name``."""
    app = create_app(module.host, flows=module.flows, auth=WebAuth.local(), ack_timeout_s=0.2, workers_timeout_s=0.2)
    return browser(app, origin, base_url=f"http://{host_name}", client=("127.0.0.1", 40000))


def test_local_mode_serves_loopback_clients_only(web: ModuleType) -> None:
    local = local_console(web)
    assert browser(local.app, LOCAL, base_url=LOCAL).get("/api/plugins").status_code == 401  # client "testclient"
    assert local.get("/api/session").json()["user"] == "local"
    assert local.post("/api/plugins/greet/disable").status_code == 403  # CSRF still applies
    csrf = local.get("/api/session").json()["csrf_token"]
    assert local.post("/api/plugins/greet/disable", headers={"X-CSRF-Token": csrf}).status_code == 200
    assert web.host.audit("greet", limit=1)[0].actor == "local"


@pytest.mark.parametrize(
    "host_name", ["127.0.0.1:8000", "127.0.0.1", "localhost:8000", "LocalHost", "[::1]:8000", "127.0.0.2:9"]
)
def test_local_mode_accepts_loopback_host_names_with_any_port(web: ModuleType, host_name: str) -> None:
    local = local_console(web, host_name, origin=f"http://{host_name}")
    assert local.get("/api/session").json()["user"] == "local"
    csrf = local.get("/api/session").json()["csrf_token"]
    assert local.post("/api/plugins/greet/disable", headers={"X-CSRF-Token": csrf}).status_code == 200
    assert not web.host.is_enabled("greet")


@pytest.mark.parametrize(
    "host_name",
    [
        "attacker.example",
        "attacker.example:8000",
        "127.0.0.1.nip.io:8000",
        "app.localhost:8000",
        "localhost.attacker.example",
        "0.0.0.0:8000",
        "",
        "127.0.0.1:8000@attacker.example",
    ],
)
def test_local_mode_refuses_a_rebound_host_name(web: ModuleType, host_name: str) -> None:
    """DNS rebinding: attacker.example resolves to 127.0.0.1, so the browser's requests
    come from loopback, same-origin for the attacker's page (Origin matches Host)."""
    before = audit_ids(web)
    legit = local_console(web)
    csrf = legit.get("/api/session").json()["csrf_token"]  # the worst case: a valid cookie and token
    rebound = local_console(web, "placeholder", origin=f"http://{host_name}")
    rebound.cookies = legit.cookies
    headers = {"Host": host_name}
    for path in ("/api/session", "/plugins", "/login", "/static/console.css"):
        response = without_origin(rebound, client=("127.0.0.1", 40000)).get(path, headers=headers)
        assert response.status_code == 421, (path, response.status_code)
        assert "set-cookie" not in response.headers and "csrf" not in response.text.lower()
        assert "loopback" in response.text
    api = rebound.post("/api/plugins/greet/disable", headers={**headers, "X-CSRF-Token": csrf})
    assert api.status_code == 421 and api.json()["error"] == "HostNotAllowed"
    form = rebound.post("/plugins/greet/enabled", headers=headers, data={"enabled": "false", "csrf_token": csrf})
    assert form.status_code == 421 and "set-cookie" not in form.headers
    assert web.host.is_enabled("greet") and audit_ids(web) == before


def test_login_sets_a_signed_session_and_logout_ends_it(web: ModuleType) -> None:
    client = console(web)
    page = client.get("/login?next=/nav")
    wrong = client.post("/login", data={"username": "ops", "password": "nope", "csrf_token": form_token(page.text)})
    assert wrong.status_code == 401 and "Wrong user name or password" in wrong.text
    no_csrf = client.post("/login", data={"username": "ops", "password": USERS["ops"]})
    assert no_csrf.status_code == 403
    ok = client.post(
        "/login",
        data={
            "username": "ops",
            "password": USERS["ops"],
            "csrf_token": form_token(page.text),
            "next": "//evil.example/x",
        },
        follow_redirects=False,
    )
    assert ok.status_code == 303 and ok.headers["location"] == "/plugins"  # never off-site
    cookie = ok.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Path=/" in cookie
    assert client.get("/api/session").json() == {
        "user": "ops",
        "via": "session",
        "csrf_token": client.get("/api/session").json()["csrf_token"],
    }
    # a forged cookie (another user name, same signature) is no session at all
    value = client.cookies["pluginhost_session"]
    _body, stamp, mac = value.split(".")
    forged = json.dumps({"user": "admin", "csrf": "x"}).encode()
    client.cookies.clear()  # the forged cookie alone, not beside the real one (which one counts is up to the client)
    client.cookies.set("pluginhost_session", f"{base64.urlsafe_b64encode(forged).decode().rstrip('=')}.{stamp}.{mac}")
    assert client.get("/api/session").status_code == 401
    client.cookies.clear()
    operator = log_in(client)
    assert operator.form("/logout", {}, follow_redirects=False).status_code == 303
    assert client.get("/api/session").status_code == 401


# -- plugins -----------------------------------------------------------------------


def test_plugins_are_listed_in_order_with_secrets_masked(web: ModuleType, ops: Operator) -> None:
    plugins = ops.get("/api/plugins").json()
    assert [p["slug"] for p in plugins] == ["greet", "mailer", "report", "flaky"]
    mailer = ops.get("/api/plugins/mailer").json()
    assert mailer["config"]["smtp_password"] == "********" and mailer["label_ar"] == "البريد"
    page = ops.get("/plugins").text
    assert "hunter2" not in page and "hunter2" not in json.dumps(plugins)
    assert '<div class="label-ar" dir="rtl" lang="ar">البريد</div>' in page
    assert ops.get("/api/plugins/nope").json() == {"error": "PluginNotFound", "detail": "plugin 'nope' not found"}
    assert ops.get("/api/plugins/nope").status_code == 404


def test_enable_and_disable_record_the_user_and_report_acknowledgements(web: ModuleType, ops: Operator) -> None:
    response = ops.post("/api/plugins/greet/disable")
    assert response.status_code == 200
    body = response.json()
    assert body["plugin"]["enabled"] is False and body["acknowledged_by"] == []  # no worker here
    assert body["revision"] == web.host.revision
    assert not web.host.is_enabled("greet")
    assert web.host.audit("greet", limit=1)[0].actor == "ops"
    with pytest.raises(CapabilityDisabled):
        web.host.call_capability("greet", {})
    scripted = TestClient(ops.client.app).post("/api/plugins/greet/enable", headers=BEARER)
    assert scripted.status_code == 200 and web.host.is_enabled("greet")
    assert web.host.audit("greet", limit=1)[0].actor == "api-token"  # tokens need no CSRF token
    stale = ops.post("/api/plugins/greet/disable", json={"expected_version": 1})
    assert stale.status_code == 409 and stale.json()["error"] == "ConcurrentUpdate"
    # the page's switch posts a form and redirects back with a message
    page = ops.form("/plugins/greet/enabled", {"enabled": "false"}, follow_redirects=False)
    assert page.status_code == 303 and page.headers["location"] == "/plugins#plugin-greet"
    after = ops.get("/plugins").text
    assert "Disabled &#39;greet&#39;" in after and "no worker acknowledged" in after
    assert 'aria-label="greet enabled">Off</button>' in after


@pytest.mark.parametrize(
    "method, path, body",
    [
        ("post", "/api/plugins/nope/enable", None),
        ("post", "/api/plugins/nope/disable", None),
        ("post", "/api/plugins/nope/configure", {"config": {}}),
        ("post", "/api/plugins/nope/sort", {"sort": 3}),
        ("post", "/api/plugins/nope/move", {"direction": "up"}),
        ("get", "/api/plugins/nope/usage", None),
        ("get", "/api/plugins/nope/config-model", None),
        ("get", "/api/workflows/nope", None),
        ("get", "/api/workflows/nope/plan", None),
        ("get", "/api/runs/nope", None),
        ("post", "/api/runs/nope/resume", None),
    ],
)
def test_unknown_names_are_404_and_write_nothing(
    web: ModuleType, ops: Operator, method: str, path: str, body: Any
) -> None:
    before = audit_ids(web)
    response = getattr(ops, method)(path, **({"json": body} if body is not None else {}))
    assert response.status_code == 404, response.text
    assert response.json()["error"] in ("PluginNotFound", "WorkflowNotFound", "RunNotFound")
    assert audit_ids(web) == before


def test_bad_input_is_422_and_writes_nothing(web: ModuleType, ops: Operator) -> None:
    before, config = audit_ids(web), web.host.get("mailer").config
    invalid = ops.post("/api/plugins/mailer/configure", json={"config": {"smtp_port": "abc"}})
    assert invalid.status_code == 422
    assert invalid.json() == {
        "error": "InvalidConfig",
        "detail": "plugin 'mailer': field 'smtp_port' input should be a valid integer, "
        "unable to parse string as an integer, got 'abc'",
    }
    for bad in ({"config": [1, 2]}, {"config": {"x": 1}, "expected_version": "v"}, {}):
        response = ops.post("/api/plugins/mailer/configure", json=bad)
        assert response.status_code == 422 and response.json()["error"] == "InvalidInput"
    assert ops.post("/api/plugins/Bad%20Slug/sort", json={"sort": 1}).json()["error"] == "InvalidPlugin"
    assert ops.post("/api/plugins/greet/sort", json={"sort": "first"}).status_code == 422
    assert ops.get("/api/runs?status=bogus").status_code == 422
    assert ops.get("/api/nav?lang=fr").status_code == 422
    assert audit_ids(web) == before and web.host.get("mailer").config == config


@pytest.mark.parametrize("value", [str(2**40), str(2**31), str(-(2**31) - 1), "1.5", "abc", ""])
def test_a_bad_sort_on_the_page_or_the_api_is_4xx_and_writes_nothing(
    web: ModuleType, ops: Operator, value: str
) -> None:
    before = audit_ids(web)
    page = ops.form("/plugins/greet/sort", {"sort": value})
    assert 400 <= page.status_code < 500, (page.status_code, page.text[:200])
    assert "sort" in page.text and "Internal Server Error" not in page.text
    api = ops.post("/api/plugins/greet/sort", json={"sort": int(value) if value.lstrip("-").isdigit() else value})
    assert 400 <= api.status_code < 500 and api.json()["error"] == "InvalidInput", api.text
    assert web.host.get("greet").sort == 10 and audit_ids(web) == before


def test_every_plugin_host_error_maps_to_an_explicit_status() -> None:
    from pluginhost import errors as ph
    from pluginhost_web.errors import RunNotFound, WorkflowsNotConfigured, status_for
    from workflows.errors import InvalidRunState, InvalidWorkflow, WorkflowNotFound

    class InvalidArgument(ph.PluginHostError):
        """A bad-input error someone adds later, mapped by nobody yet."""

    class SlugGone(ph.PluginNotFound):
        pass

    class StoreTimedOut(ph.StoreUnavailable):
        pass

    expected = {
        ph.PluginNotFound: 404,
        ph.CapabilityNotFound: 404,
        RunNotFound: 404,
        WorkflowNotFound: 404,
        WorkflowsNotConfigured: 404,
        ph.InvalidPlugin: 422,
        ph.InvalidConfig: 422,
        ph.InvalidInput: 422,
        InvalidWorkflow: 422,
        InvalidRunState: 422,
        ph.ConcurrentUpdate: 409,
        ph.CapabilityDisabled: 409,
        ph.StoreUnavailable: 503,
        StoreTimedOut: 503,
        SlugGone: 404,
        InvalidArgument: 400,
        ph.PluginHostError: 400,
    }
    assert {cls: status_for(cls("x")) for cls in expected} == expected


def test_invalid_config_on_the_page_is_shown_next_to_the_field(web: ModuleType, ops: Operator) -> None:
    before = audit_ids(web)
    response = ops.form("/plugins/mailer/config", {"config": '{"smtp_port": "abc"}', "version": "1"})
    assert response.status_code == 422
    assert (
        'id="error-mailer" role="alert">InvalidConfig: plugin &#39;mailer&#39;: field &#39;smtp_port&#39;'
        in response.text
    )
    assert 'aria-describedby="error-mailer"' in response.text
    assert "{&#34;smtp_port&#34;: &#34;abc&#34;}</textarea>" in response.text  # the draft is kept
    broken = ops.form("/plugins/mailer/config", {"config": "{not json", "version": "1"})
    assert broken.status_code == 422 and "config is not valid JSON" in broken.text
    assert audit_ids(web) == before
    saved = ops.form(
        "/plugins/mailer/config", {"config": '{"smtp_port": 2525, "smtp_password": "********"}', "version": "1"}
    )
    assert saved.status_code == 200 and "Configured &#39;mailer&#39;" in saved.text
    assert web.host.get("mailer").config["smtp_port"] == 2525


def test_missing_csrf_token_is_403_and_writes_nothing(web: ModuleType, ops: Operator) -> None:
    before = audit_ids(web)
    client = ops.client
    assert client.post("/api/plugins/greet/disable").status_code == 403
    assert client.post("/api/plugins/greet/disable", headers={"X-CSRF-Token": "guess"}).status_code == 403
    assert client.post("/plugins/greet/enabled", data={"enabled": "false"}).status_code == 403
    assert client.post("/plugins/greet/sort", data={"sort": "5", "csrf_token": "guess"}).status_code == 403
    assert client.post("/api/plugins/mailer/configure", json={"config": {}}).json()["error"] == "CsrfFailed"
    assert audit_ids(web) == before and web.host.is_enabled("greet")


FOREIGN_ORIGINS = [
    {"Origin": EVIL},
    {"Origin": "null"},  # sandboxed frames, data: URLs
    {"Origin": "https://testserver"},  # same host, other scheme
    {"Origin": "http://testserver:8080"},  # same host, other port
    {"Origin": "http://testserver.attacker.example"},
    {"Referer": f"{EVIL}/page"},  # no Origin: the Referer's origin counts
]


def poster(mode: str, module: ModuleType) -> tuple[Any, str]:
    """A POST function for one auth mode (valid credentials and CSRF token) and its own origin."""
    if mode == "token":
        client = TestClient(
            create_app(module.host, flows=module.flows, auth=AUTH, ack_timeout_s=0.2, workers_timeout_s=0.2)
        )
        return (lambda path, headers, **kw: client.post(path, headers={**BEARER, **headers}, **kw)), ORIGIN
    if mode == "local":
        local = local_console(module)
        csrf = local.get("/api/session").json()["csrf_token"]
        client, own = without_origin(local, base_url=LOCAL, client=("127.0.0.1", 40000)), LOCAL
    else:
        operator = log_in(console(module))
        client, own, csrf = without_origin(operator.client), ORIGIN, operator.csrf
    if mode.endswith("form"):
        return (
            lambda path, headers, data=None, **kw: client.post(
                path.replace("/api/plugins/greet/disable", "/plugins/greet/enabled"),
                headers=headers,
                data={"enabled": "false", "csrf_token": csrf, **(data or {})},
                **kw,
            )
        ), own
    return (lambda path, headers, **kw: client.post(path, headers={"X-CSRF-Token": csrf, **headers}, **kw)), own


@pytest.mark.parametrize("mode", ["session", "session-form", "token", "local", "local-form"])
def test_a_cross_origin_post_is_refused_in_every_auth_mode(web: ModuleType, mode: str) -> None:
    post, own = poster(mode, web)
    before = audit_ids(web)
    for headers in FOREIGN_ORIGINS:
        response = post("/api/plugins/greet/disable", headers)
        assert response.status_code == 403, (headers, response.status_code, response.text[:200])
        assert "OriginRefused" in response.text and "does not match" in response.text
    assert web.host.is_enabled("greet") and audit_ids(web) == before
    assert post("/api/plugins/greet/disable", {"Origin": own}, follow_redirects=False).status_code in (200, 303)
    assert not web.host.is_enabled("greet") and len(audit_ids(web)) == len(before) + 1


@pytest.mark.parametrize("mode", ["session", "session-form", "local", "local-form"])
def test_a_cookie_post_needs_origin_or_referer_but_a_token_needs_neither(web: ModuleType, mode: str) -> None:
    post, own = poster(mode, web)
    before = audit_ids(web)
    refused = post("/api/plugins/greet/disable", {})
    assert refused.status_code == 403 and "OriginRefused" in refused.text and "no Origin" in refused.text
    assert web.host.is_enabled("greet") and audit_ids(web) == before
    # a same-origin page whose browser sent only the Referer
    assert post(
        "/api/plugins/greet/disable", {"Referer": f"{own}/plugins?x=1"}, follow_redirects=False
    ).status_code in (200, 303)
    assert not web.host.is_enabled("greet")
    script, _ = poster("token", web)
    assert script("/api/plugins/greet/enable", {}).status_code == 200 and web.host.is_enabled("greet")


def test_a_cross_origin_login_is_refused(web: ModuleType) -> None:
    client = console(web)
    token = form_token(client.get("/login").text)
    data = {"username": "ops", "password": USERS["ops"], "csrf_token": token}
    for sender, headers in ((client, {"Origin": EVIL}), (without_origin(client), {"Referer": f"{EVIL}/"})):
        response = sender.post("/login", data=data, headers=headers, follow_redirects=False)
        assert response.status_code == 403 and "OriginRefused" in response.text
        assert client.get("/api/session").status_code == 401  # not logged in
    assert without_origin(client).post("/login", data=data, follow_redirects=False).status_code == 403
    assert client.post("/login", data=data, follow_redirects=False).status_code == 303


def test_a_configured_origin_is_accepted_as_well(web: ModuleType) -> None:
    """Behind a proxy that terminates TLS the app sees http://, the browser sends https://."""
    auth = WebAuth(users=USERS, secret=AUTH.secret, origins=["https://Console.Example:443"])
    operator = log_in(console(web, auth=auth))
    proxied = operator.post("/api/plugins/greet/disable", headers={"Origin": "https://console.example"})
    assert proxied.status_code == 200 and not web.host.is_enabled("greet")
    assert operator.post("/api/plugins/greet/enable", headers={"Origin": "http://console.example"}).status_code == 403
    assert operator.post("/api/plugins/greet/enable").status_code == 200  # its own origin still counts
    configured = Celery("configured", set_as_current=False)
    configured.conf.pluginhost_web_users = {"u": "pw"}
    configured.conf.pluginhost_web_origins = ["https://a.example"]
    env = {"PLUGINHOST_WEB_ORIGINS": "https://b.example:8443, http://c.example"}
    assert WebAuth.from_app(configured, environ=env).origins == (
        "https://a.example",
        "https://b.example:8443",
        "http://c.example",
    )
    with pytest.raises(NoCredentials, match="'console.example/path'"):
        WebAuth(users=USERS, origins=["console.example/path"])


def test_a_masked_secret_sent_back_keeps_the_stored_secret(web: ModuleType, ops: Operator) -> None:
    response = ops.post(
        "/api/plugins/mailer/configure",
        json={"config": {"smtp_host": "smtp.local", "smtp_port": 587, "smtp_password": "********"}},
    )
    assert response.status_code == 200 and response.json()["plugin"]["config"]["smtp_password"] == "********"
    assert web.host.get("mailer").config == {"smtp_host": "smtp.local", "smtp_port": 587, "smtp_password": "hunter2"}
    ops.post("/api/plugins/mailer/configure", json={"config": {"smtp_password": "new-secret"}})
    assert web.host.get("mailer").config["smtp_password"] == "new-secret"
    # nested secrets under a plugin without a config model
    ops.post("/api/plugins/report/configure", json={"config": {"db": {"url": "x", "password": "p1"}, "api_key": "k1"}})
    ops.post(
        "/api/plugins/report/configure",
        json={"config": {"db": {"url": "y", "password": "********"}, "api_key": "********"}},
    )
    assert web.host.get("report").config == {"db": {"url": "y", "password": "p1"}, "api_key": "k1"}
    for text in (ops.get("/plugins").text, ops.get("/audit").text, json.dumps(ops.get("/api/audit").json())):
        assert "new-secret" not in text and "hunter2" not in text and "p1" not in text and "k1" not in text


def test_sort_and_moves_reorder_the_navigation(web: ModuleType, ops: Operator) -> None:
    arabic = lambda: [i["label"] for i in ops.get("/api/nav?lang=ar").json()["items"]]  # noqa: E731
    assert arabic() == ["تحية", "البريد", "تقرير", "خطوة متقلبة"]
    assert ops.post("/api/plugins/flaky/sort", json={"sort": 1}).json()["plugin"]["sort"] == 1
    assert arabic()[0] == "خطوة متقلبة"
    assert ops.post("/api/plugins/report/move", json={"direction": "up"}).status_code == 200
    assert [p.slug for p in web.host.nav()] == ["flaky", "greet", "report", "mailer"]
    ops.form("/plugins/report/move", {"direction": "down"})
    assert [p.slug for p in web.host.nav()] == ["flaky", "greet", "mailer", "report"]
    ops.form("/plugins/flaky/sort", {"sort": "99", "version": str(web.host.get("flaky").version)})
    assert web.host.get("flaky").sort == 99
    assert web.host.audit("flaky", limit=1)[0].action == "sort"
    nav = ops.get("/api/nav?lang=ar").json()
    assert nav["dir"] == "rtl" and nav["items"][-1]["slug"] == "flaky"
    assert ops.get("/api/nav").json()["items"][0] == {
        "slug": "greet",
        "kind": "capability",
        "sort": 10,
        "label": "Greeting",
    }
    page = ops.get("/nav").text
    assert '<section class="menu menu-ar" dir="rtl" lang="ar">' in page
    assert page.index('data-slug="mailer"><a href="#mailer">البريد') < page.index(
        'data-slug="flaky"><a href="#flaky">خطوة'
    )


def nav_order(module: ModuleType) -> list[str]:
    return [p.slug for p in module.host.list()]


def test_a_move_with_tied_sort_weights_moves_exactly_one_row(web: ModuleType, ops: Operator) -> None:
    """Four plugins at sort 0 are ordered by slug; one move swaps two neighbours only."""
    for slug in ("greet", "mailer", "report", "flaky"):
        web.host.set_sort(slug, 0)
    assert nav_order(web) == ["flaky", "greet", "mailer", "report"]
    before = len(audit_ids(web))
    moved = ops.post("/api/plugins/flaky/move", json={"direction": "down"})
    assert moved.status_code == 200 and moved.json()["plugin"]["slug"] == "flaky"
    assert nav_order(web) == ["greet", "flaky", "mailer", "report"]  # one row, not to row 4
    # the new order is renumbered (each weight raised only as far as needed), audited as sorts
    assert [(p.slug, p.sort) for p in web.host.list()] == [("greet", 0), ("flaky", 1), ("mailer", 2), ("report", 3)]
    entries = web.host.audit(limit=len(audit_ids(web)) - before)
    assert sorted((e.slug, e.action, e.actor) for e in entries) == [
        ("flaky", "sort", "ops"),
        ("mailer", "sort", "ops"),
        ("report", "sort", "ops"),
    ]
    ops.form("/plugins/report/move", {"direction": "up"})  # distinct weights now: a swap
    assert [(p.slug, p.sort) for p in web.host.list()] == [("greet", 0), ("flaky", 1), ("report", 2), ("mailer", 3)]
    # a third plugin tied with the neighbour: swapping the two weights alone would jump past it
    web.host.set_sort("greet", 5)
    web.host.set_sort("flaky", 7)
    web.host.set_sort("report", 7)
    web.host.set_sort("mailer", 9)
    assert nav_order(web) == ["greet", "flaky", "report", "mailer"]
    ops.post("/api/plugins/report/move", json={"direction": "up"})
    assert nav_order(web) == ["greet", "report", "flaky", "mailer"]
    for direction in ("up", "down", "down", "down", "up"):
        order = nav_order(web)
        ops.post("/api/plugins/greet/move", json={"direction": direction})
        index = order.index("greet")
        other = max(index - 1, 0) if direction == "up" else min(index + 1, len(order) - 1)
        order[index], order[other] = order[other], order[index]
        assert nav_order(web) == order, direction


def test_a_move_with_no_room_left_writes_nothing(web: ModuleType, ops: Operator) -> None:
    top = 2**31 - 1
    for slug in ("greet", "mailer", "report", "flaky"):
        web.host.set_sort(slug, top)
    before = audit_ids(web)
    refused = ops.post("/api/plugins/flaky/move", json={"direction": "down"})
    assert refused.status_code == 400 and refused.json()["error"] == "InvalidArgument"
    assert "no room to move 'flaky'" in refused.json()["detail"]
    assert audit_ids(web) == before and nav_order(web) == ["flaky", "greet", "mailer", "report"]
    page = ops.form("/plugins/flaky/move", {"direction": "down"})
    assert page.status_code == 400 and "no room to move" in page.text and audit_ids(web) == before


def test_a_plugin_shows_its_config_model_and_which_secrets_are_set(web: ModuleType, ops: Operator) -> None:
    view = ops.get("/api/plugins/mailer/config-model").json()
    assert view["model"] == "MailerConfig" and view["problem"] is None
    assert view["fields"] == [
        {
            "name": "smtp_host",
            "type": "str",
            "required": False,
            "default": "mail.example.com",
            "secret": False,
            "is_set": None,
        },
        {"name": "smtp_port", "type": "int", "required": False, "default": 25, "secret": False, "is_set": None},
        {
            "name": "smtp_password",
            "type": "str",
            "required": False,
            "default": "********",
            "secret": True,
            "is_set": True,
        },
    ]
    assert ops.get("/api/plugins/greet/config-model").json() == {
        "slug": "greet",
        "model": None,
        "fields": [],
        "problem": None,
    }
    html = ops.get("/plugins").text
    mailer = html[html.index('id="plugin-mailer"') : html.index('id="plugin-report"')]
    assert '<code class="name">smtp_port</code> <span class="type">int</span>' in mailer
    assert "default <code>25</code>" in mailer
    assert '<span class="secret secret-set">secret, set</span>' in mailer and "hunter2" not in html
    greet = html[html.index('id="plugin-greet"') : html.index('id="plugin-mailer"')]
    assert "<textarea" not in greet and "No config model" in greet  # nothing to configure
    ops.post("/api/plugins/mailer/configure", json={"config": {"smtp_password": ""}})
    unset = ops.get("/plugins").text
    assert '<span class="secret secret-unset">secret, not set</span>' in unset
    assert ops.get("/api/plugins/mailer/config-model").json()["fields"][2]["is_set"] is False
    # a model-less plugin that does hold config keeps its free-form editor
    ops.post("/api/plugins/report/configure", json={"config": {"note": "x"}})
    html = ops.get("/plugins").text
    report = html[html.index('id="plugin-report"') : html.index('id="plugin-flaky"')]
    assert "<textarea" in report and "any JSON object is stored" in report
    # a stored config the model refuses (written before the model changed): said, still editable
    web.host.store.update("mailer", {"config": {"smtp_port": "abc"}}, action="configure")
    broken = ops.get("/api/plugins/mailer/config-model").json()
    assert broken["model"] == "unknown" and "field 'smtp_port'" in broken["problem"]
    html = ops.get("/plugins").text
    mailer = html[html.index('id="plugin-mailer"') : html.index('id="plugin-report"')]
    assert '<p class="error">plugin &#39;mailer&#39;: field &#39;smtp_port&#39;' in mailer and "<textarea" in mailer


def test_disabling_on_the_page_asks_first_with_what_uses_the_plugin(web: ModuleType, ops: Operator) -> None:
    before = audit_ids(web)
    html = ops.get("/plugins").text
    greet = html[html.index('id="plugin-greet"') : html.index('id="plugin-mailer"')]
    assert '<form method="get" action="/plugins/greet/disable">' in greet  # the switch asks first
    usage = ops.get("/api/plugins/flaky/usage").json()
    assert usage == {
        "slug": "flaky",
        "enabled": True,
        "capabilities": ["flaky"],
        "workflows": [{"name": "welcome", "steps": {"flaky": "fail"}}],
    }
    confirm = ops.get("/plugins/flaky/disable")
    assert confirm.status_code == 200
    assert re.search(r"1 capability and 1\s+workflow use this plugin", confirm.text)
    assert "step <code>flaky</code>\n    fails the run" in confirm.text
    assert 'action="/plugins/flaky/enabled"' in confirm.text and 'name="enabled" value="false"' in confirm.text
    assert 'href="/plugins#plugin-flaky">Cancel</a>' in confirm.text
    assert audit_ids(web) == before and web.host.is_enabled("flaky")  # asking writes nothing
    web.host.register({"slug": "banner", "kind": "ui"})
    assert re.search(r"0 capabilities and 0\s+workflows", ops.get("/plugins/banner/disable").text)
    assert ops.get("/plugins/nope/disable").status_code == 404
    done = ops.form("/plugins/flaky/enabled", {"enabled": "false", "version": str(web.host.get("flaky").version)})
    assert done.status_code == 200 and not web.host.is_enabled("flaky")


def test_hostile_labels_slugs_and_config_are_escaped(web: ModuleType, ops: Operator) -> None:
    web.host.register(
        {
            "slug": "evil",
            "kind": "ui",
            "label_en": HOSTILE,
            "label_ar": HOSTILE,
            "config": {"note": "</textarea><script>alert(2)</script>"},
        }
    )
    for path in ("/plugins", "/nav", "/audit"):
        html = ops.get(path).text
        assert "<script>alert" not in html, path
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in ops.get("/plugins").text
    assert "&lt;/textarea&gt;&lt;script&gt;alert(2)" in ops.get("/plugins").text
    assert ops.get("/api/plugins/evil").json()["label_en"] == HOSTILE  # JSON is data, not markup
    error_page = ops.form("/plugins/%3Cimg%20src%3Dx%20onerror%3Dalert(3)%3E/enabled", {"enabled": "true"})
    assert error_page.status_code == 422 and "InvalidPlugin" in error_page.text
    assert "<img src=x" not in error_page.text and "&lt;img src=x onerror=alert(3)&gt;" in error_page.text
    csp = ops.get("/plugins").headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp


def test_workers_view_compares_revisions(web: ModuleType, ops: Operator) -> None:
    view = ops.get("/api/workers").json()
    assert view == {"revision": web.host.revision, "workers": []}
    assert "No worker answered" in ops.get("/plugins").text


# -- audit -------------------------------------------------------------------------


def test_audit_filters_by_plugin_and_actor_and_shows_changes(web: ModuleType, ops: Operator) -> None:
    admin = log_in(browser(ops.client.app), "admin")
    ops.post("/api/plugins/greet/disable")
    admin.post("/api/plugins/greet/enable")
    ops.post("/api/plugins/report/sort", json={"sort": 5})
    rows = ops.get("/api/audit?slug=greet&actor=ops").json()
    assert [(r["slug"], r["actor"], r["action"]) for r in rows] == [("greet", "ops", "disable")]
    assert rows[0]["changes"] == {"enabled": [True, False]}
    assert rows[0]["summary"] == "enabled: true -> false"
    assert [r["actor"] for r in ops.get("/api/audit?slug=greet").json()][:2] == ["admin", "ops"]
    assert {r["slug"] for r in ops.get("/api/audit?actor=ops").json()} == {"greet", "report"}
    assert len(ops.get("/api/audit?limit=2").json()) == 2
    assert ops.get("/api/audit?limit=0").status_code == 422
    page = ops.get("/audit?slug=report&actor=ops").text
    assert '<td class="actor">ops</td>' in page and '<th scope="row">sort</th>' in page
    assert '<option value="report" selected>' in page and "greet</td>" not in page


# -- workflows ---------------------------------------------------------------------


def test_workflows_show_a_diagram_and_a_dry_run(web: ModuleType, ops: Operator) -> None:
    web.host.disable("report")
    web.host.disable("flaky")
    [view] = ops.get("/api/workflows").json()
    assert view["name"] == "welcome" and view["version"] == 1
    assert [(s["slug"], s["stage"], s["outcome"]) for s in view["plan"]] == [
        ("greet", 0, "run"),
        ("mailer", 1, "run"),
        ("report", 1, "skip"),
        ("flaky", 2, "fail"),
    ]
    assert ops.get("/api/workflows/welcome/plan").json() == view["plan"]
    assert ops.get("/api/workflows/welcome").json() == view
    svg = ops.get("/api/workflows/welcome/diagram.svg")
    assert svg.headers["content-type"] == "image/svg+xml"
    states = re.findall(r'data-slug="([^"]+)" data-state="([^"]+)"', svg.text)
    assert states == [("greet", "run"), ("mailer", "run"), ("report", "skip"), ("flaky", "fail")]
    assert svg.text.count("<line ") == 4  # greet fans out to two branches, both join into flaky
    page = ops.get("/workflows").text
    assert '<svg xmlns="http://www.w3.org/2000/svg" class="diagram"' in page
    assert '<td class="outcome-fail">fail</td>' in page


def test_runs_are_listed_filtered_and_shown(web: ModuleType, ops: Operator) -> None:
    run_id, _canvas = web.flows.prepare("welcome", {"name": "Ada", "token": "s3cret"})  # recorded, not sent
    runs = ops.get("/api/runs?status=pending").json()
    assert [r["id"] for r in runs] == [run_id]
    assert ops.get("/api/runs?status=failed").json() == []
    assert ops.get("/api/runs?name=welcome").json()[0]["status"] == "pending"
    detail = ops.get(f"/api/runs/{run_id}").json()
    assert [(s["slug"], s["status"], s["attempts"]) for s in detail["steps"]] == [
        ("greet", "pending", 0),
        ("mailer", "pending", 0),
        ("report", "pending", 0),
        ("flaky", "pending", 0),
    ]
    assert detail["input"] == {"name": "Ada", "token": "********"}
    page = ops.get(f"/runs/{run_id}").text
    assert run_id in page and "s3cret" not in page and "Resume" not in page  # only failed runs resume
    resumed = ops.post(f"/api/runs/{run_id}/resume")
    assert resumed.status_code == 422 and resumed.json()["error"] == "InvalidRunState"
    assert f'data-run="{run_id}"' in ops.get("/runs?status=pending").text
    assert "No runs match" in ops.get("/runs?status=succeeded").text


def test_the_workflow_table_shows_each_steps_on_disabled_and_retries(web: ModuleType, ops: Operator) -> None:
    web.flows.define(
        {
            "name": "retrying",
            "steps": [
                {"slug": "greet", "on_disabled": "fail", "retries": 3, "timeout": 30},
                {"slug": "report"},
            ],
        }
    )
    plan = ops.get("/api/workflows/retrying/plan").json()
    assert [(s["slug"], s["on_disabled"], s["retries"], s["timeout"]) for s in plan] == [
        ("greet", "fail", 3, 30.0),
        ("report", "skip", 0, None),
    ]
    html = ops.get("/workflows").text
    section = html[html.index('id="workflow-retrying"') :]
    row = section[section.index('<tr data-slug="greet">') :]
    row = row[: row.index("</tr>")]
    assert '<td class="on-disabled" data-label="On disabled">fail</td>' in row
    assert '<td class="retries" data-label="Retries">3</td>' in row and ">30 s</td>" in row


def test_every_page_answers_json_when_asked_for_it(web: ModuleType, ops: Operator) -> None:
    """The README's "every page is also a JSON endpoint": Accept: application/json."""
    run_id, _canvas = web.flows.prepare("welcome", {"name": "Ada"})
    as_json = {"Accept": "application/json"}
    for page, api in [
        ("/plugins", "/api/plugins"),
        ("/audit?slug=greet&limit=5", "/api/audit?slug=greet&limit=5"),
        ("/workflows", "/api/workflows"),
        ("/runs?status=pending", "/api/runs?status=pending"),
        (f"/runs/{run_id}", f"/api/runs/{run_id}"),
        ("/plugins/greet/disable", "/api/plugins/greet/usage"),
    ]:
        response = ops.get(page, headers=as_json)
        assert response.headers["content-type"] == "application/json", page
        assert response.json() == ops.get(api).json(), page
        assert "Accept" in response.headers["vary"]
    menus = ops.get("/nav", headers=as_json).json()
    assert menus == [ops.get("/api/nav?lang=en").json(), ops.get("/api/nav?lang=ar").json()]
    browser_accept = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}
    for accept in (browser_accept, {"Accept": "*/*"}, {}):
        assert ops.get("/plugins", headers=accept).headers["content-type"].startswith("text/html"), accept
    assert ops.get("/plugins", headers={"Accept": "application/json;q=0.5, text/html"}).text.startswith("<!doctype")
    missing = ops.get("/runs/nope", headers=as_json)
    assert missing.status_code == 404 and missing.json() == {"error": "RunNotFound", "detail": "no workflow run 'nope'"}
    bad = ops.form("/plugins/mailer/config", {"config": "{not json"}, headers=as_json)
    assert bad.status_code == 422 and bad.json()["error"] == "InvalidConfig"
    anonymous = TestClient(ops.client.app).get("/plugins", headers=as_json, follow_redirects=False)
    assert anonymous.status_code == 401 and anonymous.json()["error"] == "NotAuthenticated"
    assert TestClient(ops.client.app).get("/runs", headers={**as_json, **BEARER}).json()[0]["id"] == run_id


def test_an_error_page_links_back_to_where_one_came_from(web: ModuleType, ops: Operator) -> None:
    back = lambda html: re.search(r'<a [^>]*href="([^"]*)">(Back[^<]*)</a>', html).groups()  # noqa: E731
    assert back(ops.get("/runs/nope").text) == ("/runs", "Back to the runs")
    came_from = {"Referer": "http://testserver/runs?status=failed"}
    assert back(ops.get("/runs/nope", headers=came_from).text) == ("/runs?status=failed", "Back to the runs")
    assert back(ops.get("/runs/nope", headers={"Referer": f"{EVIL}/runs"}).text) == ("/runs", "Back to the runs")
    assert back(ops.get("/plugins/nope/disable").text) == ("/plugins", "Back to the plugins")
    assert back(ops.get("/nope").text) == ("/plugins", "Back to the plugins")
    run_id, _canvas = web.flows.prepare("welcome", {})
    refused = ops.form(f"/runs/{run_id}/resume", {}, headers={"Referer": f"http://testserver/runs/{run_id}"})
    assert refused.status_code == 422 and back(refused.text) == (f"/runs/{run_id}", "Back")


def test_a_console_without_workflows_hides_them(web: ModuleType) -> None:
    client = browser(create_app(web.host, auth=AUTH, ack_timeout_s=0.2, workers_timeout_s=0.2))
    assert client.get("/api/workflows", headers=BEARER).status_code == 404
    assert client.get("/api/plugins", headers=BEARER).status_code == 200
    ops = log_in(client)
    assert 'href="/workflows"' not in ops.get("/plugins").text


# -- schema, metrics, mounting -----------------------------------------------------


def test_openapi_describes_the_api(ops: Operator) -> None:
    schema = ops.get("/openapi.json").json()
    for path in (
        "/api/plugins",
        "/api/plugins/{slug}/enable",
        "/api/plugins/{slug}/disable",
        "/api/plugins/{slug}/configure",
        "/api/plugins/{slug}/sort",
        "/api/nav",
        "/api/workers",
        "/api/audit",
        "/api/workflows",
        "/api/workflows/{name}/plan",
        "/api/runs",
        "/api/runs/{run_id}",
        "/api/runs/{run_id}/resume",
    ):
        assert path in schema["paths"], path
    assert "/plugins" not in schema["paths"] and "/login" not in schema["paths"]


def test_metrics_count_capability_runs(web: ModuleType, ops: Operator) -> None:
    client = ops.client
    before = {
        "executed": metric(client, "pluginhost_executed_total", capability="greet"),
        "dispatched": metric(client, "pluginhost_dispatched_total", capability="report"),
        "refused": metric(client, "pluginhost_refused_total", capability="report", where="dispatch"),
    }
    for _ in range(3):
        assert web.host.call_capability("greet", {"name": "x"}) == {"greeting": "hello x"}
    web.host.run_capability("report", {})
    web.host.run_capability("report", {})
    ops.post("/api/plugins/report/disable")
    for _ in range(2):
        with pytest.raises(CapabilityDisabled):
            web.host.run_capability("report", {})
    assert metric(client, "pluginhost_executed_total", capability="greet") == before["executed"] + 3
    assert metric(client, "pluginhost_dispatched_total", capability="report") == before["dispatched"] + 2
    assert metric(client, "pluginhost_refused_total", capability="report", where="dispatch") == before["refused"] + 2
    assert client.get("/metrics").status_code == 200  # the session works too


def test_metrics_merge_a_multiprocess_folder(
    web: ModuleType, ops: Operator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "prom"
    folder.mkdir()
    code = "from pluginhost import metrics\nfor _ in range(4): metrics.executed('mp_probe')"
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(folder)}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, cwd=ROOT)  # as a pool child would
    assert metric(ops.client, "pluginhost_executed_total", capability="mp_probe") == 0  # not this process's
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(folder))
    assert metric(ops.client, "pluginhost_executed_total", capability="mp_probe") == 4


def test_the_console_works_mounted_under_a_prefix(web: ModuleType) -> None:
    site = FastAPI()
    site.mount("/console", create_app(web.host, flows=web.flows, auth=AUTH, ack_timeout_s=0.2, workers_timeout_s=0.2))
    client = browser(site)
    assert (
        client.get("/console/plugins", follow_redirects=False).headers["location"] == "/console/login?next=%2Fplugins"
    )
    page = client.get("/console/login")
    assert 'action="/console/login"' in page.text and 'href="/console/static/console.css"' in page.text
    done = client.post(
        "/console/login",
        data={"username": "ops", "password": USERS["ops"], "csrf_token": form_token(page.text)},
        follow_redirects=False,
    )
    assert done.headers["location"] == "/console/plugins" and "Path=/console" in done.headers["set-cookie"]
    html = client.get("/console/plugins").text
    assert 'action="/console/plugins/greet/disable"' in html and 'href="/console/audit"' in html  # asks first
    assert 'action="/console/plugins/greet/sort"' in html
    assert client.get("/console/api/plugins").status_code == 200
    assert client.get("/console/api/plugins/nope").status_code == 404
    assert client.get("/console/api/nope").json() == {"error": "NotFound", "detail": "Not Found"}
    assert client.get("/console/nope").status_code == 404


# -- with a real worker ------------------------------------------------------------


@pytest.mark.parametrize("backend", ["embedded"], indirect=True)
def test_a_toggle_from_the_console_is_acknowledged_by_a_real_worker(web_live: ModuleType, workers: Any) -> None:
    worker = workers("tests.apps.web_app", pool="solo")
    ops = log_in(console(web_live, ack_timeout_s=1.0, workers_timeout_s=1.0))
    assert web_live.host.run_capability("greet", {"name": "w"}).get(timeout=20) == {"greeting": "hello w"}
    body = ops.post("/api/plugins/greet/disable").json()
    assert body["acknowledged_by"] == [worker.hostname]
    view = ops.get("/api/workers").json()
    assert view["revision"] == web_live.host.revision
    assert [(w["hostname"], w["revision"], w["current"]) for w in view["workers"]] == [
        (worker.hostname, view["revision"], True)
    ]
    with pytest.raises(CapabilityDisabled):
        web_live.host.run_capability("greet", {})
    with pytest.raises(CapabilityDisabled):
        web_live.host.task("greet").delay({}).get(timeout=20)  # bypassing dispatch: the worker refuses
    page = ops.form("/plugins/greet/enabled", {"enabled": "true"})
    assert f'acknowledged by <span class="acks">{worker.hostname}</span>' in page.text
    assert f'data-hostname="{worker.hostname}"' in page.text and '<td class="ok">current</td>' in page.text
    # a failed run resumed through the API finishes
    ops.post("/api/plugins/flaky/configure", json={"config": {"fail": True}})
    failed = web_live.flows.start("welcome", {"name": "r"})
    assert harness.wait_until(lambda: ops.get(f"/api/runs/{failed.id}").json()["status"] == "failed", 30, 0.1)
    ops.post("/api/plugins/flaky/configure", json={"config": {"fail": False}})
    assert ops.post(f"/api/runs/{failed.id}/resume").json() == {"run_id": failed.id, "status": "resumed"}
    assert harness.wait_until(lambda: ops.get(f"/api/runs/{failed.id}").json()["status"] == "succeeded", 30, 0.1)
    assert ops.get("/api/runs?status=succeeded&name=welcome").json()[0]["id"] == failed.id


@pytest.mark.parametrize("backend", ["embedded"], indirect=True)
def test_a_failed_run_shows_what_its_steps_added_and_a_skip_is_a_note(web_live: ModuleType, workers: Any) -> None:
    workers("tests.apps.web_app", pool="solo")
    ops = log_in(console(web_live))
    web_live.host.disable("report")
    web_live.host.configure("flaky", {"fail": True})
    run_id = web_live.flows.start("welcome", {"name": "Ada", "token": "s3cret"}).id
    assert harness.wait_until(lambda: ops.get(f"/api/runs/{run_id}").json()["status"] == "failed", 30, 0.1)
    detail = ops.get(f"/api/runs/{run_id}").json()
    assert detail["input"] == {"name": "Ada", "token": "********"}
    assert detail["context"] == {
        "name": "Ada",
        "token": "********",
        "greeting": "hello Ada",
        "mailed_via": "mail.example.com",
    }
    steps = {s["slug"]: s for s in detail["steps"]}
    assert (steps["report"]["status"], steps["report"]["error"]) == ("skipped", None)
    assert steps["report"]["note"] == "plugin 'report' is disabled"
    assert steps["greet"]["output"] == {"greeting": "hello Ada"}
    assert "flaky is configured to fail" in steps["flaky"]["error"] and steps["flaky"]["note"] is None
    html = ops.get(f"/runs/{run_id}").text
    assert '<td class="note" data-label="Note">plugin &#39;report&#39; is disabled</td>' in html
    assert '<li data-slug="mailer"><code>mailer</code> added <code>{&#34;mailed_via&#34;' in html
    assert "&#34;greeting&#34;: &#34;hello Ada&#34;" in html and "s3cret" not in html


# -- the `pluginhost web` command --------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ConsoleProcess:
    """``pluginhost --app tests.apps.web_app web`` in a subprocess (its own process group)."""

    def __init__(self, conf: dict[str, Any], *args: str, env: dict[str, str] | None = None, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        child_env = {k: v for k, v in os.environ.items() if not k.startswith("PLUGINHOST_WEB_")}
        child_env.update({harness.PH_CONF_ENV: json.dumps(conf), "PYTHONPATH": str(ROOT), **(env or {})})
        self.argv = [
            str(Path(sys.executable).with_name("pluginhost")),
            "web",
            "--app",
            "tests.apps.web_app",
            "--port",
            str(self.port),
            *args,
        ]
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                cwd=ROOT,
                env=child_env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_ready(self, timeout: float = 30.0) -> ConsoleProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"console exited with {self.proc.returncode}:\n{self.log()}")
            try:
                httpx.get(f"{self.url}/static/console.css", timeout=1.0)
                return self
            except httpx.TransportError:
                time.sleep(0.1)
        raise AssertionError(f"console did not answer within {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def run_console(conf: dict[str, Any], *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLUGINHOST_WEB_")}
    env.update({harness.PH_CONF_ENV: json.dumps(conf), "PYTHONPATH": str(ROOT)})
    argv = [str(Path(sys.executable).with_name("pluginhost")), "--app", "tests.apps.web_app", "web", *args]
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def test_the_web_command_refuses_to_start_without_credentials(tmp_path: Path) -> None:
    conf = embedded_conf(tmp_path / "embedded")
    refused = run_console(conf, "--port", str(free_port()))
    assert refused.returncode == 1
    assert refused.stderr.startswith("error: NoCredentials: no console credentials") and refused.stderr.count("\n") == 1
    exposed = run_console(conf, "--insecure-local", "--host", "0.0.0.0", "--port", str(free_port()))
    assert exposed.returncode == 1 and "--insecure-local serves only 127.0.0.1" in exposed.stderr


def test_the_web_command_serves_the_console(tmp_path: Path) -> None:
    conf = embedded_conf(tmp_path / "embedded")
    server = ConsoleProcess(conf, env={"PLUGINHOST_WEB_TOKEN": TOKEN}, log_path=tmp_path / "console.log")
    try:
        server.wait_ready()
        assert httpx.get(f"{server.url}/api/plugins").status_code == 401
        plugins = httpx.get(f"{server.url}/api/plugins", headers=BEARER).json()
        assert [p["slug"] for p in plugins] == ["greet", "mailer", "report", "flaky"]
        assert httpx.get(f"{server.url}/api/runs", headers=BEARER).json() == []  # found the Workflows
    finally:
        server.stop()
    local = ConsoleProcess(conf, "--insecure-local", log_path=tmp_path / "local.log")
    try:
        local.wait_ready()
        assert httpx.get(f"{local.url}/api/session").json()["user"] == "local"
        rebound = {"Host": f"attacker.example:{local.port}", "Origin": f"http://attacker.example:{local.port}"}
        refused = httpx.get(f"{local.url}/api/session", headers=rebound)
        assert refused.status_code == 421 and "set-cookie" not in refused.headers and "csrf" not in refused.text
        assert httpx.post(f"{local.url}/api/plugins/greet/disable", headers=rebound).status_code == 421
        assert httpx.get(f"{local.url}/api/plugins/greet").json()["enabled"] is True
    finally:
        local.stop()
