"""Shared pieces of the benchmarks: services, config, worker subprocesses, printing.

Nothing here imports tests/; the worker helper is a small, self-contained version
of tests/harness.py's ``Worker`` (own process group, always stopped).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

LOCALHOST = "127.0.0.1"
PG_DB = "pluginhost_bench"
PG_URL = f"postgresql+psycopg://postgres@{LOCALHOST}/{PG_DB}"
PG_ADMIN = f"host={LOCALHOST} port=5432 user=postgres dbname=test connect_timeout=3"
AMQP_URL = f"amqp://guest:guest@{LOCALHOST}:5672//"
APP_MODULE = "benchmarks.apps.bench"
# Same owner key / format as tests/harness.py, so a concurrent pytest session skips our db.
REDIS_OWNER_KEY = "pluginhost:test-harness:owner"
CONTROL_EXCHANGE = "pluginhost_bench"  # keeps our broadcasts away from other apps' workers


# -- services -------------------------------------------------------------------


def create_pg_database(name: str = PG_DB) -> str:
    """(Re)create an empty database; returns its SQLAlchemy URL."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return f"postgresql+psycopg://postgres@{LOCALHOST}/{name}"


_CLAIM = """
local owner = redis.call('GET', KEYS[1])
if owner == false then
  if redis.call('DBSIZE') > 0 then return 0 end
elseif owner ~= ARGV[2] then
  return 0
end
redis.call('FLUSHDB')
redis.call('SET', KEYS[1], ARGV[1], 'EX', 3600)
return 1
"""


class RedisDb:
    """A Redis db index claimed for this run (flushed; owner key set), released at exit."""

    def __init__(self, preferred: int = 9) -> None:
        import redis

        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        for index in [preferred, *[i for i in range(9, 16) if i != preferred]]:
            client = redis.Redis(host=LOCALHOST, port=6379, db=index)
            current = (client.get(REDIS_OWNER_KEY) or b"").decode()
            if current and _owner_alive(current):
                client.close()
                continue
            if client.eval(_CLAIM, 1, REDIS_OWNER_KEY, self.owner, current):
                self.index = index
                self.client = client
                self.url = f"redis://{LOCALHOST}:6379/{index}"
                return
            client.close()
        raise RuntimeError("no free Redis db index in 9..15")

    def reset(self) -> None:
        """Empty the db (keeps our owner key)."""
        self.client.flushdb()
        self.client.set(REDIS_OWNER_KEY, self.owner, ex=3600)

    def release(self) -> None:
        if (self.client.get(REDIS_OWNER_KEY) or b"").decode() == self.owner:
            self.client.flushdb()
        self.client.close()


def _owner_alive(owner: str) -> bool:
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


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


class Worker:
    """``celery -A benchmarks.apps.bench worker`` in its own process group."""

    def __init__(
        self,
        name: str,
        conf: dict[str, Any],
        *,
        pool: str = "prefork",
        concurrency: int = 2,
        queues: Sequence[str] = ("bench",),
        log_dir: Path,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.hostname = f"{name}@{socket.gethostname()}"
        self.pool = pool
        self.concurrency = concurrency
        self.log_path = log_dir / f"worker-{name}.log"
        setpriv = shutil.which("setpriv")
        argv = [
            *([setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []),
            sys.executable, "-m", "celery", "-A", APP_MODULE, "worker",
            f"--pool={pool}", f"--concurrency={concurrency}", "-n", self.hostname,
            "--without-gossip", "--without-mingle", "--without-heartbeat",
            "--loglevel=WARNING", "-Q", ",".join(queues), *extra_args,
        ]  # fmt: skip
        env = dict(os.environ)
        env["BENCH_CONF"] = json.dumps(conf)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip

    @property
    def pid(self) -> int:
        return self.proc.pid

    def children(self) -> list[int]:
        try:
            text = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text()
        except FileNotFoundError:
            return []
        return [int(p) for p in text.split()]

    def wait_ready(self, app: Any, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        attempt = 0.1
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited:\n{self.log_tail()}")
            replies = app.control.ping(destination=[self.hostname], timeout=attempt, limit=1)
            if any(self.hostname in r for r in replies or ()):
                return
            attempt = min(attempt * 2, 0.5)
        raise RuntimeError(f"worker {self.name} not ready after {timeout}s:\n{self.log_tail()}")

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM to the group (warm shutdown), SIGKILL after ``timeout``."""
        if self.proc.poll() is None:
            _killpg(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        _killpg(self.pid, signal.SIGKILL)  # stragglers of the group (pool children)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@contextmanager
def running_workers(specs: Sequence[dict[str, Any]], conf: dict[str, Any], app: Any) -> Iterator[list[Worker]]:
    """Start workers (``specs``: kwargs of ``Worker`` minus conf/log_dir), wait until each
    answers a ping, and ALWAYS stop them."""
    log_dir = Path(tempfile.mkdtemp(prefix="ph-bench-"))
    workers: list[Worker] = []
    try:
        for spec in specs:
            workers.append(Worker(conf=conf, log_dir=log_dir, **spec))
        for w in workers:
            w.wait_ready(app)
        yield workers
    finally:
        for w in workers:
            if w.proc.poll() is None:
                _killpg(w.pid, signal.SIGTERM)
        for w in workers:
            w.stop()


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


def pct(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(p / 100 * len(s) + 0.5)) - 1))
    return s[k]


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
