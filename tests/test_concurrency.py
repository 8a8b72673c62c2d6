"""G6 under real concurrency: 8 processes x 200 admin updates against PostgreSQL.
No update is lost, every change is in the audit log exactly once, the final
state is the last committed write, and readers never see a half-written record."""

from __future__ import annotations

import multiprocessing as mp
from collections import Counter
from typing import Any

import pytest

PROCESSES, UPDATES = 8, 200


def _host(url: str) -> Any:
    from celery import Celery

    from pluginhost import PluginHost

    return PluginHost(Celery("g6", broker="memory://"), store=url)


def _writer(url: str, index: int, results: Any) -> None:
    from pluginhost import ConcurrentUpdate

    host = _host(url)
    applied = conflicts = 0
    # 200 updates: half on the shared "hot" plugin, a quarter on the process's
    # own plugin, a quarter compare-and-set on the shared "cas" plugin
    for seq in range(UPDATES):
        if seq % 4 in (0, 1):
            host.configure("hot", {"writer": index, "seq": seq}, actor=f"w{index}")
        elif seq % 4 == 2:
            host.configure(f"own{index}", {"seq": seq}, actor=f"w{index}")
        else:
            current = host.store.get("cas")
            try:
                host.configure(
                    "cas", {"writer": index, "seq": seq}, actor=f"w{index}", expected_version=current.version
                )
                applied += 1
            except ConcurrentUpdate:
                conflicts += 1
    results.put((index, applied, conflicts))


def _reader(url: str, stop: Any, results: Any) -> None:
    host = _host(url)
    seen = []
    while not stop.is_set():
        p = host.store.get("hot")
        seen.append((p.version, p.config))
    results.put(seen)


@pytest.fixture
def url(empty_pg_url: str) -> str:
    url = empty_pg_url
    from pluginhost import Plugin

    host = _host(url)
    host.sync()
    for slug in ["hot", "cas", *(f"own{i}" for i in range(PROCESSES))]:
        host.register(Plugin(slug=slug), actor="setup")
    host.store.close()
    return url


def test_eight_processes_of_admin_updates_lose_nothing(url: str) -> None:
    ctx = mp.get_context("spawn")
    results, reads, stop = ctx.Queue(), ctx.Queue(), ctx.Event()
    writers = [ctx.Process(target=_writer, args=(url, i, results)) for i in range(PROCESSES)]
    reader = ctx.Process(target=_reader, args=(url, stop, reads))
    procs = [*writers, reader]
    try:
        for p in procs:
            p.start()
        outcomes = [results.get(timeout=300) for _ in writers]
        stop.set()
        seen = reads.get(timeout=60)
    finally:
        stop.set()
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join(5)
    assert all(p.exitcode == 0 for p in procs)

    host = _host(url)
    audit = host.audit("hot", limit=100_000)
    configs = [a for a in audit if a.action == "configure"]
    # every update of "hot" is one version and one audit row, exactly once
    hot_seqs = [s for s in range(UPDATES) if s % 4 in (0, 1)]
    assert len(configs) == PROCESSES * len(hot_seqs)
    assert Counter((a.after["config"]["writer"], a.after["config"]["seq"]) for a in configs) == Counter(
        {(w, s): 1 for w in range(PROCESSES) for s in hot_seqs}
    )
    final = host.get("hot")
    assert final.version == 1 + PROCESSES * len(hot_seqs)
    history = sorted(configs, key=lambda a: a.after["version"])
    for prev, cur in zip(history, history[1:]):
        assert cur.before == prev.after  # applied in order, nothing in between lost
    assert history[-1].after["config"] == final.config  # the last committed write wins
    # per-writer order is kept
    for w in range(PROCESSES):
        seqs = [a.after["config"]["seq"] for a in history if a.after["config"]["writer"] == w]
        assert seqs == sorted(seqs)
    # readers saw only whole records: each (version, config) is the audited one
    by_version = {a.after["version"]: a.after["config"] for a in history}
    by_version[1] = {}
    assert seen and all(by_version[v] == c for v, c in seen)
    # optimistic updates: each either applied or raised ConcurrentUpdate
    applied = sum(a for _, a, _ in outcomes)
    conflicts = sum(c for _, _, c in outcomes)
    assert applied + conflicts == PROCESSES * UPDATES // 4 and applied > 0
    cas = [a for a in host.audit("cas", limit=100_000) if a.action == "configure"]
    assert len(cas) == applied and host.get("cas").version == 1 + applied
    for i in range(PROCESSES):
        assert host.get(f"own{i}").config == {"seq": max(s for s in range(UPDATES) if s % 4 == 2)}
    print(
        f"\nG6: {PROCESSES}x{UPDATES} updates; optimistic: {applied} applied,"
        f" {conflicts} ConcurrentUpdate; {len(seen)} reads checked"
    )
