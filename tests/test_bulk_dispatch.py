"""``run_capability_many``: every input validated first, one store check for the
batch, one producer, a GroupResult; nothing enqueued unless the whole batch passes."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from celery import Celery
from pydantic import BaseModel

from pluginhost import CapabilityDisabled, InvalidArgument, InvalidInput, PluginHost
from pluginhost.store import SQLAlchemyStore


class Order(BaseModel):
    sku: str
    qty: int


class CountingStore(SQLAlchemyStore):
    """A real SQLite store that counts revision reads (the per-dispatch check)."""

    reads = 0

    def revision(self) -> int:
        self.reads += 1
        return super().revision()


@pytest.fixture
def host(tmp_path: Path) -> Any:
    app = Celery("bulk", broker="memory://", backend="cache+memory://")
    app.conf.task_default_queue = f"bulk-{tmp_path.name}"  # memory:// is shared by the whole process
    h = PluginHost(app, store=CountingStore(f"sqlite:///{tmp_path / 'ph.db'}"))
    h.register_capability("charge", lambda payload: payload.qty, input_model=Order)
    h.sync()
    yield h
    h.store.close()


def queued(host: PluginHost) -> int:
    with host.app.connection_for_write() as conn:
        queue = host.app.conf.task_default_queue
        return int(conn.default_channel.queue_declare(queue, passive=False).message_count)


def test_a_batch_is_checked_once_and_published_in_order(host: PluginHost) -> None:
    store = host.store
    before = store.reads  # type: ignore[attr-defined]
    group = host.run_capability_many("charge", [{"sku": f"s{i}", "qty": i} for i in range(50)])
    assert store.reads - before == 1  # type: ignore[attr-defined]
    assert len(group.results) == 50 and len({r.id for r in group.results}) == 50
    assert queued(host) == 50


def test_one_bad_input_rejects_the_batch_naming_its_index(host: PluginHost) -> None:
    inputs: list[Any] = [{"sku": "a", "qty": 1}, {"sku": "b", "qty": 2}, {"sku": "c", "qty": "many"}]
    with pytest.raises(InvalidInput, match=r"^input 2: capability 'charge' input: field 'qty'"):
        host.run_capability_many("charge", inputs)
    with pytest.raises(InvalidInput, match="^input 1: "):
        host.run_capability_many("charge", [{"sku": "a", "qty": 1}, "not an object"])
    with pytest.raises(InvalidInput, match="inputs must be a list"):
        host.run_capability_many("charge", {"sku": "a", "qty": 1})  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="task_id="):
        host.run_capability_many("charge", [{"sku": "a", "qty": 1}], task_id="x")
    assert queued(host) == 0


def test_a_disabled_plugin_enqueues_nothing_of_the_batch(host: PluginHost) -> None:
    host.disable("charge")
    with pytest.raises(CapabilityDisabled):
        host.run_capability_many("charge", [{"sku": "a", "qty": 1}] * 10)
    assert queued(host) == 0


@pytest.mark.parametrize("backend", ["redis", "amqp"], indirect=True)
def test_a_batch_runs_on_real_workers(core: ModuleType, workers: Any) -> None:
    workers("tests.apps.core", pool="prefork")
    group = core.host.run_capability_many("pure", [{"i": i} for i in range(200)])
    out = group.get(timeout=60)
    assert [o["echo"]["i"] for o in out] == list(range(200))
