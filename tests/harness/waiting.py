"""Waiting for something to become true: one polling loop, and the run waits built on it."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

#: Statuses a workflow run ends in.
RUN_FINISHED = ("succeeded", "failed")


def wait_until(predicate: Callable[[], T], timeout: float, interval: float = 0.05, *, what: str | None = None) -> T:
    """Call ``predicate`` every ``interval`` seconds until it returns a true value; return that value.

    It is called at least once, and once more when ``timeout`` has passed. Then,
    with ``what``, an :class:`AssertionError` says what was waited for; without,
    the last (false) value is returned, for the caller to assert on.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            break
        time.sleep(interval)
    if not value and what is not None:
        raise AssertionError(f"timed out after {timeout} s waiting for {what}")
    return value


def wait_finished(flows: Any, run_id: str, timeout: float = 60.0) -> Any:
    """The run ``flows.run(run_id)`` once it has succeeded or failed; AssertionError after ``timeout``."""

    def finished() -> Any:
        run = flows.run(run_id)
        return run if run is not None and run.status in RUN_FINISHED else None

    try:
        return wait_until(finished, timeout, what=f"run {run_id} to finish")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; it is {flows.run(run_id)}") from None
