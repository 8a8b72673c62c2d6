"""The producer and admin processes of a history run.

    python -m tests.history.roles producer --name p0 --seed 7
    python -m tests.history.roles admin --name a0 --seed 7

Settings come from ``PH_CONF`` and the event log from ``PH_HISTORY_DIR`` (see
``tests/history/app.py``). Each runs until SIGTERM (it finishes the call it is in;
a call that hangs is ended by the orchestrator's SIGKILL) and records:

- producer: ``dispatch_start`` / ``dispatch_accepted`` | ``dispatch_refused`` |
  ``dispatch_error`` for each ``run_capability``, and ``flow_start`` /
  ``flow_started`` | ``flow_error`` for each workflow it starts (the run id is
  chosen before the call, so a start that raised can still be found).
- admin: ``admin_start`` / ``admin_return`` | ``admin_error`` for each enable,
  disable (``wait=True`` returns the acknowledging hostnames), configure and
  refresh, chosen at random with no read first, so no-op calls happen as they
  would in production; the actor of each call is ``<name>:<call>``, which ties
  audit rows to calls. After most of its calls an admin also dispatches each
  capability (a process that both administers and dispatches: issue 11, break 1).

A fifth of the producers' runs are sent with a countdown of 0.2-3 s: they wait in
a worker, so runs queued before a disable meet the worker-side check after it.
"""

from __future__ import annotations

import argparse
import random
import signal
import sys
import time
import uuid
from typing import Any

STOP = {"now": False}


def _on_term(signum: int, frame: Any) -> None:
    STOP["now"] = True


def _describe(exc: BaseException) -> dict[str, str]:
    return {"error": type(exc).__name__, "message": str(exc)[:300]}


class Dispatcher:
    """Dispatches one capability run at a time and records what happened."""

    def __init__(self, name: str, rng: random.Random) -> None:
        from tests.history import app

        self.app, self.name, self.rng, self.n = app, name, rng, 0

    def dispatch(self, slug: str | None = None, countdown_p: float = 0.0) -> None:
        """One ``run_capability``; with probability ``countdown_p`` the run waits in
        a worker for 0.2-3 s before it starts (an ETA task: queued before a toggle,
        executed after it)."""
        from pluginhost import CapabilityDisabled

        app, self.n = self.app, self.n + 1
        op = f"{self.name}#{self.n}"
        slug = slug or self.rng.choice(sorted(app.JOBS))
        options = {"countdown": round(self.rng.uniform(0.2, 3.0), 3)} if self.rng.random() < countdown_p else {}
        app.log.emit("dispatch_start", op=op, slug=slug, plugin=app.JOBS[slug], **options)
        try:
            result = app.host.run_capability(slug, {"op": op}, **options)
        except CapabilityDisabled as exc:
            app.log.emit("dispatch_refused", op=op, **_describe(exc))
        except Exception as exc:  # noqa: BLE001 - every other outcome is recorded, not fatal
            app.log.emit("dispatch_error", op=op, **_describe(exc))
        else:
            app.log.emit("dispatch_accepted", op=op, task_id=result.id)

    def start_flow(self) -> None:
        app, self.n = self.app, self.n + 1
        op = f"{self.name}#{self.n}"
        tag = f"{self.name}-{self.n}"
        run_id = str(uuid.uuid4())
        app.log.emit("flow_start", op=op, tag=tag, run_id=run_id)
        try:
            app.flows.start(app.WORKFLOW, {"tag": tag}, task_id=run_id)
        except Exception as exc:  # noqa: BLE001 - recorded; the run may still exist
            app.log.emit("flow_error", op=op, tag=tag, run_id=run_id, **_describe(exc))
        else:
            app.log.emit("flow_started", op=op, tag=tag, run_id=run_id)


def producer(name: str, seed: int, flow_p: float, pause_ms: tuple[float, float]) -> None:
    rng = random.Random(f"{seed}:{name}")
    d = Dispatcher(name, rng)
    d.app.log.emit("role_ready", role="producer")
    while not STOP["now"]:
        if rng.random() < flow_p:
            d.start_flow()
        else:
            d.dispatch(countdown_p=0.2)
        time.sleep(rng.uniform(*pause_ms) / 1000)


# op -> weight; wait is chosen per call
# (enabled more often than not, so workflow runs get through their steps too)
ADMIN_OPS = {"disable_wait": 3, "disable": 1, "enable": 7, "configure": 1, "refresh": 1}


def admin(name: str, seed: int, pause_ms: tuple[float, float], wait_timeout_s: float) -> None:
    rng = random.Random(f"{seed}:{name}")
    d = Dispatcher(name, rng)
    app, host = d.app, d.app.host
    ops, weights = zip(*ADMIN_OPS.items())
    app.log.emit("role_ready", role="admin")
    call = 0
    while not STOP["now"]:
        call += 1
        kind = rng.choices(ops, weights)[0]
        slug = rng.choice(app.PLUGINS)
        wait = kind == "disable_wait" or (kind in ("enable", "refresh") and rng.random() < 0.3)
        op = "disable" if kind == "disable_wait" else kind
        actor = f"{name}:{call}"
        fields: dict[str, Any] = {"call": call, "actor": actor, "op": op, "wait": wait}
        if op != "refresh":
            fields["slug"] = slug
        if op == "configure":
            fields["config"] = {"n": rng.randint(0, 3)}
        app.log.emit("admin_start", **fields)
        try:
            if op == "refresh":
                result: Any = host.refresh(actor=actor, wait=wait, timeout=wait_timeout_s)
            elif op == "configure":
                result = host.configure(slug, fields["config"], actor=actor)
            else:
                result = getattr(host, op)(slug, actor=actor, wait=wait, timeout=wait_timeout_s)
        except Exception as exc:  # noqa: BLE001 - recorded; the checker judges it
            app.log.emit("admin_error", **fields, **_describe(exc))
        else:
            app.log.emit("admin_return", **fields, **_result(result))
        if rng.random() < 0.6:  # then it dispatches every capability, as a web app of ours might
            for job in rng.sample(sorted(app.JOBS), len(app.JOBS)):
                d.dispatch(job)
        time.sleep(rng.uniform(*pause_ms) / 1000)


def _result(result: Any) -> dict[str, Any]:
    """What an admin call returned: the acknowledging hostnames, or the record."""
    if result is None:
        return {}
    if isinstance(result, list):
        return {"acks": sorted(str(h) for h in result)}
    return {
        "version": result.version,
        "enabled": result.enabled,
        "record_config": dict(result.config),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.history.roles")
    p.add_argument("role", choices=("producer", "admin"))
    p.add_argument("--name", required=True)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--flow-p", type=float, default=0.04, help="producer: share of iterations that start a workflow")
    p.add_argument("--pause-ms", type=float, nargs=2, default=None, help="pause between operations (min max)")
    p.add_argument("--wait-timeout", type=float, default=1.0, help="admin: timeout of wait=True calls")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGINT, _on_term)
    if args.role == "producer":
        producer(args.name, args.seed, args.flow_p, tuple(args.pause_ms or (3.0, 25.0)))
    else:
        admin(args.name, args.seed, tuple(args.pause_ms or (50.0, 400.0)), args.wait_timeout)
    from tests.history import app

    app.log.emit("role_exit")
    return 0


if __name__ == "__main__":
    sys.exit(main())
