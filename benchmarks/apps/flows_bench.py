"""The app that ``benchmarks/workflow.py`` runs its worker on.

Five trivial capabilities (``wfb_s1`` .. ``wfb_s5``) and, with the same bodies,
five plain Celery tasks (``wfbench.bare.s1`` .. ``s5``) plus a plain chord
callback; two workflows (``wfbench_seq``: five sequential steps,
``wfbench_par``: one ``Parallel`` of three steps).

Settings come from the environment (set by the benchmark before it imports this
module and before it starts the worker):

    WFBENCH_BROKER   broker URL          (default redis://127.0.0.1:6379/11)
    WFBENCH_BACKEND  result backend URL  (default redis://127.0.0.1:6379/11)
    WFBENCH_STORE    pluginhost store    (default postgresql+psycopg://postgres@127.0.0.1/pluginhost_wfbench)
    WFBENCH_QUEUE    task queue          (default wfbench)
    WFBENCH_SYNC_COMMIT  "0": set workflows_synchronous_commit=False
    WFBENCH_PROFILE  "1": time the workflow store calls, the capability call and
                     every task in this process; ``wfbench.stats`` returns them
    WFBENCH_WORKFLOWS_PATH  a directory put first on sys.path before ``workflows``
                     is imported (to measure a patched copy of the package that
                     lives outside the repository)
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

_alt = os.environ.get("WFBENCH_WORKFLOWS_PATH")
if _alt:
    sys.path.insert(0, _alt)

from celery import Celery, signals  # noqa: E402

from pluginhost import PluginHost  # noqa: E402
from workflows import Parallel, Step, Workflow, WorkflowCapability, Workflows  # noqa: E402

QUEUE = os.environ.get("WFBENCH_QUEUE", "wfbench")
STORE = os.environ.get("WFBENCH_STORE", "postgresql+psycopg://postgres@127.0.0.1/pluginhost_wfbench")

app = Celery("flows_bench")
app.conf.update(
    broker_url=os.environ.get("WFBENCH_BROKER", "redis://127.0.0.1:6379/11"),
    result_backend=os.environ.get("WFBENCH_BACKEND", "redis://127.0.0.1:6379/11"),
    pluginhost_store=STORE,
    task_default_queue=QUEUE,
    control_exchange="wfbench",  # pings stay away from other apps' workers on the broker
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    result_expires=600,
    # WFBENCH_SYNC_COMMIT=0: history writes without waiting for the WAL flush
    workflows_synchronous_commit=os.environ.get("WFBENCH_SYNC_COMMIT", "1") != "0",
)
host = PluginHost(app)
flows = Workflows(host)  # here, so the worker registers the workflow step/merge/finish tasks

SEQ = "wfbench_seq"
PAR = "wfbench_par"
SEQ_SLUGS = [f"wfb_s{i}" for i in range(1, 6)]
PAR_SLUGS = ["wfb_s1", "wfb_s2", "wfb_s3"]


def _body(i: int) -> Callable[[dict[str, Any]], dict[str, Any]]:
    key = f"s{i}"

    def body(payload: dict[str, Any]) -> dict[str, Any]:
        return {key: int(payload.get("n", 0)) + i}

    body.__name__ = f"wfb_s{i}"
    return body


BODIES = {i: _body(i) for i in range(1, 6)}

# The pluginhost side: capabilities, composed into workflows.
for _i, _fn in BODIES.items():
    host.register_capability(f"wfb_s{_i}", _fn)


# The bare side: plain tasks with the same bodies, each taking and returning the
# context dict merged with its output (as a workflow step does).
def _bare(i: int) -> Any:
    fn = BODIES[i]

    def bare_step(context: dict[str, Any]) -> dict[str, Any]:
        return {**context, **fn(context)}

    bare_step.__name__ = f"bare_s{i}"
    return app.task(name=f"wfbench.bare.s{i}", shared=False)(bare_step)


BARE = {i: _bare(i) for i in BODIES}


@app.task(name="wfbench.bare.merge", shared=False)
def bare_merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Chord callback: branch outputs merged in declaration order."""
    merged: dict[str, Any] = {}
    for r in results:
        merged.update(r)
    return merged


def bare_chain(context: dict[str, Any]) -> Any:
    from celery import chain

    return chain(BARE[1].s(context), *(BARE[i].s() for i in range(2, 6)))


def bare_chord(context: dict[str, Any]) -> Any:
    from celery import chord

    return chord([BARE[i].s(context) for i in (1, 2, 3)], bare_merge.s())


def define() -> tuple[int, int]:
    """Store both definitions (idempotent: an unchanged definition keeps its version)."""
    seq = flows.define(Workflow(SEQ, steps=[Step(s) for s in SEQ_SLUGS]), actor="wfbench")
    par = flows.define(Workflow(PAR, steps=[Parallel(*(Step(s) for s in PAR_SLUGS))]), actor="wfbench")
    return seq, par


define()

# The path users take: run_capability on a capability that runs the workflow.
SEQ_CAP, PAR_CAP = "wfb_seq_flow", "wfb_par_flow"
host.register_capability(SEQ_CAP, WorkflowCapability(host, SEQ))
host.register_capability(PAR_CAP, WorkflowCapability(host, PAR))


# -- optional profiling (WFBENCH_PROFILE=1) -------------------------------------

STATS: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0.0])  # name -> [count, total_s, max_s]
_stats_lock = threading.Lock()


def _add(name: str, seconds: float) -> None:
    with _stats_lock:
        s = STATS[name]
        s[0] += 1
        s[1] += seconds
        s[2] = max(s[2], seconds)


def _timed(owner: Any, attr: str, label: str) -> None:
    orig = getattr(owner, attr)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return orig(*args, **kwargs)
        finally:
            _add(label, time.perf_counter() - t)

    wrapper.__wrapped__ = orig  # type: ignore[attr-defined]
    setattr(owner, attr, wrapper)


def install_profiling() -> None:
    """Wrap the workflow store calls, the step body and the capability call with timers.

    Each store write is also split into its statements (``.sql``) and the
    rest (``.txn``: pool checkout, and for a transaction BEGIN and COMMIT; an
    autocommitted statement's WAL flush wait is inside ``.sql``).
    """
    from workflows.runtime import Runtime
    from workflows.store import SqlWorkflowStore
    from workflows.store.postgres import PgWorkflowStore

    current: list[str] = []

    def split(owner: type, attr: str) -> None:
        orig = getattr(owner, attr)

        def wrapper(self: Any, fn: Callable[[Any], Any]) -> Any:
            label = current[-1] if current else "store.other"
            inner = [0.0]

            def timed(conn: Any) -> Any:
                t = time.perf_counter()
                try:
                    return fn(conn)
                finally:
                    inner[0] = time.perf_counter() - t

            t = time.perf_counter()
            try:
                return orig(self, timed)
            finally:
                total = time.perf_counter() - t
                _add(label + ".sql", inner[0])
                _add(label + ".txn", total - inner[0])

        setattr(owner, attr, wrapper)

    split(SqlWorkflowStore, "_write")  # a transaction: BEGIN, statements, COMMIT
    split(SqlWorkflowStore, "_read")
    split(PgWorkflowStore, "_run")  # the kept connection: draining an earlier answer, (re)connecting

    def labelled(owner: type, name: str) -> None:
        orig = getattr(owner, name)

        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            current.append("store." + name)
            t = time.perf_counter()
            try:
                return orig(self, *args, **kwargs)
            finally:
                current.pop()
                _add("store." + name, time.perf_counter() - t)

        setattr(owner, name, wrapper)

    for owner in (SqlWorkflowStore, PgWorkflowStore):
        for name in (
            "begin_step",
            "post_step",
            "finish_step",
            "finish_stage",
            "finish_run",
            "create_newest_run",
            "definition",
        ):
            labelled(owner, name)
    _timed(Runtime, "run_step", "step.run_step (whole body)")
    _timed(PluginHost, "call_capability", "step.call_capability")
    _timed(PluginHost, "call_capability_with", "step.call_capability_with")
    _timed(PluginHost, "is_enabled", "step.is_enabled")
    _timed(PluginHost, "get", "step.host_get")

    starts: dict[str, float] = {}

    @signals.task_prerun.connect(weak=False)
    def _pre(task_id: str | None = None, **_: Any) -> None:
        if task_id:
            starts[task_id] = time.perf_counter()

    @signals.task_postrun.connect(weak=False)
    def _post(task_id: str | None = None, task: Any = None, **_: Any) -> None:
        t = starts.pop(task_id or "", None)
        if t is not None and task is not None and task.name != "wfbench.stats":
            # every capability's step task (workflows.step.<slug>) counts as the step task
            name = "workflows.step" if task.name.startswith("workflows.step.") else task.name
            _add("task " + name, time.perf_counter() - t)


@app.task(name="wfbench.stats", shared=False)
def stats(reset: bool = True) -> dict[str, list[float]]:
    """The timings of the worker process that runs this task (solo pool: the worker)."""
    with _stats_lock:
        out = {k: list(v) for k, v in STATS.items()}
        if reset:
            STATS.clear()
    return out


if os.environ.get("WFBENCH_PROFILE") == "1":
    install_profiling()
