"""The web console in headless Chromium, served by ``pluginhost web`` in a subprocess,
next to real Celery workers: what an operator clicks is what the workers do.

Needs Debian's ``chromium`` (``/usr/bin/chromium``) and the ``playwright`` package
(its own browser download is not used). Missing: skipped, or a failure under CI=true.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from pluginhost import CapabilityDisabled
from tests.test_web import HOSTILE, ConsoleProcess

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOTS = ROOT / "docs" / "screenshots"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
USER, PASSWORD = "ops", "ops-browser-pass"

pytestmark = pytest.mark.parametrize("backend", ["embedded"], indirect=True)


def _missing() -> str | None:
    if not Path(CHROMIUM).exists():
        return f"{CHROMIUM} is missing (apt-get install -y chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is missing (pip install playwright)"
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Debian Chromium driven by Playwright (one per module)."""
    missing = _missing()
    if missing:
        if os.environ.get("CI", "").strip().lower() == "true":
            pytest.fail(f"CI=true and the browser tests cannot run: {missing}")
        pytest.skip(f"browser tests need Chromium: {missing}")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def web(app_conf: dict[str, Any], configure_app: Any) -> Iterator[ModuleType]:
    """The web test app in this process, on this test's backend."""
    from tests.apps import web_app as module

    configure_app(module.app)
    module.host.with_store(app_conf["pluginhost_store"])
    module.host.sync()
    module.flows.define(module.WELCOME)
    yield module
    module.host.store.close()


@pytest.fixture
def server(web: ModuleType, app_conf: dict[str, Any], tmp_path: Path) -> Iterator[ConsoleProcess]:
    """``pluginhost web`` on a free port of 127.0.0.1, stopped at teardown."""
    env = {"PLUGINHOST_WEB_USER": USER, "PLUGINHOST_WEB_PASSWORD": PASSWORD}
    process = ConsoleProcess(app_conf, env=env, log_path=tmp_path / "console.log")
    try:
        yield process.wait_ready()
    finally:
        process.stop()


@pytest.fixture
def page(browser: Any, server: ConsoleProcess) -> Iterator[Any]:
    """A logged-in page; any JavaScript dialog is recorded in ``page.dialogs``."""
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    tab = context.new_page()
    tab.dialogs = []
    tab.on("dialog", lambda dialog: (tab.dialogs.append(dialog.message), dialog.dismiss()))
    tab.goto(f"{server.url}/plugins")
    assert "/login?next=" in tab.url  # nothing is shown before logging in
    tab.fill("input[name=username]", USER)
    tab.fill("input[name=password]", PASSWORD)
    tab.click("form[action$='/login'] button[type=submit]")
    tab.wait_for_url(f"{server.url}/plugins")
    yield tab
    context.close()


def screenshot(page: Any, name: str, tmp_path: Path) -> None:
    """Full-page PNG in the test's tmp dir; also in docs/screenshots/ when
    PLUGINHOST_SCREENSHOTS=1 (regenerating the README's pictures is a choice, not
    a side effect of every test run)."""
    page.screenshot(path=str(tmp_path / name), full_page=True)
    if os.environ.get("PLUGINHOST_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tmp_path / name, SCREENSHOTS / name)


def arabic_menu(page: Any, server: ConsoleProcess) -> list[str]:
    page.goto(f"{server.url}/nav")
    return page.locator(".menu-ar li.nav-item").evaluate_all("items => items.map(i => i.dataset.slug)")


def test_disabling_a_capability_on_the_page_stops_a_running_worker_using_it(
    web: ModuleType, server: ConsoleProcess, page: Any, workers: Any, tmp_path: Path
) -> None:
    worker = workers("tests.apps.web_app", pool="solo")
    assert web.host.run_capability("greet", {"name": "before"}).get(timeout=20) == {"greeting": "hello before"}
    switch = page.locator("#plugin-greet button[role=switch]")
    assert switch.inner_text() == "On"
    switch.click()
    page.click("form.confirm button[type=submit]")  # the confirmation page
    page.wait_for_selector(".flash")
    assert f"acknowledged by {worker.hostname}" in page.locator(".flash").inner_text()
    assert page.locator("#plugin-greet button[role=switch]").get_attribute("aria-checked") == "false"
    row = page.locator(f'tr.worker[data-hostname="{worker.hostname}"]')
    assert row.locator("td").nth(2).inner_text() == "current"
    assert row.locator("td").nth(1).inner_text() == page.locator(".store-revision").inner_text()
    with pytest.raises(CapabilityDisabled):
        web.host.run_capability("greet", {"name": "after"})
    with pytest.raises(CapabilityDisabled, match="plugin 'greet' is disabled"):
        web.host.task("greet").delay({"name": "queued"}).get(timeout=20)  # the worker refuses it
    assert web.host.audit("greet", limit=1)[0].actor == USER
    screenshot(page, "plugins.png", tmp_path)


def test_reordering_two_plugins_changes_the_arabic_navigation(
    web: ModuleType, server: ConsoleProcess, page: Any
) -> None:
    assert arabic_menu(page, server) == ["greet", "mailer", "report", "flaky"]
    assert page.locator(".menu-ar").get_attribute("dir") == "rtl"
    page.goto(f"{server.url}/plugins")
    page.click("button[aria-label='Move mailer up']")
    page.wait_for_selector(".flash")
    assert arabic_menu(page, server) == ["mailer", "greet", "report", "flaky"]
    page.goto(f"{server.url}/plugins")
    page.fill("input[aria-label='Sort order of flaky']", "-5")
    page.locator("#plugin-flaky form.sort button").click()
    page.wait_for_selector(".flash")
    assert arabic_menu(page, server) == ["flaky", "mailer", "greet", "report"]
    labels = page.locator(".menu-ar li.nav-item").all_inner_texts()
    assert labels[0] == "خطوة متقلبة"


def test_resuming_a_failed_run_from_its_page(
    web: ModuleType, server: ConsoleProcess, page: Any, workers: Any, tmp_path: Path
) -> None:
    workers("tests.apps.web_app", pool="solo")
    web.host.configure("flaky", {"fail": True})
    run_id = web.flows.start("welcome", {"name": "Ada"}).id
    deadline = time.monotonic() + 30
    while web.flows.run(run_id).status != "failed" and time.monotonic() < deadline:
        time.sleep(0.1)
    page.goto(f"{server.url}/runs?status=failed")
    page.click(f"tr[data-run='{run_id}'] a")
    assert page.locator("#run-status").inner_text() == "failed"
    assert "flaky is configured to fail" in page.locator("tr[data-slug='flaky']").inner_text()
    assert page.locator("svg.diagram g[data-slug='flaky']").get_attribute("data-state") == "failed"
    page.screenshot(path=str(tmp_path / "run-failed.png"), full_page=True)
    web.host.configure("flaky", {"fail": False})
    page.click("form.resume button")
    assert "Resumed run" in page.locator(".flash").inner_text()
    deadline = time.monotonic() + 30
    while page.locator("#run-status").inner_text() != "succeeded" and time.monotonic() < deadline:
        time.sleep(0.2)
        page.reload()
    assert page.locator("#run-status").inner_text() == "succeeded"
    assert page.locator("form.resume").count() == 0
    cells = page.locator("tr[data-slug='flaky'] td").all_inner_texts()
    assert cells[3] == "succeeded" and cells[4] == "2"  # the second attempt, after the resume
    page.screenshot(path=str(tmp_path / "run-resumed.png"), full_page=True)


def row_order(page: Any) -> list[str]:
    return page.locator("table.plugins > tbody > tr").evaluate_all("rows => rows.map(r => r.dataset.slug)")


def test_arrows_move_a_plugin_one_row_when_sort_weights_are_tied(
    web: ModuleType, server: ConsoleProcess, page: Any
) -> None:
    for slug in ("greet", "mailer", "report", "flaky"):
        web.host.set_sort(slug, 0)
    page.goto(f"{server.url}/plugins")
    assert row_order(page) == ["flaky", "greet", "mailer", "report"]
    page.click("button[aria-label='Move flaky down']")
    page.wait_for_selector(".flash")
    assert row_order(page) == ["greet", "flaky", "mailer", "report"]  # one row, not to the end
    page.click("button[aria-label='Move report up']")
    page.wait_for_selector(".flash")
    assert row_order(page) == ["greet", "flaky", "report", "mailer"]
    page.click("button[aria-label='Move flaky up']")
    page.wait_for_selector(".flash")
    assert row_order(page) == ["flaky", "greet", "report", "mailer"]
    assert arabic_menu(page, server) == ["flaky", "greet", "report", "mailer"]
    assert {e.action for e in web.host.audit(actor=USER)} == {"sort"}


def test_the_switch_asks_before_disabling_and_cancel_changes_nothing(
    web: ModuleType, server: ConsoleProcess, page: Any
) -> None:
    before = [e.id for e in web.host.audit(limit=1000)]
    page.click("#plugin-flaky button[role=switch]")
    assert page.locator("h1").inner_text() == "Disable flaky?"
    assert " ".join(page.locator("#impact").inner_text().split()).startswith(
        "1 capability and 1 workflow use this plugin."
    )
    assert "step flaky fails the run" in " ".join(page.locator(".uses-workflows").inner_text().split())
    page.click("a.cancel")
    assert page.url.endswith("/plugins#plugin-flaky")
    assert web.host.is_enabled("flaky") and [e.id for e in web.host.audit(limit=1000)] == before
    page.click("#plugin-flaky button[role=switch]")
    page.click("form.confirm button[type=submit]")
    page.wait_for_selector(".flash")
    assert not web.host.is_enabled("flaky")
    switch = page.locator("#plugin-flaky button[role=switch]")
    assert switch.get_attribute("aria-checked") == "false"
    switch.click()  # enabling asks nothing
    page.wait_for_selector(".flash")
    assert web.host.is_enabled("flaky")


def test_config_boxes_follow_the_config_model(web: ModuleType, server: ConsoleProcess, page: Any) -> None:
    web.host.configure("flaky", {"fail": False})
    page.goto(f"{server.url}/plugins")
    assert page.locator("#plugin-greet textarea").count() == 0  # no model, nothing stored
    assert page.locator("#plugin-greet .no-config").is_visible()
    assert page.locator("#plugin-flaky textarea").count() == 1  # no model, but it holds config
    fields = page.locator("#plugin-mailer .fields li")
    assert fields.evaluate_all("items => items.map(i => i.dataset.field)") == [
        "smtp_host",
        "smtp_port",
        "smtp_password",
    ]
    assert " ".join(fields.nth(1).inner_text().split()) == "smtp_port int default 25"
    secret = page.locator("#plugin-mailer li[data-field=smtp_password] .secret")
    assert secret.inner_text() == "secret, set" and "hunter2" not in page.content()
    set_style = secret.evaluate("e => getComputedStyle(e).borderStyle")
    page.fill("#plugin-mailer textarea", '{"smtp_host": "h", "smtp_port": 25, "smtp_password": ""}')
    page.click("#plugin-mailer form[action$='/config'] button[type=submit]")
    page.wait_for_selector(".flash")
    secret = page.locator("#plugin-mailer li[data-field=smtp_password] .secret")
    assert secret.inner_text() == "secret, not set"
    assert secret.evaluate("e => getComputedStyle(e).borderStyle") != set_style  # told apart by more than words


def test_a_failed_run_shows_its_context_so_far_and_a_skip_as_a_note(
    web: ModuleType, server: ConsoleProcess, page: Any, workers: Any, tmp_path: Path
) -> None:
    workers("tests.apps.web_app", pool="solo")
    web.host.disable("report")
    web.host.configure("flaky", {"fail": True})
    run_id = web.flows.start("welcome", {"name": "Ada"}).id
    deadline = time.monotonic() + 30
    while web.flows.run(run_id).status != "failed" and time.monotonic() < deadline:
        time.sleep(0.1)
    page.goto(f"{server.url}/runs/{run_id}")
    note = page.locator("tr[data-slug='report'] td.note")
    assert note.inner_text() == "plugin 'report' is disabled"
    assert page.locator("tr[data-slug='report'] .error-text").count() == 0
    red = page.locator("tr[data-slug='flaky'] .error-text").evaluate("e => getComputedStyle(e).color")
    assert note.evaluate("e => getComputedStyle(e).color") != red
    assert page.locator("details.context").get_attribute("open") is not None
    context = json.loads(page.locator("#run-context").inner_text())
    assert context == {"name": "Ada", "greeting": "hello Ada", "mailed_via": "mail.example.com"}
    assert page.locator(".added li").evaluate_all("items => items.map(i => i.dataset.slug)") == ["greet", "mailer"]
    screenshot(page, "run.png", tmp_path)
    page.click("a.back")
    assert page.url.endswith("/runs?name=welcome")


def test_the_workflow_table_shows_on_disabled_and_retries(web: ModuleType, server: ConsoleProcess, page: Any) -> None:
    page.goto(f"{server.url}/workflows")
    rows = page.locator("#workflow-welcome table.plan tbody tr")
    cells = [(r.locator("td.on-disabled").inner_text(), r.locator("td.retries").inner_text()) for r in rows.all()]
    assert cells == [("skip", "0"), ("skip", "0"), ("skip", "0"), ("fail", "0")]
    headers = page.locator("#workflow-welcome table.plan thead th").all_inner_texts()
    assert "ON DISABLED" in [h.upper() for h in headers] and "RETRIES" in [h.upper() for h in headers]


def test_back_on_an_unknown_run_goes_to_the_page_one_came_from(
    web: ModuleType, server: ConsoleProcess, page: Any
) -> None:
    page.goto(f"{server.url}/runs?status=failed")
    page.goto(f"{server.url}/runs/no-such-run", referer=f"{server.url}/runs?status=failed")
    assert page.locator("h1").inner_text() == "404: RunNotFound"
    page.click("main a:has-text('Back')")
    assert page.url == f"{server.url}/runs?status=failed"
    page.goto(f"{server.url}/runs/no-such-run")  # typed in: the section's list
    page.click("main a:has-text('Back')")
    assert page.url == f"{server.url}/runs"


PHONE = {"width": 390, "height": 844}


def waiting_run(module: ModuleType) -> str:
    """A run stopped at its wait for signal ``approved``, recorded through the store as a
    worker's wait task does (no worker sends it on: it has no timeout due for 3 days)."""
    module.flows.define(
        {"name": "approval", "steps": [{"slug": "greet"}, {"type": "wait", "signal": "approved", "timeout": "3d"}]}
    )
    run_id = module.flows.prepare("approval", {})[0]
    module.flows.waits.reach(
        run_id, 1, kind="signal", signal="approved", on_timeout="fail", seconds=3 * 86400.0, context={}, carried=[]
    )
    return run_id


def test_every_page_fits_a_phone(
    web: ModuleType, server: ConsoleProcess, page: Any, browser: Any, workers: Any, tmp_path: Path
) -> None:
    """At 390x844 nothing scrolls sideways and every plugin's switch is on screen."""
    workers("tests.apps.web_app", pool="solo")
    run_id = web.flows.start("welcome", {"name": "Ada"}).id
    deadline = time.monotonic() + 30
    while web.flows.run(run_id).status != "succeeded" and time.monotonic() < deadline:
        time.sleep(0.1)
    phone = browser.new_context(
        viewport=PHONE, is_mobile=True, has_touch=True, storage_state=page.context.storage_state()
    )
    tab = phone.new_page()
    try:
        pages = ["/plugins", "/nav", "/workflows", "/workflows/welcome", "/runs", f"/runs/{run_id}", "/audit"]
        pending = web.flows.prepare("welcome", {"name": "Bo"})[0]  # recorded, not sent: it stays cancellable
        waiting = waiting_run(web)
        more = [f"/runs/{pending}", f"/runs/{pending}/cancel", f"/runs/{waiting}", "/runs?status=waiting", "/waiting"]
        for path in [*pages, "/plugins/greet/disable", *more]:
            tab.goto(f"{server.url}{path}")
            width = tab.evaluate("() => [document.documentElement.scrollWidth, window.innerWidth]")
            assert width[0] <= width[1] == PHONE["width"], (path, width)
        tab.click(f"table.waiting tr[data-run='{waiting}'] a")  # the waiting page leads to the run
        assert tab.locator("#run-status").inner_text() == "waiting"
        entry = tab.locator("ol.timeline li[data-kind=wait] .text")
        assert entry.inner_text() == "waiting for signal approved (timeout 3d, then fail)"
        box = entry.bounding_box()
        assert box is not None and 0 <= box["x"] and box["x"] + box["width"] <= PHONE["width"], box
        screenshot(tab, "run-waiting-phone.png", tmp_path)
        tab.goto(f"{server.url}/plugins")
        assert tab.locator("tr.worker").count() == 1  # the workers table has a row to fit too
        for slug in ("greet", "mailer", "report", "flaky"):
            box = tab.locator(f"#plugin-{slug} button[role=switch]").bounding_box()
            assert box is not None and 0 <= box["x"] and box["x"] + box["width"] <= PHONE["width"], (slug, box)
        tab.locator("#plugin-report button[role=switch]").scroll_into_view_if_needed()
        tab.locator("#plugin-report button[role=switch]").click()  # tappable: it leads to the confirmation
        assert tab.locator("h1").inner_text() == "Disable report?"
        tab.goto(f"{server.url}/plugins")
        screenshot(tab, "plugins-phone.png", tmp_path)
    finally:
        phone.close()


def test_a_script_label_renders_as_text(web: ModuleType, server: ConsoleProcess, page: Any) -> None:
    web.host.register({"slug": "evil", "kind": "ui", "label_en": HOSTILE, "label_ar": HOSTILE, "sort": -1})
    for path in ("/plugins", "/nav", "/audit"):
        page.goto(f"{server.url}{path}")
        page.wait_for_load_state("load")
    page.goto(f"{server.url}/plugins")
    assert page.locator("#plugin-evil .label-en").inner_text() == HOSTILE
    page.goto(f"{server.url}/nav")
    assert page.locator(".menu-en li.nav-item").first.inner_text() == HOSTILE
    assert page.dialogs == []


@pytest.fixture
def local_server(web: ModuleType, app_conf: dict[str, Any], tmp_path: Path) -> Iterator[ConsoleProcess]:
    """``pluginhost web --insecure-local`` (no credentials), stopped at teardown."""
    process = ConsoleProcess(app_conf, "--insecure-local", log_path=tmp_path / "local.log")
    try:
        yield process.wait_ready()
    finally:
        process.stop()


@pytest.fixture
def rebinding_browser(browser: Any) -> Iterator[Any]:
    """A second Chromium whose resolver answers 127.0.0.1 for attacker.example: the state
    of a victim's browser after a DNS-rebinding attacker switched its record.

    Chromium's own Private Network Access block is switched off, as browsers without
    it are (Firefox, Safari, older Chromium): the console must not depend on it."""
    rebinding = [
        "--host-resolver-rules=MAP attacker.example 127.0.0.1",
        "--disable-features=BlockInsecurePrivateNetworkRequests,PrivateNetworkAccessSendPreflights,"
        "PrivateNetworkAccessRespectPreflightResults,LocalNetworkAccessChecks",
    ]
    chromium = browser.browser_type.launch(executable_path=CHROMIUM, args=[*CHROMIUM_ARGS, *rebinding])
    yield chromium
    chromium.close()


ATTACKER_PAGE = """<!doctype html><title>cute cats</title><script>
window.attack = async () => {
  const session = await fetch('/api/session');
  const text = await session.text();
  let token = '';
  try { token = JSON.parse(text).csrf_token || ''; } catch (e) {}
  const post = await fetch('/api/plugins/greet/disable', {method: 'POST', headers: {'X-CSRF-Token': token}});
  const form = await fetch('/plugins/greet/enabled',
                           {method: 'POST', body: new URLSearchParams({enabled: 'false', csrf_token: token})});
  return {session: session.status, text, post: post.status, form: form.status, cookie: document.cookie};
};
</script>"""


def test_a_dns_rebinding_page_gets_nothing_from_a_local_console(
    web: ModuleType, local_server: ConsoleProcess, rebinding_browser: Any
) -> None:
    before = [e.id for e in web.host.audit(limit=1000)]
    context = rebinding_browser.new_context()
    tab = context.new_page()
    evil = f"http://attacker.example:{local_server.port}"
    # the attacker's own server serves this page; then its DNS record points at 127.0.0.1
    tab.route(
        f"{evil}/cats.html", lambda route: route.fulfill(status=200, content_type="text/html", body=ATTACKER_PAGE)
    )
    tab.goto(f"{evil}/cats.html")
    result = tab.evaluate("window.attack()")
    assert (result["session"], result["post"], result["form"]) == (421, 421, 421), result
    assert "csrf" not in result["text"] and "loopback" in result["text"]
    assert context.cookies() == [] and result["cookie"] == ""
    direct = tab.goto(f"{evil}/plugins")  # the console's page itself, asked by that name
    assert direct is not None and direct.status == 421 and context.cookies() == []
    assert web.host.is_enabled("greet") and [e.id for e in web.host.audit(limit=1000)] == before
    context.close()


def test_local_mode_works_in_a_browser_on_loopback_names(
    web: ModuleType, local_server: ConsoleProcess, browser: Any
) -> None:
    context = browser.new_context()
    tab = context.new_page()
    for name, slug in (("127.0.0.1", "greet"), ("localhost", "report")):
        tab.goto(f"http://{name}:{local_server.port}/plugins")
        tab.locator(f"#plugin-{slug} button[role=switch]").click()
        tab.click("form.confirm button[type=submit]")
        tab.wait_for_selector(".flash")
        assert not web.host.is_enabled(slug)
        assert web.host.audit(slug, limit=1)[0].actor == "local"
    context.close()


def test_a_run_started_from_the_workflow_form_is_cancelled_from_its_page(
    web: ModuleType, server: ConsoleProcess, page: Any, tmp_path: Path
) -> None:
    page.goto(f"{server.url}/workflows")
    page.click("#workflow-welcome h2 a")
    assert page.url == f"{server.url}/workflows/welcome"
    page.fill("form.start input[name='field.name']", "Ada")
    page.fill("form.start input[name='field.age']", "36")
    page.select_option("form.start select[name='field.plan']", "pro")
    page.check("form.start input[name='field.newsletter']")
    page.click("form.start button[type=submit]")
    page.wait_for_url(f"{server.url}/runs/*")
    run_id = page.url.rsplit("/", 1)[1]
    assert f"Started run {run_id}" in page.locator(".flash").inner_text()
    assert web.flows.run(run_id).input == {"name": "Ada", "age": 36, "plan": "pro", "newsletter": True}
    assert page.locator("#run-status").inner_text() == "pending"  # no worker: it stays before its first step
    page.click("a.cancel-run")
    assert page.locator("h1").inner_text() == f"Cancel run {run_id}?"
    page.check("form.confirm input[name=terminate]")
    page.click("form.confirm button[type=submit]")  # the confirmation
    page.wait_for_selector(".flash")
    assert f"Cancelled run {run_id}" in page.locator(".flash").inner_text()
    assert page.locator("#run-status").inner_text() == "cancelled"
    assert page.locator("a.cancel-run").count() == 0
    assert web.flows.run(run_id).cancelled_by == USER
    assert page.dialogs == []
    screenshot(page, "run-cancelled.png", tmp_path)
