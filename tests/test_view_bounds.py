"""The bounds of a process's plugin view, under the faults that broke them.

- G1: a no-op admin call in process A, after process B disabled a plugin, must not
  label A's view with a revision it has not loaded.
- G2/G3: a pool process that knows a newer revision was published and cannot load
  it (its role lost LOGIN) runs no capability body; the run waits, it is not lost.
- G3: the published revision only moves forward, whichever thread publishes.
- G2: ``defer`` waits until the plugin is enabled again, past Celery's default
  ``max_retries``; ``pluginhost_defer_max_s`` ends it with ``CapabilityDisabled``.
- G3: acknowledgements count only this deployment's workers.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from celery import Celery
from sqlalchemy import create_engine, text

from pluginhost import CapabilityDisabled, PluginHost
from pluginhost.store import SQLAlchemyStore
from tests import harness

ROOT = Path(__file__).resolve().parents[1]
REDIS_ONLY = pytest.mark.parametrize("backend", ["redis"], indirect=True)


def _pg_host(url: str) -> PluginHost:
    host = PluginHost(Celery("bounds", broker="memory://", backend="cache+memory://"), store=url)
    host.register_capability("x", lambda payload: "x ran")
    host.register_capability("y", lambda payload: "y ran")
    return host


def _in_other_process(url: str, code: str) -> None:
    """Run ``code`` with ``host`` (a PluginHost on ``url``) in a new Python process."""
    script = (
        "from celery import Celery\n"
        "from pluginhost import PluginHost\n"
        f"host = PluginHost(Celery('other', broker='memory://'), store={url!r})\n" + code
    )
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=True, timeout=60)


# -- G1: a no-op admin call -----------------------------------------------------------


def test_a_no_op_admin_call_does_not_mark_a_stale_view_current(empty_pg_url: str) -> None:
    a = _pg_host(empty_pg_url)
    a.sync()
    assert a.run_capability("x").id  # A's view: x enabled, at the current revision
    before = a.revision

    _in_other_process(empty_pg_url, "host.disable('x', actor='b')\n")

    a.enable("y", actor="a")  # y is already enabled: writes nothing
    with pytest.raises(CapabilityDisabled, match="plugin 'x' is disabled"):
        a.run_capability("x")
    assert a.is_enabled("x") is False
    assert a.revision > before  # the view now is the one B's change produced
    assert [e.action for e in a.audit("y")] == ["create"]  # the no-op left no audit row
    a.store.close()


def test_a_real_change_after_another_process_changed_loads_both(empty_pg_url: str) -> None:
    a = _pg_host(empty_pg_url)
    a.sync()
    a.run_capability("x")
    _in_other_process(empty_pg_url, "host.disable('x', actor='b')\n")
    a.disable("y", actor="a")  # a real write, two revisions past A's view
    assert a.is_enabled("x") is False and a.is_enabled("y") is False
    with pytest.raises(CapabilityDisabled):
        a.run_capability("x")
    a.store.close()


# -- G3: the published revision only moves forward ------------------------------------


class _SlowFirstRead(SQLAlchemyStore):
    """A real SQLite store whose first revision read answers late: the poll that
    read the old revision publishes after the broadcast handler published the new one."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.first_read_done = threading.Event()
        self.release_first = threading.Event()
        self._reads = 0
        self._reads_lock = threading.Lock()

    def revision(self) -> int:
        with self._reads_lock:
            self._reads += 1
            first = self._reads == 1
        value = super().revision()
        if first:
            self.first_read_done.set()
            self.release_first.wait(10)
        return value


def test_a_late_poll_does_not_move_the_published_revision_backwards(tmp_path: Path) -> None:
    store = _SlowFirstRead(f"sqlite:///{tmp_path / 'ph.db'}")
    host = PluginHost(Celery("fwd", broker="memory://"), store=store)
    host.register_capability("x", lambda payload: None)
    host.sync()
    host.worker.start("w@test")  # the worker's main process: publishes its revision
    old = host.worker.shared.value

    poll = threading.Thread(target=host.worker.sync)  # reads `old`, then stalls
    poll.start()
    assert store.first_read_done.wait(10)
    host.disable("x")  # commits: the store is past `old`
    acked = host.worker.sync()  # the broadcast handler publishes the new revision
    assert acked > old and host.worker.shared.value == acked
    store.release_first.set()  # the late poll now tries to publish `old`
    poll.join(10)
    assert host.worker.shared.value == acked
    store.close()


# -- G2/G3: a pool process that cannot reload ---------------------------------------


@REDIS_ONLY
def test_a_pool_process_that_cannot_reload_runs_nothing_and_loses_nothing(
    core: ModuleType, workers: Any, app_conf: dict[str, Any], nologin_role: Any
) -> None:
    worker_url, set_login = nologin_role
    conf = {**app_conf, "pluginhost_store": worker_url, "pluginhost_stale_retry_s": 0.2}
    # one child, replaced after every task: the child that meets the change was
    # forked after worker start, and has never opened a connection of its own
    worker = workers("tests.apps.core", conf=conf, pool="prefork", concurrency=1, max_tasks_per_child=1)
    host = core.host
    assert host.task("pure").delay({"n": 0}).get(timeout=20)["echo"] == {"n": 0}

    queued = host.task("pure").apply_async(args=({"n": 1},), countdown=2)  # bypasses dispatch
    assert host.refresh(wait=True, timeout=5) == [worker.hostname]  # the main process's revision reader is connected
    time.sleep(0.5)  # received: it waits in the worker for its ETA
    set_login(False)  # open connections keep working; no new one can be made
    acks = host.disable("pure", wait=True, timeout=5)
    assert worker.hostname in acks  # the main process read the new revision

    # the ETA passes: the child meets a revision it cannot load, and waits
    deadline = time.monotonic() + 20
    while "cannot load revision" not in worker.log_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1)  # a few retries
    assert queued.state != "SUCCESS", "ran on the stale view"
    set_login(True)
    with pytest.raises(CapabilityDisabled):  # retried, then refused on the current view
        queued.get(timeout=20)
    assert "cannot load revision" in worker.log_text()
    deadline = time.monotonic() + 10  # the result is stored before the worker logs it
    while "raised expected: CapabilityDisabled" not in worker.log_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "raised expected: CapabilityDisabled" in worker.log_text()


# -- G2: defer waits until enabled -------------------------------------------------------


@REDIS_ONLY
def test_defer_waits_past_celerys_default_max_retries(core: ModuleType, workers: Any, app_conf: dict[str, Any]) -> None:
    conf = {**app_conf, "pluginhost_defer_interval_s": 0.1}
    workers("tests.apps.core", conf=conf, pool="solo")
    host = core.host
    host.disable("deferrer", wait=True, timeout=5)
    deferred = host.task("deferrer").delay({"tag": "long"})
    time.sleep(2.0)  # ~20 intervals, far past Celery's default of 3 retries
    assert deferred.state in ("PENDING", "RETRY"), deferred.state
    assert core.executions_of("deferrer", "long") == 0
    host.enable("deferrer", wait=True, timeout=5)
    assert deferred.get(timeout=20) == "ran"
    assert core.executions_of("deferrer", "long") == 1


@REDIS_ONLY
def test_defer_gives_up_after_its_cap_with_capability_disabled(
    core: ModuleType, workers: Any, app_conf: dict[str, Any]
) -> None:
    conf = {**app_conf, "pluginhost_defer_interval_s": 0.1, "pluginhost_defer_max_s": 0.5}
    workers("tests.apps.core", conf=conf, pool="solo")
    host = core.host
    host.disable("deferrer", wait=True, timeout=5)
    started = time.monotonic()
    with pytest.raises(CapabilityDisabled, match="deferred for"):
        host.task("deferrer").delay({"tag": "capped"}).get(timeout=20)
    assert 0.4 < time.monotonic() - started < 10
    assert core.executions_of("deferrer", "capped") == 0


# -- G3: acknowledgements from this deployment only ---------------------------------------


@REDIS_ONLY
def test_acknowledgements_count_only_this_deployments_workers(
    core: ModuleType, workers: Any, app_conf: dict[str, Any], harness_resources: Any
) -> None:
    # Another deployment on the same broker and control exchange, with its own
    # store whose revision is far ahead of ours.
    other_db = harness_resources.pg_database() + "_other"
    harness.create_pg_database(other_db)
    try:
        other_url = harness.pg_url(other_db)
        other = PluginHost(Celery("other", broker="memory://"), store=other_url)
        other.register_capability("pure", lambda payload: None)
        other.sync()
        for i in range(30):
            other.configure("pure", {"i": i})
        other.store.close()
        ours = workers("tests.apps.core", name="ours")
        theirs = workers("tests.apps.core", name="theirs", conf={**app_conf, "pluginhost_store": other_url})
        acks = core.host.disable("work", wait=True, timeout=3)
        assert acks == [ours.hostname], acks
        assert theirs.hostname not in core.host.workers(timeout=2)
        theirs.kill()
    finally:
        harness.drop_pg_database(other_db)


# -- G6: an admin call that raises wrote nothing; one that wrote does not raise -------


def _wait_until_someone_waits_for(conn: Any, relation: str, timeout_s: float = 10) -> None:
    """Return once a backend waits for a lock on ``relation`` (seen in pg_locks)."""
    query = text(
        "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation WHERE NOT l.granted AND c.relname = :rel"
    )
    give_up = time.monotonic() + timeout_s
    while conn.execute(query, {"rel": relation}).scalar_one() == 0:
        assert time.monotonic() < give_up, f"nobody waits for a lock on {relation}"
        time.sleep(0.005)


def test_an_admin_call_whose_write_committed_returns_although_the_reload_after_it_fails(
    empty_pg_url: str,
) -> None:
    """The write commits; a migration then takes an ACCESS EXCLUSIVE lock on the
    revision table before the call reloads its view (stale: another process wrote
    first), and the reload fails at the server's lock_timeout. The change and its
    audit row are committed, so the call must return the record, not raise
    ``StoreUnavailable`` ("nothing was written"), and the view must not be
    labelled with a revision it has not loaded."""
    url = empty_pg_url + "?options=-c%20lock_timeout%3D3000"  # every store connection
    a = _pg_host(url)
    a.sync()
    _in_other_process(empty_pg_url, "host.disable('x', actor='b')\n")  # A's view is stale

    admin = create_engine(empty_pg_url, isolation_level="AUTOCOMMIT")
    blocker = admin.connect()  # holds the audit table: A's write waits inside its transaction
    migration = admin.connect()  # queues for the revision table behind A's write
    probe = admin.connect()
    outcome: dict[str, Any] = {}

    def disable_y() -> None:
        try:
            outcome["result"] = a.disable("y", actor="a")
        except Exception as exc:  # the assertion below shows it
            outcome["error"] = exc

    def take_revision_table() -> None:
        migration.execute(text("SET lock_timeout = 0"))
        migration.execute(text("BEGIN"))
        migration.execute(text("LOCK TABLE pluginhost_revision IN ACCESS EXCLUSIVE MODE"))

    call = threading.Thread(target=disable_y)
    lock = threading.Thread(target=take_revision_table)
    try:
        blocker.execute(text("BEGIN"))
        blocker.execute(text("LOCK TABLE pluginhost_audit IN SHARE MODE"))
        call.start()
        _wait_until_someone_waits_for(probe, "pluginhost_audit")
        lock.start()
        _wait_until_someone_waits_for(probe, "pluginhost_revision")
        blocker.execute(text("COMMIT"))  # A's write commits; the migration gets its lock
        call.join(timeout=20)
        assert not call.is_alive()
    finally:
        for conn in (blocker, migration):
            with contextlib.suppress(Exception):
                conn.execute(text("ROLLBACK"))
        lock.join(timeout=10)
        for conn in (blocker, migration, probe):
            conn.close()
        admin.dispose()

    assert "error" not in outcome, f"the committed change raised: {outcome.get('error')!r}"
    assert outcome["result"].enabled is False and outcome["result"].slug == "y"
    assert [e.action for e in a.audit("y")][:1] == ["disable"]  # committed and audited
    # The view was never labelled current: both changes are seen now.
    assert a.is_enabled("x") is False and a.is_enabled("y") is False
    with pytest.raises(CapabilityDisabled):
        a.run_capability("x")
    a.store.close()
