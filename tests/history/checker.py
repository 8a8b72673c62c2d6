"""The checker: proves pluginhost's guarantees from a recorded history, per plugin.

Pure: :func:`check` takes the merged events (``tests/history/events.py``) and the
state read at the end (:class:`Final`: plugins, audit log, workflow runs, what
``sweep`` reported) and returns a :class:`Report`. Each violation carries the
minimal slice of history that shows it (``proof``) and, apart from it, the faults
active meanwhile (``context``).

Rules (t is ``monotonic_ns``, one clock for every process):

- **G1** A *disabled window* of plugin P opens when a ``disable(P)`` call returns
  (no-op disables included: they return only once P is disabled in the store) and
  closes when the next ``enable(P)`` call *starts* (whatever its outcome: an enable
  that raised may still have committed). A dispatch of a capability of P whose
  ``dispatch_start`` and ``dispatch_accepted`` both lie in the window is a
  violation; a dispatch that started before the disable returned may be accepted,
  and so may one accepted after the next enable started (its store read may have
  come after that enable's commit). A disable with an enable call overlapping it
  (either order of commit possible) opens no window; such windows are counted as
  ``ambiguous``. A dispatch refused, or failed closed (``StoreUnavailable``), is fine.
- **G1-deadline** A dispatch that took longer than ``deadline_s`` (a dispatch makes
  at most two store calls, each bounded by the store timeout, then publishes) is a
  hang, unless a broker restart overlapped it (publish
  retries are the broker's, not the store's); one still running when its process
  was stopped counts until then.
- **G2/G3** Each ``disable(P, wait=True)`` that returned acknowledging hostnames
  opens, for each acknowledging worker, a window from the call's return to the next
  enable start (as for G1). A capability body of P started in that worker (matched
  by hostname; a restarted worker keeps its hostname, and loads the current state
  at start) inside the window is a violation.

  Possible false positive: ``body_start`` is the first statement of the capability
  function, a few microseconds after pluginhost's own check; a body whose check
  passed just *before* the worker published the new revision, and which was then
  descheduled for longer than the acknowledgement took to reach the admin (a
  broker round trip, milliseconds), would be reported. SIGSTOP could widen that
  gap, so the injector stops whole worker groups only (their main process then
  cannot acknowledge). Each G2/G3 violation states its margin (body start minus
  the admin's return); a margin of a few ms on a loaded machine deserves a second
  look, one of 100 ms or more is not this race.
- **G4** Every workflow run in the store is in a terminal state at the end, or was
  reported by ``sweep``. A step body (matched by run tag and step slug) that starts
  again after an execution of it *finished*, or while one is still running, is a
  violation unless the earlier execution's worker was SIGKILLed (or, for one still
  running, SIGSTOPped) in between: those are the deliveries a step requires. A step
  recorded ``succeeded`` whose body never started is a violation.
- **G6** Per plugin, the audit rows form one chain: each row's ``before`` equals the
  previous row's ``after`` and versions go up by one; the last ``after`` equals the
  plugin's final record. Audit rows tie to admin calls by actor (``<proc>:<call>``):
  a call that raised wrote nothing; a call writes at most one row, of its own action,
  with the state it asked for; a call that returned a record (version v) is matched
  by the audit row of version v, with the same state, satisfying the call's intent.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from tests.history.events import Event, format_event, sort_events
from tests.history.timeline import INF, Call, Execution, History, Window, WindowIndex

TERMINAL_RUN_STATES = ("succeeded", "failed", "cancelled")
ENABLEMENT_OPS = {"enable": True, "disable": False}


# -- inputs -------------------------------------------------------------------------


@dataclass
class Final:
    """The state read after the run: the store's truth the history is compared to."""

    plugins: dict[str, dict[str, Any]]  # slug -> record (enabled, config, version, ...)
    audit: list[dict[str, Any]]  # oldest first: id, actor, slug, action, before, after
    runs: list[dict[str, Any]]  # id, status, tag, steps: [{position, slug, status, attempts}]
    swept: list[str] = field(default_factory=list)
    version: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Final:
        if raw.get("version", 1) != 1:
            raise ValueError(f"final state version {raw.get('version')!r}, expected 1")
        return cls(**{k: raw[k] for k in ("plugins", "audit", "runs", "swept") if k in raw})


# -- outputs ------------------------------------------------------------------------


@dataclass
class Violation:
    rule: str
    plugin: str | None
    message: str
    proof: list[Event]
    context: list[Event] = field(default_factory=list)

    def format(self, t0: int) -> str:
        head = f"{self.rule} violation" + (f" (plugin '{self.plugin}')" if self.plugin else "") + f": {self.message}"
        proof = _ordered(self.proof)
        lines = [head, "  minimal slice:"] + [format_event(e, t0, "*") for e in proof]
        extra = [e for e in _ordered(self.context) if e not in self.proof]
        if extra:
            lines.append("  context (faults active meanwhile, the process's own calls):")
            lines += [format_event(e, t0, " ") for e in extra]
        return "\n".join(lines)


@dataclass
class Report:
    violations: list[Violation]
    checked: Counter[str]
    faults: Counter[str]
    t0: int = 0

    @property
    def operations(self) -> int:
        """Operations checked: dispatches and admin calls with an outcome, capability
        bodies, workflow runs and audit rows."""
        keys = ("dispatches", "admin calls", "capability bodies", "workflow runs", "audit rows")
        return sum(self.checked[k] for k in keys)

    def summary(self) -> str:
        faults = ", ".join(f"{k} {v}" for k, v in sorted(self.faults.items())) or "none"
        rules = Counter(v.rule for v in self.violations)
        found = ", ".join(f"{k} {v}" for k, v in sorted(rules.items()))
        return (
            f"history: {self.operations} operations checked, {sum(self.faults.values())} faults injected"
            f" ({faults}), {len(self.violations)} violations" + (f" ({found})" if found else "")
        )

    def details(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(self.checked.items()))

    def format(self, limit: int = 20) -> str:
        parts = [self.summary(), "checked: " + self.details()]
        for v in self.violations[:limit]:
            parts.append(v.format(self.t0))
        if len(self.violations) > limit:
            parts.append(f"... and {len(self.violations) - limit} more violations")
        return "\n\n".join(parts)


# -- the rules ------------------------------------------------------------------------


def check(events: Iterable[Event], final: Final, *, deadline_s: float = 5.0) -> Report:
    """Every rule of the module docstring over one history."""
    h = History(events)
    checked: Counter[str] = Counter()
    violations: list[Violation] = []
    plugins = sorted(
        set(final.plugins)
        | {str(c.slug) for c in h.calls if c.slug}
        | {d.plugin for d in h.dispatches}
        | {str(b.get("plugin")) for b in h.bodies}
    )
    for plugin in plugins:
        violations += check_g1(h, plugin, checked)
        violations += check_g2_g3(h, plugin, checked)
    violations += check_deadline(h, deadline_s, checked)
    violations += check_g4(h, final, checked)
    violations += check_g6(h, final, checked)
    checked["dispatches"] = sum(1 for d in h.dispatches if d.end is not None)
    checked["admin calls"] = sum(1 for c in h.calls if c.end is not None)
    checked["capability bodies"] = len(h.bodies)
    checked["workers with bodies"] = len({b.get("hostname") for b in h.bodies})
    checked["worker refusals"] = sum(1 for e in h.events if e.kind == "worker_refused")
    faults = Counter(s.kind for s in h.faults)
    return Report(violations=violations, checked=checked, faults=faults, t0=h.t0)


def check_g1(h: History, plugin: str, checked: Counter[str]) -> list[Violation]:
    windows, ambiguous = h.windows(plugin)
    checked["G1 windows"] += len(windows)
    checked["G1 ambiguous disables"] += ambiguous
    index = WindowIndex(windows)
    found = []
    for d in h.dispatches:
        if d.plugin != plugin or d.end is None:
            continue
        w = index.covering(d.start.t, d.end.t)
        if w is None:
            continue
        checked["G1 dispatches in windows"] += 1
        if d.end.kind != "dispatch_accepted":
            continue
        after_ms = (d.start.t - w.opened) / 1e6
        until = (
            "no enable started afterwards"
            if w.closed == INF
            else f"the next enable started {(w.closed - d.end.t) / 1e6:.1f} ms after it was accepted"
        )
        own = [
            e for c in h.calls if c.start.proc == d.start.proc and w.opened <= c.start.t < d.start.t for e in c.events()
        ][-6:]
        found.append(Violation(
            "G1", plugin,
            f"dispatch {d.start.get('op')} of '{d.start.get('slug')}' started {after_ms:.1f} ms after "
            f"disable {w.disable.actor} returned and was accepted ({until})",
            proof=[*w.events(), d.start, d.end],
            context=h.faults_during(w.opened, d.end.t) + own,
        ))  # fmt: skip
    return found


def check_deadline(h: History, deadline_s: float, checked: Counter[str]) -> list[Violation]:
    limit = deadline_s * 1e9
    found = []
    for d in h.dispatches:
        took = d.end_t - d.start.t
        if took <= limit:
            continue
        broker = [s for s in h.faults if s.kind == "broker_restart" and s.overlaps(d.start.t, d.end_t)]
        if broker:
            continue
        checked["G1 dispatches over the deadline"] += 1
        what = (
            f"took {took / 1e9:.1f} s"
            if d.end is not None
            else f"was still running {took / 1e9:.1f} s later, when its process was stopped"
        )
        found.append(Violation(
            "G1-deadline", d.plugin,
            f"dispatch {d.start.get('op')} of '{d.start.get('slug')}' {what}"
            f" (deadline {deadline_s:.1f} s: a hang, not fail-closed)",
            proof=[d.start] + ([d.end] if d.end is not None else []),
            context=h.faults_during(d.start.t, d.end_t),
        ))  # fmt: skip
    return found


def check_g2_g3(h: History, plugin: str, checked: Counter[str]) -> list[Violation]:
    windows, _ = h.windows(plugin, acked_only=True)
    by_host: dict[str, list[Window]] = defaultdict(list)
    for w in windows:
        for host in w.disable.acks:
            by_host[host].append(w)
    checked["G2/G3 acknowledged windows"] += sum(len(ws) for ws in by_host.values())
    indexes = {host: WindowIndex(ws) for host, ws in by_host.items()}
    found = []
    for body in h.bodies:
        if body.get("plugin") != plugin:
            continue
        host = str(body.get("hostname"))
        found_w = indexes[host].covering(body.t, body.t) if host in indexes else None
        if found_w is None:
            continue
        w = found_w
        margin_ms = (body.t - w.opened) / 1e6
        lifecycle = [
            e
            for e in h.events
            if w.opened - 1 <= e.t <= body.t
            and e.kind in ("worker_ready", "pool_process_start")
            and e.get("hostname") == host
        ]
        found.append(Violation(
            "G2/G3", plugin,
            f"'{body.get('slug')}' body started in {host} (pid {body.pid}) {margin_ms:.1f} ms after "
            f"disable {w.disable.actor} returned with {host}'s acknowledgement"
            + ("" if w.closed == INF else f", {(w.closed - body.t) / 1e6:.1f} ms before the next enable started"),
            proof=[*w.events(), body],
            context=h.faults_during(w.disable.start.t, body.t) + lifecycle[-4:],
        ))  # fmt: skip
    return found


def check_g4(h: History, final: Final, checked: Counter[str]) -> list[Violation]:
    found: list[Violation] = []
    swept = set(final.swept)
    execs = _executions(h)
    starts = {e.get("run_id"): e for e in h.events if e.kind == "flow_start"}
    checked["workflow runs"] = len(final.runs)
    checked["step executions"] = sum(len(v) for v in execs.values())
    for run in final.runs:
        tag = run.get("tag")
        if run.get("status") not in TERMINAL_RUN_STATES and run.get("id") not in swept:
            proof = [e for e in (starts.get(run.get("id")),) if e is not None]
            proof += [x.start for (t, _), xs in execs.items() if t == tag for x in xs]
            proof.append(_final_event("run", run))
            found.append(Violation(
                "G4", None,
                f"run {run.get('id')} (tag {tag}) ended {run.get('status')!r},"
                " not terminal, and sweep did not report it",
                proof=proof,
            ))  # fmt: skip
        for step in run.get("steps", []):
            if step.get("status") == "succeeded" and not execs.get((str(tag), str(step.get("slug")))):
                found.append(Violation(
                    "G4", None,
                    f"step '{step.get('slug')}' of run {run.get('id')} (tag {tag})"
                    " is recorded succeeded but its body never started",
                    proof=[e for e in (starts.get(run.get("id")),) if e is not None] + [_final_event("run", run)],
                ))  # fmt: skip
    for (tag, slug), xs in sorted(execs.items(), key=lambda kv: kv[1][0].start.t):
        bad = _extra_execution(h, xs)
        if bad is None:
            continue
        earlier, again, how = bad
        owner = next((r for r in final.runs if r.get("tag") == tag), None)
        proof = [earlier.start] + ([earlier.end] if earlier.end else []) + [again.start]
        found.append(Violation(
            "G4", None,
            f"step '{slug}' of run tag {tag} ran again in {again.start.get('hostname')} (pid {again.start.pid}) "
            f"{how}, with no loss of that execution's worker in between",
            proof=proof + ([_final_event("run", owner)] if owner else []),
            context=h.faults_during(earlier.start.t, again.start.t),
        ))  # fmt: skip
    return found


def _executions(h: History) -> dict[tuple[str, str], list[Execution]]:
    """Workflow step bodies by (run tag, step slug), in start order."""
    by_key: dict[tuple[str, str], list[Execution]] = defaultdict(list)
    running: dict[tuple[int, str, str], list[Execution]] = defaultdict(list)
    for e in h.events:
        if e.kind not in ("body_start", "body_end") or not e.get("tag"):
            continue
        key = (str(e.get("tag")), str(e.get("slug")))
        if e.kind == "body_start":
            x = Execution(e, None)
            by_key[key].append(x)
            running[(e.pid, *key)].append(x)
        elif running[(e.pid, *key)]:
            running[(e.pid, *key)].pop().end = e
    return by_key


def _extra_execution(h: History, xs: list[Execution]) -> tuple[Execution, Execution, str] | None:
    """The first execution that no lost delivery justifies: (earlier, again, how)."""
    for i, again in enumerate(xs):
        for earlier in xs[:i]:
            host = earlier.start.get("hostname")
            span = (earlier.start.t, again.start.t)
            killed = _worker_fault(h, "worker_kill", host, *span)
            if earlier.end is not None and earlier.end.t < again.start.t:
                if not killed:
                    gap = (again.start.t - earlier.end.t) / 1e6
                    return (
                        earlier,
                        again,
                        f"{gap:.1f} ms after an execution in {host} (pid {earlier.start.pid}) had finished",
                    )
            elif not killed and not _worker_fault(h, "worker_stop", host, *span):
                return earlier, again, f"while an execution in {host} (pid {earlier.start.pid}) was still running"
    return None


def _worker_fault(h: History, kind: str, host: Any, a: int, b: int) -> bool:
    return any(s.kind == kind and s.start.get("hostname") == host and a <= s.t0 <= b for s in h.faults)


def check_g6(h: History, final: Final, checked: Counter[str]) -> list[Violation]:
    found: list[Violation] = []
    calls = {c.actor: c for c in h.calls}
    admin_procs = {c.start.proc for c in h.calls}
    rows_by_slug: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in sorted(final.audit, key=lambda r: r["id"]):
        rows_by_slug[row["slug"]].append(row)
    checked["audit rows"] = len(final.audit)

    for slug, rows in sorted(rows_by_slug.items()):
        for prev, row in zip(rows, rows[1:]):
            after, before = prev.get("after") or {}, row.get("before") or {}
            if before != after or (row.get("after") or {}).get("version") != after.get("version", 0) + 1:
                found.append(Violation(
                    "G6", slug,
                    f"audit rows {prev['id']} and {row['id']} do not chain: row {row['id']} starts from "
                    f"version {before.get('version')} ({_state(before)}), the row before ended at version "
                    f"{after.get('version')} ({_state(after)}): an update was lost or not audited",
                    proof=_row_proof(calls, prev) + _row_proof(calls, row),
                ))  # fmt: skip
        record = final.plugins.get(slug)
        last = rows[-1].get("after") or {}
        if record is not None and _state(record, True) != _state(last, True):
            found.append(Violation(
                "G6", slug,
                f"the plugin's final record ({_state(record, True)})"
                f" is not the last audited state ({_state(last, True)})",
                proof=_row_proof(calls, rows[-1]) + [_final_event("plugin", record)],
            ))  # fmt: skip

    written: Counter[str] = Counter(str(r.get("actor")) for r in final.audit)
    for row in final.audit:
        actor = str(row.get("actor"))
        call = calls.get(actor)
        if call is None:
            if actor.split(":")[0] in admin_procs:
                found.append(Violation("G6", row["slug"],
                                       f"audit row {row['id']} names call {actor}, which no admin started",
                                       proof=[_final_event("audit", row)]))  # fmt: skip
            continue
        checked["G6 committed calls"] += 1
        after = row.get("after") or {}
        # The documented bound: a write whose COMMIT was sent and not answered says
        # that its outcome is unknown; committed or not, both are consistent.
        unknown = "outcome is unknown" in str((call.end or {}).get("message", ""))
        if call.raised and not unknown:
            assert call.end is not None
            found.append(Violation(
                "G6", row["slug"],
                f"admin call {actor} ({call.op}) raised {call.end.get('error')},"
                f" yet audit row {row['id']} shows it committed",
                proof=[*call.events(), _final_event("audit", row)],
                context=h.faults_during(call.start.t, call.end_t),
            ))  # fmt: skip
        if written[actor] > 1:
            found.append(Violation("G6", row["slug"], f"admin call {actor} wrote {written[actor]} audit rows",
                                   proof=[*call.events(), _final_event("audit", row)]))  # fmt: skip
        problem = _intent_problem(call, row.get("action"), after)
        if problem:
            found.append(Violation("G6", row["slug"], f"audit row {row['id']} of call {actor}: {problem}",
                                   proof=[*call.events(), _final_event("audit", row)]))  # fmt: skip

    by_version = {(r["slug"], (r.get("after") or {}).get("version")): r for r in final.audit}
    for call in h.calls:
        if not call.ok or call.end is None or call.end.get("version") is None:
            continue
        checked["G6 returned records"] += 1
        returned = {"enabled": call.end.get("enabled"), "config": call.end.get("record_config")}
        match = by_version.get((call.slug, call.end.get("version")))
        if match is None:
            found.append(Violation(
                "G6", call.slug,
                f"admin call {call.actor} returned version {call.end.get('version')}, which no audit row has",
                proof=call.events(),
            ))  # fmt: skip
            continue
        after = match.get("after") or {}
        shown = {"enabled": after.get("enabled"), "config": after.get("config")}
        if shown != returned:
            found.append(Violation(
                "G6", call.slug,
                f"admin call {call.actor} returned version {call.end.get('version')} as {returned}, "
                f"audit row {match['id']} has {shown}",
                proof=[*call.events(), _final_event("audit", match)],
            ))  # fmt: skip
        problem = _intent_problem(call, call.op, returned)
        if problem:
            found.append(Violation("G6", call.slug, f"admin call {call.actor} returned a record that {problem}",
                                   proof=[*call.events(), _final_event("audit", match)]))  # fmt: skip
    return found


def _intent_problem(call: Call, action: Any, state: dict[str, Any]) -> str | None:
    if action != call.op:
        return f"action {action!r}, but the call was {call.op!r}"
    if call.op in ENABLEMENT_OPS and state.get("enabled") is not ENABLEMENT_OPS[call.op]:
        return f"has enabled={state.get('enabled')} after {call.op}"
    if call.op == "configure" and state.get("config") != call.start.get("config"):
        return f"has config {state.get('config')}, the call set {call.start.get('config')}"
    return None


def _state(record: dict[str, Any], with_version: bool = False) -> dict[str, Any]:
    keys = ("enabled", "config", "sort") + (("version",) if with_version else ())
    return {k: record.get(k) for k in keys}


def _row_proof(calls: dict[str, Call], row: dict[str, Any]) -> list[Event]:
    call = calls.get(str(row.get("actor")))
    return (call.events() if call else []) + [_final_event("audit", row)]


def _final_event(what: str, data: dict[str, Any]) -> Event:
    """A piece of the final state shown in a slice (it has no time: t = -1)."""
    return Event(t=-1, proc="final", pid=0, kind=what, data=dict(data))


def _ordered(events: list[Event]) -> list[Event]:
    seen: list[Event] = []
    for e in events:
        if e not in seen:
            seen.append(e)
    timed = sort_events(e for e in seen if e.t >= 0)
    return timed + [e for e in seen if e.t < 0]
