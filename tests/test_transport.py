"""The embedded default's broker loses no message, and a real worker uses it.

``python tests/test_transport.py [runs]`` runs the producer/consumer load against
kombu's stock ``filesystem://`` and against ``pluginhost-fs://`` and prints how many
messages each lost.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.synchronize import Barrier, Event
from pathlib import Path
from queue import Empty
from typing import Any

import pytest
from kombu import Connection, Exchange, Queue
from kombu.exceptions import ChannelError

from pluginhost.embedded import embedded_app, embedded_conf

REPO = Path(__file__).resolve().parents[1]
QUEUE = "transport-test"
PRODUCERS = 2
CONSUMERS = 2
PER_PRODUCER = 3_000
PAD = "x" * 1_000  # about the size of a Celery task message
DRAIN_TIMEOUT_S = 45.0
JOIN_TIMEOUT_S = 10.0

# fork: the children run this module's functions however pytest imported it
_mp = multiprocessing.get_context("fork")


@dataclass
class LoadOutcome:
    expected: set[str]
    received: list[str]
    errors: list[str]
    exitcodes: list[int | None]
    seconds: float

    @property
    def lost(self) -> set[str]:
        return self.expected - set(self.received)

    @property
    def duplicates(self) -> int:
        return len(self.received) - len(set(self.received))


def _produce(url: str, options: dict[str, Any], index: int, start: Barrier) -> None:
    start.wait()
    with Connection(url, transport_options=options) as conn:
        queue = conn.SimpleQueue(QUEUE)
        for n in range(PER_PRODUCER):
            queue.put({"id": f"{index}-{n}", "pad": PAD}, serializer="json")
        queue.close()


def _declare(url: str, options: dict[str, Any]) -> None:
    with Connection(url, transport_options=options) as conn:
        conn.SimpleQueue(QUEUE).close()


def _consume(url: str, options: dict[str, Any], out: str, scratch: str, start: Barrier, stop: Event) -> None:
    # stock kombu moves each message through the temp folder: keep that in the test's
    tempfile.tempdir = scratch
    start.wait()
    with open(out, "w") as log, Connection(url, transport_options=options) as conn:
        queue = conn.SimpleQueue(QUEUE)
        while not stop.is_set():
            try:
                message = queue.get(timeout=0.1)
            except Empty:
                continue
            except (ValueError, OSError, ChannelError) as exc:  # a worker would die here
                log.write(json.dumps({"error": repr(exc)}) + "\n")
                log.flush()
                continue
            log.write(json.dumps({"id": message.payload["id"]}) + "\n")
            log.flush()
            message.ack()
        queue.close()


def _read_logs(paths: list[Path]) -> tuple[list[str], list[str]]:
    received: list[str] = []
    errors: list[str] = []
    for path in paths:
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line still being written
            if "id" in record:
                received.append(record["id"])
            else:
                errors.append(record["error"])
    return received, errors


def _stop(processes: list[Any]) -> None:
    for process in processes:
        process.join(JOIN_TIMEOUT_S)
        if process.is_alive():
            process.kill()
            process.join(JOIN_TIMEOUT_S)


def run_load(url: str, data_dir: Path) -> LoadOutcome:
    """Two producers and two consumers, each a process, on one queue folder."""
    options = embedded_conf(data_dir)["broker_transport_options"]
    scratch = data_dir / "scratch"
    scratch.mkdir()
    # declared once up front, so the comparison is about messages only; in a child,
    # so that this process never holds kombu's in-memory bindings for the folder
    declare = _mp.Process(target=_declare, args=(url, options), daemon=True)
    try:
        declare.start()
    finally:
        _stop([declare])
    assert declare.exitcode == 0

    expected = {f"{p}-{n}" for p in range(PRODUCERS) for n in range(PER_PRODUCER)}
    logs = [data_dir / f"consumer-{i}.jsonl" for i in range(CONSUMERS)]
    start = _mp.Barrier(PRODUCERS + CONSUMERS + 1)
    stop = _mp.Event()
    producers = [_mp.Process(target=_produce, args=(url, options, i, start), daemon=True) for i in range(PRODUCERS)]
    consumers = [
        _mp.Process(target=_consume, args=(url, options, str(log), str(scratch), start, stop), daemon=True)
        for log in logs
    ]
    began = time.monotonic()
    try:
        for process in producers + consumers:
            process.start()
        start.wait(timeout=30)
        deadline = began + DRAIN_TIMEOUT_S
        seen, quiet_since = 0, time.monotonic()
        while time.monotonic() < deadline and any(c.is_alive() for c in consumers):
            received, errors = _read_logs(logs)
            if len(received) + len(errors) != seen:
                seen, quiet_since = len(received) + len(errors), time.monotonic()
            if not any(p.is_alive() for p in producers):
                if expected <= set(received):
                    break
                # what is neither received nor queued any more is lost: stop waiting
                queued = [n for n in os.listdir(options["data_folder_in"]) if n.endswith(".msg")]
                if not queued and time.monotonic() - quiet_since > 2:
                    break
            time.sleep(0.2)
        seconds = time.monotonic() - began
    finally:
        stop.set()
        _stop(producers + consumers)
    received, errors = _read_logs(logs)
    return LoadOutcome(
        expected=expected,
        received=received,
        errors=errors,
        exitcodes=[p.exitcode for p in producers + consumers],
        seconds=seconds,
    )


def test_no_message_lost_with_concurrent_producers_and_consumers(tmp_path: Path) -> None:
    outcome = run_load("pluginhost-fs://", tmp_path)

    print(
        f"pluginhost-fs: {len(outcome.expected)} sent, {len(set(outcome.received))} received, "
        f"{outcome.duplicates} duplicates, {len(outcome.errors)} errors, "
        f"{outcome.seconds:.1f} s"
    )
    assert outcome.errors == []
    assert outcome.exitcodes == [0] * (PRODUCERS + CONSUMERS)
    assert sorted(outcome.lost) == []
    leftovers = [name for name in os.listdir(tmp_path / "queue") if name.endswith(".msg")]
    assert leftovers == []


def test_a_process_that_used_one_data_folder_still_routes_in_the_next(tmp_path: Path) -> None:
    for name in ("first", "second"):
        options = embedded_conf(tmp_path / name)["broker_transport_options"]
        with Connection("pluginhost-fs://", transport_options=options) as conn:
            queue = conn.SimpleQueue(QUEUE)
            queue.put({"folder": name}, serializer="json")
            message = queue.get(timeout=5)
            message.ack()
            queue.close()
        assert message.payload == {"folder": name}


BINDERS = 6


def _bind(options: dict[str, Any], index: int, start: Barrier) -> None:
    with Connection("pluginhost-fs://", transport_options=options) as conn:
        channel = conn.channel()
        start.wait(timeout=30)
        Queue(f"bind-{index}", Exchange("bind-test", type="fanout"), channel=channel).declare()


def test_processes_binding_at_once_keep_every_binding(tmp_path: Path) -> None:
    for run in range(10):
        options = embedded_conf(tmp_path / str(run))["broker_transport_options"]
        start = _mp.Barrier(BINDERS)
        binders = [_mp.Process(target=_bind, args=(options, i, start), daemon=True) for i in range(BINDERS)]
        try:
            for binder in binders:
                binder.start()
        finally:
            _stop(binders)
        assert [b.exitcode for b in binders] == [0] * BINDERS
        with Connection("pluginhost-fs://", transport_options=options) as conn:
            table = conn.default_channel.get_table("bind-test")
        assert sorted(row.queue for row in table) == [f"bind-{i}" for i in range(BINDERS)]


def _wait_for_pong(app: Any, worker: subprocess.Popen[bytes], log: Path) -> list[Any]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            pytest.fail(f"worker exited with {worker.returncode}:\n{log.read_text()}")
        replies = app.control.ping(timeout=0.5, limit=1)
        if replies:
            return replies
    pytest.fail(f"worker never answered ping:\n{log.read_text()}")


def test_worker_runs_a_task_and_answers_broadcasts_on_the_embedded_default(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    # the worker runs in another working directory than this client: the fan-out
    # only meets when the control folder is absolute
    worker_cwd = tmp_path / "worker-cwd"
    worker_cwd.mkdir()
    pythonpath = [str(REPO / "tests" / "apps"), str(REPO), os.environ.get("PYTHONPATH", "")]
    env = dict(
        os.environ,
        PLUGINHOST_TEST_DATA_DIR=str(data_dir),
        PYTHONPATH=os.pathsep.join(p for p in pythonpath if p),
    )
    app = embedded_app("transport-test-client", data_dir)
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "transport_app",
                "worker",
                "--pool=solo",
                "--hostname=solo@transport-test",
                "--loglevel=INFO",
            ],
            cwd=worker_cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        replies = _wait_for_pong(app, worker, log)
        assert replies == [{"solo@transport-test": {"ok": "pong"}}]

        result = app.send_task("transport_app.add", (2, 3))
        assert result.get(timeout=30) == 5

        registered = app.control.inspect(timeout=5, limit=1).registered()
        assert registered is not None
        assert "transport_app.add" in registered["solo@transport-test"]
        answers = app.control.broadcast(
            "rate_limit",
            arguments={"task_name": "transport_app.add", "rate_limit": "100/m"},
            reply=True,
            limit=1,
            timeout=5,
        )
        assert [list(a) for a in answers] == [["solo@transport-test"]]
        assert "pluginhost-fs://" in log.read_text()
    finally:
        app.close()
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=10)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait(timeout=10)


if __name__ == "__main__":
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    for url in ("filesystem://", "pluginhost-fs://"):
        for _ in range(runs):
            with tempfile.TemporaryDirectory() as folder:
                outcome = run_load(url, Path(folder))
            print(
                f"{url:18} lost {len(outcome.lost):3} of {len(outcome.expected)}, "
                f"{len(outcome.errors)} consumer errors, {outcome.duplicates} duplicates, "
                f"exit codes {outcome.exitcodes}, {outcome.seconds:.1f} s"
            )
