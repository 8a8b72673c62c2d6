"""Incremental follow: a process behind the store reads only what changed since
its revision, and loads everything when the store cannot prove it has every
change (issue 16).

Each test counts the plugin rows the process read from the store (a store that
counts what ``load`` and ``changes`` return), and checks the view equals a full
load of the store.
"""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from pydantic import BaseModel, field_validator
from sqlalchemy import Engine, insert, text

from pluginhost import MemoryStore, Plugin, PluginHost, SQLAlchemyStore
from pluginhost.control import WorkerLink
from pluginhost.store import schema

ROOT = Path(__file__).resolve().parents[1]


class CountingStore(SQLAlchemyStore):
    """A SQL store that counts what it hands the view: full loads, change reads,
    and the plugin rows in them."""

    def __init__(self, url: str, delay_s: float = 0.0) -> None:
        super().__init__(url)
        self.loads = self.reads = self.rows = 0
        self.delay_s = delay_s
        self._count = threading.Lock()

    def load(self) -> tuple[int, list[Plugin]]:
        time.sleep(self.delay_s)
        revision, plugins = super().load()
        with self._count:
            self.loads += 1
            self.rows += len(plugins)
        return revision, plugins

    def changes(self, since: int) -> Any:
        time.sleep(self.delay_s)
        found = super().changes(since)
        with self._count:
            self.reads += 1
            self.rows += len(found.plugins) if found is not None else 0
        return found

    def reset(self) -> None:
        self.loads = self.reads = self.rows = 0


class CountingMemoryStore(MemoryStore):
    rows = loads = 0

    def load(self) -> tuple[int, list[Plugin]]:
        revision, plugins = super().load()
        self.loads += 1
        self.rows += len(plugins)
        return revision, plugins

    def changes(self, since: int) -> Any:
        found = super().changes(since)
        self.rows += len(found.plugins) if found is not None else 0
        return found


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    return str(request.getfixturevalue("empty_pg_url"))


@pytest.fixture
def store(url: str) -> Iterator[CountingStore]:
    s = CountingStore(url)
    s.migrate()
    yield s
    s.close()


def _host(store: Any) -> PluginHost:
    return PluginHost(Celery("follow", broker="memory://", backend="cache+memory://"), store=store)


def _seed(engine: Engine, count: int, start: int = 0) -> None:
    """``count`` rows written by direct SQL (no store code; no change_revision given)."""
    at = datetime(2026, 1, 1, tzinfo=timezone.utc)
    rows = [
        {"slug": f"p{i:05d}", "kind": "capability", "enabled": True, "config": {"n": i}, "sort": i,
         "label_en": f"Plugin {i}", "label_ar": "", "version": 1, "updated_at": at}
        for i in range(start, start + count)
    ]  # fmt: skip
    with engine.begin() as conn:
        conn.execute(insert(schema.plugins), rows)


def _sql(engine: Engine, statement: str) -> None:
    with engine.begin() as conn:
        conn.execute(text(statement))


def _view_of(host: PluginHost) -> dict[str, dict[str, Any]]:
    return {p.slug: p.model_dump(mode="json") for p in host.list()}


def _full_load(store: Any) -> dict[str, dict[str, Any]]:
    return {p.slug: p.model_dump(mode="json") for p in type(store).__mro__[1].load(store)[1]}


# -- direct SQL reaches a view incrementally ----------------------------------------


def test_direct_sql_insert_bulk_update_and_delete_reach_a_view_reading_only_the_changed_rows(
    store: CountingStore,
) -> None:
    engine = store.engine
    _seed(engine, 200)
    host = _host(store)
    assert len(host.list()) == 200  # the first load: every row
    store.reset()

    _seed(engine, 3, start=200)
    assert len(host.list()) == 203
    assert (store.loads, store.rows) == (0, 3)  # only the three new rows
    assert _view_of(host) == _full_load(store)

    store.reset()
    _sql(engine, "UPDATE pluginhost_plugins SET enabled = false WHERE sort < 10")
    assert not host.is_enabled("p00003") and host.is_enabled("p00010")
    assert (store.loads, store.rows) == (0, 10)
    assert _view_of(host) == _full_load(store)

    store.reset()
    _sql(engine, "DELETE FROM pluginhost_plugins WHERE sort >= 195")
    assert host.get("p00197") is None and len(host.list()) == 195
    assert (store.loads, store.rows) == (0, 0)  # deletions come as slugs, not rows
    assert _view_of(host) == _full_load(store)

    store.reset()
    _sql(engine, "UPDATE pluginhost_plugins SET slug = 'renamed' WHERE slug = 'p00020'")
    assert host.get("p00020") is None and host.get("renamed") is not None
    assert (store.loads, store.rows) == (0, 1)
    assert _view_of(host) == _full_load(store)

    store.reset()
    _sql(engine, "DELETE FROM pluginhost_plugins WHERE slug = 'p00030'")
    _seed(engine, 1, start=30)  # deleted, then inserted again: there
    assert host.get("p00030") is not None
    assert (store.loads, store.rows) == (0, 1)
    assert _view_of(host) == _full_load(store)


def test_admin_writes_in_another_process_reach_a_view_reading_only_their_rows(store: CountingStore, url: str) -> None:
    _seed(store.engine, 50)
    host = _host(store)
    host.list()
    store.reset()
    other = _host(url)
    other.disable("p00001", actor="b")
    other.configure("p00002", {"n": 99}, actor="b")
    other.enable("p00003", actor="b")  # already enabled: writes nothing
    assert host.is_enabled("p00001") is False and host.get("p00002").config == {"n": 99}
    assert (store.loads, store.rows) == (0, 2)
    assert _view_of(host) == _full_load(store)
    other.store.close()


# -- the fallback: a full load when completeness cannot be proven ---------------------


def test_a_view_behind_pruned_deletions_converges_by_a_full_load(store: CountingStore) -> None:
    engine = store.engine
    _seed(engine, 20)
    host = _host(store)
    host.list()
    _sql(engine, "DELETE FROM pluginhost_plugins WHERE slug = 'p00005'")
    _sql(engine, "UPDATE pluginhost_plugins SET enabled = false WHERE slug = 'p00006'")
    assert store.prune_deletions(store.revision()) == 1
    store.reset()
    assert host.get("p00005") is None and host.is_enabled("p00006") is False
    assert store.loads == 1  # the deletion it would need is gone: everything
    assert _view_of(host) == _full_load(store)

    store.reset()
    _sql(engine, "DELETE FROM pluginhost_plugins WHERE slug = 'p00007'")
    assert host.get("p00007") is None
    assert (store.loads, store.rows) == (0, 0)  # from the pruned horizon on: incremental again


def test_a_store_behind_the_view_is_loaded_in_full(store: CountingStore) -> None:
    """A database restored from a backup: its revision is behind the view's."""
    engine = store.engine
    _seed(engine, 5)
    host = _host(store)
    host.list()
    before = host.revision
    _sql(engine, "UPDATE pluginhost_revision SET revision = 1 WHERE id = 1")
    _sql(engine, "DELETE FROM pluginhost_plugins WHERE slug = 'p00001'")  # revision 2 now
    assert store.revision() < before
    store.reset()
    assert host.get("p00001") is None
    assert store.loads == 1
    assert _view_of(host) == _full_load(store)


def test_truncate_is_followed_by_a_full_load(empty_pg_url: str) -> None:
    store = CountingStore(empty_pg_url)
    store.migrate()
    _seed(store.engine, 10)
    host = _host(store)
    host.list()
    _sql(store.engine, "TRUNCATE pluginhost_plugins")
    _seed(store.engine, 2, start=100)
    store.reset()
    assert sorted(_view_of(host)) == ["p00100", "p00101"]
    assert store.loads == 1
    store.close()


def test_a_memory_store_is_followed_incrementally() -> None:
    store = CountingMemoryStore([Plugin(slug=f"m{i}") for i in range(30)])
    a, b = _host(store), _host(store)
    a.list()
    b.disable("m3")
    b.register(Plugin(slug="new"))  # register refreshes b's view: a full load there
    store.rows = store.loads = 0
    assert a.is_enabled("m3") is False and a.get("new") is not None
    assert (store.loads, store.rows) == (0, 2)


# -- one catch-up per revision per process ------------------------------------------


def test_threads_that_find_the_view_behind_wait_for_one_catch_up(store: CountingStore, url: str) -> None:
    """Eight pool threads start a task at once after a toggle was published: one
    of them reads the store, the others wait for it and then find the view current."""
    _seed(store.engine, 20)
    host = _host(store)
    view = host.view
    view.ensure_ready()
    view.published = multiprocessing.RawValue("q", view.revision)
    other = _host(url)
    other.disable("p00004")
    view.published.value = store.revision()
    store.reset()
    store.delay_s = 0.05  # a store that takes a moment: the threads pile up behind it
    start = threading.Barrier(8)
    errors: list[BaseException] = []

    def task() -> None:
        start.wait()
        try:
            view.follow()
            assert view.plugin("p00004").enabled is False
        except BaseException as exc:  # pragma: no cover - shown below
            errors.append(exc)

    threads = [threading.Thread(target=task) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert store.loads + store.reads == 1
    other.store.close()


def test_a_burst_of_toggles_costs_a_pool_process_one_catch_up_and_the_main_process_none(
    store: CountingStore, url: str
) -> None:
    """Ten toggles while a pool process is inside a task: its next task catches
    up once (ten rows); the broadcast handler and the poll (``WorkerLink.sync``,
    here from several threads at once) only publish a number."""
    _seed(store.engine, 100)
    host = _host(store)
    link = WorkerLink(host.view)
    link.start()
    other = _host(url)
    store.reset()
    syncs = []
    for i in range(10):
        other.disable(f"p{i:05d}")
        ts = [threading.Thread(target=lambda: syncs.append(link.sync())) for _ in range(3)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    assert max(syncs) == store.revision()
    assert store.loads + store.reads == 0  # publishing loads nothing
    for _ in range(5):  # the next tasks
        host.view.follow()
    assert (store.loads, store.reads, store.rows) == (0, 1, 10)
    assert not any(host.view.plugin(f"p{i:05d}").enabled for i in range(10))
    other.store.close()


class Counted(BaseModel):
    """A config model that records each validation."""

    n: int

    @field_validator("n")
    @classmethod
    def _count(cls, value: int) -> int:
        VALIDATIONS.append(value)
        return value


VALIDATIONS: list[int] = []


def test_config_models_validate_only_the_rows_that_changed(store: CountingStore, url: str) -> None:
    _seed(store.engine, 10)
    host = _host(store)
    view = host.view
    view.ensure_ready()
    for i in range(10):
        view.config_models[f"p{i:05d}"] = Counted
    configs = lambda: [view.config_for(view.plugin(f"p{i:05d}")).n for i in range(10)]  # noqa: E731
    assert configs() == list(range(10))
    VALIDATIONS.clear()
    assert configs() == list(range(10))
    assert VALIDATIONS == []  # cached
    _sql(store.engine, "UPDATE pluginhost_plugins SET config = '{\"n\": 42}' WHERE slug = 'p00007'")
    view.check_store()
    assert configs() == [0, 1, 2, 3, 4, 5, 6, 42, 8, 9]
    assert VALIDATIONS == [42]  # only the changed row


# -- two processes racing -----------------------------------------------------------

_RACER = r"""
import json, random, sys, time
from datetime import datetime, timezone
from pathlib import Path
from celery import Celery
from sqlalchemy import insert, text
from pluginhost import PluginHost, PluginHostError
from pluginhost.store import schema

url, name, seed, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
rnd = random.Random(seed)
host = PluginHost(Celery(name, broker="memory://"), store=url)
view = host.view
view.ensure_ready()
engine = host.store.engine
for i in range(120):
    slug = f"p{rnd.randrange(40):05d}"
    op = rnd.choice(["disable", "enable", "configure", "insert", "bulk", "delete"])
    try:
        if op == "disable":
            host.disable(slug, actor=name)
        elif op == "enable":
            host.enable(slug, actor=name)
        elif op == "configure":
            host.configure(slug, {"n": rnd.randrange(1000)}, actor=name)
        else:
            with engine.begin() as conn:
                if op == "insert":
                    conn.execute(insert(schema.plugins).values(
                        slug=f"{name}-{i}", kind="capability", enabled=True, config={}, sort=1, label_en="",
                        label_ar="", version=1, updated_at=datetime.now(timezone.utc)))
                elif op == "bulk":
                    conn.execute(text("UPDATE pluginhost_plugins SET sort = sort + 1 WHERE sort % 3 = :m"),
                                 {"m": rnd.randrange(3)})
                else:
                    conn.execute(text("DELETE FROM pluginhost_plugins WHERE slug = :s"), {"s": slug})
    except PluginHostError:
        pass  # a plugin the other process deleted, a concurrent update
    view.check_store()
(out / f"{name}.done").write_text("")
other = "b" if name == "a" else "a"
while not (out / f"{other}.done").exists():
    time.sleep(0.02)
view.check_store()
dump = {p.slug: p.model_dump(mode="json") for p in view.plugins()}
stats = {"full_loads": view.full_loads, "catch_ups": view.catch_ups, "revision": view.revision}
(out / f"{name}.json").write_text(json.dumps({"view": dump, "stats": stats}))
"""


def test_two_processes_racing_writes_and_catch_ups_converge_to_a_full_load(
    store: CountingStore, url: str, tmp_path: Path
) -> None:
    _seed(store.engine, 40)
    procs = [
        subprocess.Popen([sys.executable, "-c", _RACER, url, name, str(seed), str(tmp_path)], cwd=ROOT)
        for name, seed in (("a", 1), ("b", 2))
    ]
    for p in procs:
        assert p.wait(timeout=240) == 0
    full = _full_load(store)
    revision = store.revision()
    for name in ("a", "b"):
        result = json.loads((tmp_path / f"{name}.json").read_text())
        assert result["stats"]["revision"] == revision
        assert result["view"] == full, f"process {name} differs from a full load"
        # it followed by catching up, not by loading everything each time
        assert result["stats"]["full_loads"] == 1 and result["stats"]["catch_ups"] > 20


def test_a_deletion_recorded_before_a_reset_of_the_revision_counter_removes_no_row_that_is_there(
    store: CountingStore,
) -> None:
    """A deletion recorded at revision 50 that outlived a reset of the counter (a
    test harness emptying tables one by one, a hand-made restore) names a slug
    that exists again: the view keeps it."""
    engine = store.engine
    _seed(engine, 3)
    _sql(engine, "INSERT INTO pluginhost_deletions (slug, change_revision) VALUES ('p00001', 50)")
    host = _host(store)
    host.list()
    for i in range(60):  # the counter passes 50
        _sql(engine, f"UPDATE pluginhost_plugins SET sort = {i} WHERE slug = 'p00002'")
        assert host.get("p00001") is not None
    assert _view_of(host) == _full_load(store)
