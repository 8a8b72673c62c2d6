"""The dispatch check overlapped with message building (capability.CheckedProducer).

``run_capability`` sends the store's revision read first, lets Celery build the
message while the read travels, and reads the answer just before the message is
published. These tests hold that path to G1 against another *process*'s admin
call (the CLI through its real entry point), on Redis and RabbitMQ with the
PostgreSQL store, and check that a refusal at the publish leaves nothing behind:
no message, no result subscription.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import redis
from celery import signals

from pluginhost import CapabilityDisabled
from pluginhost.store.postgres import PgRevisionReader
from tests.harness import run_cli

ROOT = Path(__file__).resolve().parents[1]


def queue_size(app: Any, queue: str) -> int:
    with app.connection_for_write() as conn:
        return int(conn.default_channel.queue_declare(queue, passive=True).message_count)


def cli(app_conf: dict[str, Any], *args: str) -> str:
    done = run_cli(app_conf, "tests.apps.core:app", *args)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("backend", ["redis", "amqp"], indirect=True)
def test_a_disable_by_another_process_is_read_at_the_publish_and_nothing_is_sent(
    core: ModuleType, app_conf: dict[str, Any]
) -> None:
    host, queue = core.host, app_conf["task_default_queue"]
    host.run_capability("work", {"tag": "before"})  # this process's view: enabled, current
    before = queue_size(core.app, queue)
    view_revision = host.view.revision
    cli(app_conf, "disable", "work")  # another process commits; this view has not seen it
    assert host.view.revision == view_revision
    with pytest.raises(CapabilityDisabled, match="plugin 'work' is disabled"):
        host.run_capability("work", {"tag": "after"})
    assert host.view.revision > view_revision  # the moved revision was loaded before the publish
    assert queue_size(core.app, queue) == before
    cli(app_conf, "enable", "work")
    host.run_capability("work", {"tag": "again"})
    assert queue_size(core.app, queue) == before + 1


@pytest.mark.parametrize("backend", ["redis"], indirect=True)
def test_the_revision_read_travels_while_celery_builds_the_message(
    core: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    host = core.host
    host.run_capability("work", {"tag": "warm"})  # the reader is connected and prepared
    events: list[str] = []
    send, receive = PgRevisionReader.send, PgRevisionReader.receive

    def sent(self: PgRevisionReader, deadline: float) -> None:
        events.append("read sent")
        send(self, deadline)

    def received(self: PgRevisionReader, deadline: float) -> int:
        events.append("answer read")
        return receive(self, deadline)

    build = core.app.amqp.create_task_message

    def built(*args: Any, **kwargs: Any) -> Any:
        message = build(*args, **kwargs)
        events.append("message built")
        return message

    listen = type(core.app.backend).on_task_call

    def listening(self: Any, producer: Any, task_id: str) -> None:
        events.append("result listened for")
        listen(self, producer, task_id)

    def publishing(**_: Any) -> None:
        events.append("published")

    monkeypatch.setattr(PgRevisionReader, "send", sent)
    monkeypatch.setattr(PgRevisionReader, "receive", received)
    monkeypatch.setattr(core.app.amqp, "create_task_message", built)
    monkeypatch.setattr(type(core.app.backend), "on_task_call", listening)
    signals.before_task_publish.connect(publishing, weak=False)
    try:
        host.run_capability("work", {"tag": "overlap"})
    finally:
        signals.before_task_publish.disconnect(publishing)
    # the read travels while the message is built, and is answered before any other I/O
    assert events == ["read sent", "message built", "answer read", "result listened for", "published"]


@pytest.mark.parametrize("backend", ["redis"], indirect=True)
def test_a_run_refused_at_the_publish_leaves_no_result_subscription(core: ModuleType, app_conf: dict[str, Any]) -> None:
    """The Redis result backend subscribes to a run's result channel before the
    publish; a refused run has no AsyncResult whose collection would unsubscribe."""
    host = core.host
    cli(app_conf, "disable", "work")
    task_id = f"refused-{uuid.uuid4()}"
    with pytest.raises(CapabilityDisabled):
        host.run_capability("work", {"tag": "refused"}, task_id=task_id)
    channel = core.app.backend.get_key_for_task(task_id).decode()
    client = redis.Redis.from_url(app_conf["result_backend"])
    try:
        assert dict(client.pubsub_numsub(channel)) == {channel.encode(): 0}
    finally:
        client.close()


@pytest.mark.parametrize("backend", ["redis"], indirect=True)
def test_with_its_own_producer_the_check_runs_before_apply_async(core: ModuleType, app_conf: dict[str, Any]) -> None:
    host, queue = core.host, app_conf["task_default_queue"]
    host.run_capability("work", {"tag": "declares the queue"})
    before = queue_size(core.app, queue)
    cli(app_conf, "disable", "work")
    with core.app.producer_or_acquire() as producer:
        with pytest.raises(CapabilityDisabled):
            host.run_capability("work", {"tag": "own"}, producer=producer)
    assert queue_size(core.app, queue) == before


def test_in_eager_mode_a_disabled_capability_does_not_run(tmp_path: Path) -> None:
    """Eager mode publishes nothing, so the check cannot wait for a publish: it
    runs before apply_async."""
    from celery import Celery

    from pluginhost import PluginHost

    ran: list[Any] = []
    app = Celery("eager", set_as_current=False)
    app.conf.update(task_always_eager=True, pluginhost_store=f"sqlite:///{tmp_path / 'e.db'}")
    host = PluginHost(app)
    host.register_capability("job", lambda payload: ran.append(payload) or "done")
    host.sync()
    assert host.run_capability("job", {"n": 1}).get() == "done"
    other = PluginHost(Celery("admin", set_as_current=False), store=f"sqlite:///{tmp_path / 'e.db'}")
    other.disable("job")
    with pytest.raises(CapabilityDisabled):
        host.run_capability("job", {"n": 2})
    assert ran == [{"n": 1}]
