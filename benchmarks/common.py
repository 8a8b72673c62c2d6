"""Shared pieces of the benchmarks: services, config, worker subprocesses, printing.

The servers, the Redis db claim and the worker subprocesses are the test harness's
(``tests/harness/``): a benchmark's workers are ``tests.harness.Worker``s (own
process group, always stopped), and its Redis db is claimed with the same owner
key as a pytest session's, so neither uses the other's db.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests import harness  # noqa: E402
from tests.harness import AMQP_URL, LOCALHOST, Worker, WorkerFactory  # noqa: E402

PG_DB = "pluginhost_bench"
PG_URL = f"postgresql+psycopg://postgres@{LOCALHOST}/{PG_DB}"
PG_ADMIN = harness.pg_conninfo(harness.PG_ADMIN_DB)
APP_MODULE = "benchmarks.apps.bench"
CONF_ENV = "BENCH_CONF"  # the bench app's settings (see benchmarks/apps/bench.py)
CONTROL_EXCHANGE = "pluginhost_bench"  # keeps our broadcasts away from other apps' workers
#: Redis db indexes a benchmark may claim (a pytest session may take any of 1..15:
#: the claim keeps them apart), and how long a claim lasts if never released.
REDIS_DBS = range(9, 16)
REDIS_CLAIM_TTL_S = 3600
#: Worker.start keywords of every benchmark worker.
WORKER_OPTIONS: dict[str, Any] = {"loglevel": "WARNING", "extra_args": ["--without-heartbeat"], "conf_env": None}


# -- services -------------------------------------------------------------------


def create_pg_database(name: str = PG_DB) -> str:
    """(Re)create an empty database; returns its SQLAlchemy URL."""
    harness.create_pg_database(name)
    return f"postgresql+psycopg://postgres@{LOCALHOST}/{name}"


class RedisDb:
    """A Redis db index claimed for this run (flushed; owner key set), released at exit."""

    def __init__(self, preferred: int = 9) -> None:
        import redis

        self.owner = harness.redis_owner()
        indexes = [preferred, *[i for i in REDIS_DBS if i != preferred]]
        try:
            self.index = harness.claim_redis_db(self.owner, indexes, ttl_s=REDIS_CLAIM_TTL_S)
        except RuntimeError:
            raise RuntimeError(f"no free Redis db index in {REDIS_DBS.start}..{REDIS_DBS.stop - 1}") from None
        self.client = redis.Redis(host=LOCALHOST, port=harness.REDIS_PORT, db=self.index)
        self.url = harness.redis_url(self.index)

    def release(self) -> None:
        harness.release_redis_db(self.index, self.owner)
        self.client.close()


def celery_conf(broker: str, redis: RedisDb, store: str, queue: str, **extra: Any) -> dict[str, Any]:
    """Celery settings shared by the benchmark process and its workers."""
    conf: dict[str, Any] = {
        "broker_url": redis.url if broker == "redis" else AMQP_URL,
        "result_backend": None,
        "task_ignore_result": True,
        "task_default_queue": queue,
        "control_exchange": CONTROL_EXCHANGE,
        "pluginhost_store": store,
        "worker_hijack_root_logger": True,
        "broker_connection_retry_on_startup": True,
    }
    conf.update(extra)
    return conf


def bench_conf(celery: dict[str, Any], redis: RedisDb, mode: str, key: str = "bench:count") -> dict[str, Any]:
    return {"celery": celery, "redis_url": redis.url, "mode": mode, "key": key, "ignore_result": True}


def payload(i: int) -> dict[str, Any]:
    """The input of the i-th dispatch (dispatch.py, bulk.py)."""
    return {"i": i, "email": "a@b.c", "tags": ["x", "y"]}


@dataclass
class Setup:
    """What a benchmark script runs against: its arguments (from :func:`parser`), the
    Redis db it claimed and its PostgreSQL database (see :func:`claimed`)."""

    args: argparse.Namespace
    redis: RedisDb
    pg_url: str

    @property
    def broker_name(self) -> str:
        return "Redis" if self.args.broker == "redis" else "RabbitMQ"

    @property
    def broker_label(self) -> str:
        """The broker, as the header shows it."""
        return f"{self.args.broker} (redis db {self.redis.index})" if self.args.broker == "redis" else "amqp (RabbitMQ)"

    def conf(self, store: str, queue: str) -> dict[str, Any]:
        """The bench settings (see :func:`bench_conf`) on this broker and ``store``, for
        dispatch without a worker (mode ``none``)."""
        return bench_conf(celery_conf(self.args.broker, self.redis, store, queue), self.redis, "none")

    def header(self, title: str, **inputs: Any) -> None:
        """:func:`header`, the software and server versions last."""
        header(title, **inputs, versions=versions(), servers=server_versions(self.redis))

    def write_rows(self, rows: Sequence[dict[str, Any]]) -> None:
        """:func:`write_rows` to ``--json-out``."""
        write_rows(self.args.json_out, rows)


@contextmanager
def claimed(args: argparse.Namespace) -> Iterator[Setup]:
    """Claim a Redis db (``--redis-db`` if free) and (re)create the ``--db`` database;
    the db is flushed and given back at the end, whatever happens."""
    redis = RedisDb(args.redis_db)
    try:
        yield Setup(args, redis, create_pg_database(args.db))
    finally:
        redis.release()


def purge(app: Any, *queues: str) -> int:
    """Drop every message of ``queues`` (returns how many)."""
    n = 0
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        for q in queues:
            try:
                n += channel.queue_purge(q) or 0
            except Exception:  # the queue does not exist (AMQP): nothing to purge
                conn.close()
                channel = conn.default_channel
    return n


def queue_length(app: Any, queue: str) -> int:
    with app.connection_for_write() as conn:
        try:
            _, count, _ = conn.default_channel.queue_declare(queue, passive=True)
            return int(count)
        except Exception:
            return 0


# -- workers --------------------------------------------------------------------


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@contextmanager
def running_workers(specs: Sequence[dict[str, Any]], conf: dict[str, Any]) -> Iterator[list[Worker]]:
    """Start workers of the bench app (``specs``: ``Worker.start`` keywords such as name,
    pool, concurrency, queues) with the bench settings ``conf``, wait until each answers a
    ping, and ALWAYS stop them (SIGTERM to each group at once, SIGKILL after 10 s)."""
    factory = WorkerFactory(conf["celery"], Path(tempfile.mkdtemp(prefix="ph-bench-")))
    try:
        for spec in specs:
            factory(APP_MODULE, wait=False, env={CONF_ENV: json.dumps(conf)}, **WORKER_OPTIONS, **spec)
        for w in factory.started:
            w.wait_ready()
        yield list(factory.started)
    finally:
        for problem in factory.stop_all(graceful=True, group=True):
            print(f"warning: a worker did not stop cleanly: {problem}", file=sys.stderr)


# -- reporting --------------------------------------------------------------------


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--broker", choices=("redis", "amqp"), default="redis")
    p.add_argument("--redis-db", type=int, default=9, help="preferred Redis db index (default 9)")
    p.add_argument("--db", default=PG_DB, help=f"PostgreSQL database, dropped and re-created (default {PG_DB})")
    p.add_argument(
        "--json-out", metavar="PATH", help="also write the summary figures as JSON rows (python -m benchmarks)"
    )
    return p


def versions() -> str:
    import celery
    import kombu
    import psycopg
    import sqlalchemy

    try:
        from importlib.metadata import version

        ph = version("pluginhost")
    except Exception:
        ph = "?"
    return (
        f"python {platform.python_version()}, celery {celery.__version__}, kombu {kombu.__version__}, "
        f"pluginhost {ph}, sqlalchemy {sqlalchemy.__version__}, psycopg {psycopg.__version__}; "
        f"{os.cpu_count()} CPUs, {platform.platform()}"
    )


def server_versions(redis: RedisDb) -> str:
    import psycopg

    with psycopg.connect(PG_ADMIN) as conn:
        pg = conn.execute("SHOW server_version").fetchone()[0]
    rv = redis.client.info("server").get("redis_version")
    return f"PostgreSQL {pg}, Redis {rv}"


def loadavg() -> str:
    """Load average and CPU pressure (share of time something waited for a CPU, last 10 s)."""
    try:
        text = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        text = "?"
    try:
        some = Path("/proc/pressure/cpu").read_text().split("\n")[0].split()[1]
        text += f", cpu pressure {some.split('=')[1]}%"
    except (OSError, IndexError):
        pass
    return text


def header(title: str, **inputs: Any) -> None:
    print(f"== {title}")
    inputs = {
        **inputs,
        "load average": f"{loadavg()} (other jobs share this machine: ratios come from interleaved rounds)",
    }
    width = max(len(k) for k in inputs) if inputs else 0
    for k, v in inputs.items():
        print(f"  {k:<{width}} : {v}")
    sys.stdout.flush()


def percentile(values: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (p in 0..100) by nearest rank: the smallest value with at
    least p% of the values <= it (p 0: the smallest); NaN when there are none. Every
    benchmark figure called pNN is this."""
    if not values:
        return float("nan")
    s = sorted(values)
    rank = math.ceil(Fraction(str(p)) * len(s) / 100)  # exact: no float error at whole ranks
    return s[min(max(rank, 1), len(s)) - 1]


def verdict(value: float, target: float, higher_is_better: bool = True) -> str:
    ok = value >= target if higher_is_better else value <= target
    return "MEETS target" if ok else "MISSES target"


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summary_row(
    figure: str,
    bare: str,
    pluginhost: str,
    ratio: float | None = None,
    target: str = "",
    passed: bool | None = None,
) -> dict[str, Any]:
    """One row of the summary table of ``python -m benchmarks`` (see ``write_rows``)."""
    if ratio is not None and not math.isfinite(ratio):
        ratio = None  # NaN/inf: not representable in JSON
    return {
        "figure": figure,
        "bare": bare,
        "pluginhost": pluginhost,
        "ratio": ratio,
        "target": target,
        "passed": passed,
    }


def write_rows(path: str | None, rows: Sequence[dict[str, Any]]) -> None:
    """``--json-out PATH``: the script's summary figures as a JSON list of rows
    {figure, bare, pluginhost, ratio, target, passed}; nothing when ``path`` is empty."""
    if not path:
        return
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(list(rows), indent=1))
    tmp.replace(path)


def cpu_ns(pids: Sequence[int]) -> int:
    """CPU time (ns) consumed so far by every thread of ``pids`` (/proc/<pid>/task/*/schedstat).

    Robust to other jobs on the machine, unlike wall time: it only grows while our
    processes run.
    """
    total = 0
    for pid in pids:
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except FileNotFoundError:
            continue
        for tid in tasks:
            try:
                total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
            except (FileNotFoundError, ValueError, IndexError):
                pass
    return total
