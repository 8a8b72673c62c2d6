"""Every setting pluginhost and workflows read from ``app.conf``: one table, one
prefix (``pluginhost_``), durations in seconds with the unit in the name (``_s``).

``value(app, name)`` is how the code reads one. A setting renamed to carry its
unit still answers to its former name (``replaces``), so a deployment that
upgrades keeps its configuration; the new name wins when both are set. The
README's settings table lists the same rows (a test compares them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .errors import InvalidArgument


@dataclass(frozen=True)
class Setting:
    name: str
    default: Any
    doc: str
    replaces: str | None = None  #: the former name, still read
    number: bool = False  #: a duration or count: must be a number > 0 (or None if the default is)


SETTINGS: tuple[Setting, ...] = (
    Setting("pluginhost_store", None, "Store URL (`memory://`, `sqlite:///...`, `postgresql://...`); default "
            "`sqlite:///pluginhost.db` in the working directory."),
    Setting("pluginhost_auto_migrate", True, "Upgrade a SQL store's schema on first use (else "
            "`pluginhost db upgrade`)."),
    Setting("pluginhost_store_timeout_s", 2.0, "Deadline of every store call (connecting, lock waits, a server or "
            "network that stops answering): past it `StoreUnavailable`, fail closed.", number=True),
    Setting("pluginhost_poll_interval_s", 2.0, "How often a worker reads the store revision (missed broadcasts, direct "
            "SQL).", replaces="pluginhost_poll_interval", number=True),
    Setting("pluginhost_heartbeat_interval_s", 10.0, "How often a worker reports itself alive in the store's worker "
            "registry.", replaces="pluginhost_heartbeat_interval", number=True),
    Setting("pluginhost_defer_interval_s", 2.0, "`on_disabled=\"defer\"`: how long a run waits before it is tried "
            "again.", replaces="pluginhost_defer_interval", number=True),
    Setting("pluginhost_defer_max_s", None, "`defer`: give up after this long with `CapabilityDisabled` (default: wait "
            "until enabled).", number=True),
    Setting("pluginhost_stale_retry_s", 1.0, "A pool process that cannot load a published revision retries the run "
            "after this long (doubling, at most 30 s).", number=True),
    Setting("pluginhost_workflows_synchronous_commit", True, "False: PostgreSQL step-state writes use "
            "`synchronous_commit=off` (faster; a server crash may lose the last marks, which `sweep` finds).",
            replaces="workflows_synchronous_commit"),
    Setting("pluginhost_workflows_step_lease_s", 3600.0, "A `running` step whose owner cannot be proven dead is taken "
            "over by a redelivery after this long.", number=True),
    Setting("pluginhost_workflows_wake_poll_s", 1.0, "How often each worker claims the due wake-ups of sleeping "
            "and waiting workflow runs (a wake-up is late by at most about this much).", number=True),
    Setting("pluginhost_workflows_wake_lease_s", 30.0, "A claimed wake-up whose claimer did not report it sent "
            "(it died) is claimed again after this long.", number=True),
    Setting("pluginhost_workflows_outcome_format", 2, "Format of the step outcomes tasks carry (2; set 1 while "
            "workers of an earlier release still run, in a rolling upgrade). Both are read."),
    Setting("pluginhost_web_users", None, "Console users: `{\"name\": \"password hash\"}`."),
    Setting("pluginhost_web_token", None, "Console/API bearer token."),
    Setting("pluginhost_web_secret", None, "Console session-cookie secret."),
    Setting("pluginhost_web_origins", None, "Extra origins allowed to send state-changing console requests (e.g. "
            "behind a TLS proxy)."),
)  # fmt: skip

BY_NAME = {s.name: s for s in SETTINGS}


def value(app: Any, name: str) -> Any:
    """The setting ``name`` of ``app`` (its former name if only that is set, else
    the default). A numeric setting that is not a number > 0 is ``InvalidArgument``."""
    setting = BY_NAME[name]
    conf = app.conf
    found = conf.get(name)
    if found is None and setting.replaces is not None:
        found = conf.get(setting.replaces)
    if found is None:
        return setting.default
    if setting.number:
        try:
            number = float(found)
        except (TypeError, ValueError):
            number = -1.0
        if isinstance(found, bool) or not (number > 0 and math.isfinite(number)):
            raise InvalidArgument(f"setting {name} must be a number of seconds > 0, got {found!r}")
        return number
    return found
