"""The Store contract, on MemoryStore, SQLite and PostgreSQL."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from pluginhost import ConcurrentUpdate, MemoryStore, Plugin, PluginNotFound, SQLAlchemyStore, Store
from pluginhost.store import WorkerRegistry


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "memory":
        yield MemoryStore()
        return
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'store.db'}"
    else:
        url = request.getfixturevalue("empty_pg_url")
    s = SQLAlchemyStore(url)
    s.migrate()
    yield s
    s.close()


def test_every_write_bumps_the_revision_and_is_audited(store: Store) -> None:
    start = store.revision()
    p, rev, _ = store.upsert(Plugin(slug="email", label_ar="بريد الترحيب"), actor="ana")
    assert p.version == 1 and rev == store.revision() > start
    p2, rev2, _ = store.update("email", {"enabled": False}, action="disable", actor="ben")
    assert (p2.enabled, p2.version, rev2) == (False, 2, store.revision())
    assert rev2 > rev
    entries = store.audit("email")
    assert [(e.action, e.actor) for e in entries] == [("disable", "ben"), ("create", "ana")]
    assert entries[0].before["enabled"] is True and entries[0].after["enabled"] is False
    assert store.get("email").label_ar == "بريد الترحيب"


def test_an_update_that_changes_nothing_writes_nothing(store: Store) -> None:
    store.upsert(Plugin(slug="email"))
    rev = store.revision()
    p, rev2, changed = store.update("email", {"enabled": True}, action="enable")
    assert p.version == 1 and rev2 == rev and not changed and len(store.audit("email")) == 1


def test_load_orders_by_sort_then_slug(store: Store) -> None:
    for slug, sort in [("b", 1), ("a", 1), ("c", 0)]:
        store.upsert(Plugin(slug=slug, sort=sort))
    rev, plugins = store.load()
    assert [p.slug for p in plugins] == ["c", "a", "b"] and rev == store.revision()


def test_ensure_never_overwrites_what_an_admin_set(store: Store) -> None:
    store.upsert(Plugin(slug="email"))
    store.update("email", {"enabled": False, "config": {"x": 1}, "sort": 7}, action="admin")
    created = store.ensure([Plugin(slug="email"), Plugin(slug="crm")], actor="sync")
    assert [p.slug for p in created] == ["crm"]
    email = store.get("email")
    assert (email.enabled, email.config, email.sort) == (False, {"x": 1}, 7)


def test_expected_version_mismatch_raises_concurrent_update(store: Store) -> None:
    store.upsert(Plugin(slug="email"))
    with pytest.raises(ConcurrentUpdate, match="expected version 5, found 1"):
        store.update("email", {"enabled": False}, action="disable", expected_version=5)
    assert store.get("email").enabled is True


def test_update_of_a_missing_plugin_raises_plugin_not_found(store: Store) -> None:
    with pytest.raises(PluginNotFound, match="'ghost'"):
        store.update("ghost", {"enabled": False}, action="disable")


def test_secrets_are_masked_in_the_audit_log(store: Store) -> None:
    store.upsert(Plugin(slug="smtp", config={"password": "hunter2", "host": "mail"}))
    after = store.audit("smtp")[0].after
    assert after["config"] == {"password": "********", "host": "mail"}
    assert store.get("smtp").config["password"] == "hunter2"


def test_eight_threads_updating_one_plugin_lose_nothing(store: Store) -> None:
    store.upsert(Plugin(slug="counter", config={"n": 0}))
    per_thread = 25
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for j in range(per_thread):
                store.update("counter", {"config": {"by": i, "j": j}}, action="configure", actor=f"t{i}")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    final = store.get("counter")
    audit = store.audit("counter", limit=1000)
    # every update changed the config (each (i, j) is distinct), so each is one version
    assert final.version == 1 + 8 * per_thread
    assert len([a for a in audit if a.action == "configure"]) == 8 * per_thread
    # the audit log is a consistent history: each entry's before is the previous after
    chain = sorted(audit, key=lambda a: a.after["version"])
    for prev, cur in zip(chain, chain[1:]):
        assert cur.before == prev.after
    assert chain[-1].after["config"] == final.config


def test_direct_sql_moves_the_revision(store: Store) -> None:
    if not isinstance(store, SQLAlchemyStore):
        pytest.skip("SQL only")
    store.upsert(Plugin(slug="email"))
    rev = store.revision()
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE pluginhost_plugins SET enabled = false WHERE slug = 'email'"))
    assert store.revision() > rev


def test_migrate_is_idempotent(store: Store) -> None:
    if not isinstance(store, SQLAlchemyStore):
        pytest.skip("SQL only")
    store.migrate()
    store.migrate()


@pytest.mark.parametrize("store", ["sqlite", "postgres"], indirect=True)
def test_the_worker_registry_holds_workers_that_reported_recently(store: Store) -> None:
    assert isinstance(store, WorkerRegistry) and not isinstance(MemoryStore(), WorkerRegistry)
    rev = store.revision()
    store.report_worker("w1@host", 3)
    store.report_worker("w2@host", 3)
    store.report_worker("w1@host", 4)  # a heartbeat updates the row
    assert store.live_workers(within_s=30) == {"w1@host": 4, "w2@host": 3}
    time.sleep(0.3)
    store.report_worker("w2@host", 4)
    assert store.live_workers(within_s=0.2) == {"w2@host": 4}  # w1 missed its heartbeats
    store.forget_worker("w2@host")
    store.forget_worker("never-registered@host")
    assert store.live_workers(within_s=30) == {"w1@host": 4}
    assert store.revision() == rev and store.audit() == []  # not a plugin change
