"""Private broker servers for the fault tests: a Redis and a RabbitMQ node of their own.

The machine's Redis (6379) and RabbitMQ (5672) are shared with other test runs, so a
test that restarts or kills its broker starts a private one on free ports, on
127.0.0.1 only, with its data in the test's tmp dir. Each server runs in its own
process group; :meth:`stop` ends it by pid (SIGTERM, then SIGKILL to the group after
a timeout) and waits until the group is gone. Servers still running at interpreter
exit are killed by an ``atexit`` safety net.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import IO

from tests.harness import LOCALHOST, group_members, reap_adopted_zombies

_LIVE: set[Server] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind((LOCALHOST, 0))
        return int(sock.getsockname()[1])


class ServerError(RuntimeError):
    """A private server did not start or stop as expected."""


class Server:
    """One server subprocess in its own process group (pgid == pid)."""

    name = "server"

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    # -- to override ------------------------------------------------------------

    def argv(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def answers(self) -> bool:
        """Whether the server serves clients (a real round trip)."""
        raise NotImplementedError

    # -- lifecycle --------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout_s: float = 60.0) -> float:
        """Start the server and wait until it answers; return the seconds it took."""
        if self.running:
            raise ServerError(f"{self.name} is already running (pid {self.pid})")
        started = time.monotonic()
        log: IO[bytes]
        with open(self.log_path, "ab") as log:
            log.write(f"\n$ {' '.join(self.argv())}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.argv(),
                cwd=self.workdir,
                env=self.env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _LIVE.add(self)
        self.starts += 1
        deadline = started + timeout_s
        while not self.answers():
            if not self.running:
                raise ServerError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.kill()
                raise ServerError(f"{self.name} did not answer within {timeout_s} s:\n{self.log_tail()}")
            time.sleep(0.1)
        return time.monotonic() - started

    def stop(self, timeout_s: float = 30.0) -> float:
        """SIGTERM the main process, SIGKILL the group after ``timeout_s``; return the seconds."""
        started = time.monotonic()
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self._killpg(signal.SIGKILL)
                self.proc.wait(10)
        self._clear_group()
        return time.monotonic() - started

    def kill(self) -> None:
        """SIGKILL the whole group (a crash: nothing is flushed) and reap it."""
        if self.proc is not None:
            self._killpg(signal.SIGKILL)
            self.proc.wait(10)
        self._clear_group()

    def _killpg(self, sig: int) -> None:
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def _clear_group(self, grace_s: float = 10.0) -> None:
        """Once the main process is reaped: kill what is left of its group."""
        if self.proc is None:
            return
        pgid = self.proc.pid
        deadline = time.monotonic() + grace_s
        while group_members(pgid):
            self._killpg(signal.SIGKILL)
            if time.monotonic() > deadline:
                raise ServerError(f"{self.name}: processes {group_members(pgid)} survived SIGKILL")
            time.sleep(0.05)
        reap_adopted_zombies(pgid, skip=[pgid])
        _LIVE.discard(self)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""


class PrivateRedis(Server):
    """``redis-server`` on a free port, keeping nothing on disk (like the machine's)."""

    name = "redis"

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        super().__init__(workdir)
        self.port = port or free_port()

    def url(self, db: int = 0) -> str:
        return f"redis://{LOCALHOST}:{self.port}/{db}"

    def argv(self) -> list[str]:
        return [
            shutil.which("redis-server") or "redis-server",
            "--port", str(self.port), "--bind", LOCALHOST, "--save", "", "--appendonly", "no",
            "--daemonize", "no", "--dir", str(self.workdir),
        ]  # fmt: skip

    def answers(self) -> bool:
        import redis

        client = redis.Redis(host=LOCALHOST, port=self.port, socket_connect_timeout=0.5, socket_timeout=0.5)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()


RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")


class PrivateRabbitMQ(Server):
    """A RabbitMQ node of its own: own node name, ports, data, cookie and config.

    Runs ``rabbitmq-server`` in the foreground (the package's wrapper in /usr/sbin
    would switch to the ``rabbitmq`` user and share the system node's settings).
    No plugins (management off); the machine's ``/etc/rabbitmq`` files are not read.
    Data (mnesia) survives :meth:`stop`/:meth:`start`, as on a real restart:
    durable queues and persistent messages come back.
    """

    name = "rabbitmq"

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        super().__init__(workdir)
        self.port = port or free_port()
        self.dist_port = free_port()
        self.nodename = f"phtest{os.getpid()}x{self.port}@localhost"
        (self.workdir / "enabled_plugins").write_text("[].\n")
        (self.workdir / "rabbitmq-env.conf").write_text("")
        (self.workdir / "rabbitmq.conf").write_text(
            f"listeners.tcp.1 = {LOCALHOST}:{self.port}\n"
            "disk_free_limit.absolute = 50MB\n"
            "log.console = true\n"
            "log.console.level = warning\n"
            "log.file = false\n"
        )

    @staticmethod
    def available() -> str | None:
        """None if a private node can be started here, else why not."""
        if not (RABBITMQ_BIN / "rabbitmq-server").exists():
            return f"rabbitmq-server not found in {RABBITMQ_BIN}"
        return None

    def url(self) -> str:
        return f"amqp://guest:guest@{LOCALHOST}:{self.port}//"

    def argv(self) -> list[str]:
        return [str(RABBITMQ_BIN / "rabbitmq-server")]

    def env(self) -> dict[str, str]:
        w = self.workdir
        return {
            **os.environ,
            "HOME": str(w),  # the Erlang cookie lives here, not in the system node's home
            "RABBITMQ_NODENAME": self.nodename,
            "RABBITMQ_NODE_IP_ADDRESS": LOCALHOST,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(w / "mnesia"),
            "RABBITMQ_LOG_BASE": str(w / "log"),
            "RABBITMQ_PID_FILE": str(w / "pid"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(w / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(w / "rabbitmq.conf"),
            "RABBITMQ_CONF_ENV_FILE": str(w / "rabbitmq-env.conf"),
            "ERL_EPMD_ADDRESS": LOCALHOST,
            "ERL_FLAGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }

    def answers(self) -> bool:
        from kombu import Connection

        try:
            with Connection(self.url(), connect_timeout=1) as conn:
                conn.ensure_connection(max_retries=1)
                conn.default_channel  # noqa: B018 - the AMQP login and a channel
            return True
        except Exception:  # noqa: BLE001 - not up yet
            return False


def _kill_leftovers() -> None:
    for server in list(_LIVE):
        try:
            server.kill()
        except Exception:  # noqa: BLE001, S110 - the others must die too
            pass


atexit.register(_kill_leftovers)
