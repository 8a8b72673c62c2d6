"""The Store protocol: what PluginHost needs from a place that keeps plugin records."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any, NamedTuple, Protocol, runtime_checkable

from ..errors import ConcurrentUpdate
from ..model import AuditEntry, Plugin, mask_change, mask_secrets

#: Fields an admin may change with ``update``; the store bumps ``version`` itself.
MUTABLE_FIELDS = frozenset({"kind", "enabled", "config", "sort", "label_en", "label_ar"})


class Written(NamedTuple):
    """What an admin write did: the record as it now is, the store revision after
    the call, and whether this call changed anything. A call that changed nothing
    reports the store's current revision, which may include other processes'
    changes: only a write that ``changed`` the record moved the revision by its own
    statement."""

    plugin: Plugin
    revision: int
    changed: bool


@runtime_checkable
class Store(Protocol):
    """Plugin records, their audit log and one revision counter.

    Every write bumps the revision in the same transaction, and every write that
    changes a record appends one audit row. Implementations raise
    ``StoreUnavailable`` when they cannot be reached and ``ConcurrentUpdate`` when
    ``expected_version`` does not match.
    """

    def revision(self) -> int:
        """The current store revision (cheap: one indexed read)."""

    def load(self) -> tuple[int, list[Plugin]]:
        """Every plugin, ordered by (sort, slug), and the revision they were read at."""

    def get(self, slug: str) -> Plugin | None:
        """One plugin, or None."""

    def upsert(self, plugin: Plugin, *, actor: str | None = None, expected_version: int | None = None) -> Written:
        """Insert or replace a record's admin fields."""

    def update(
        self,
        slug: str,
        changes: dict[str, Any],
        *,
        action: str,
        actor: str | None = None,
        expected_version: int | None = None,
    ) -> Written:
        """Apply ``changes`` to one record (``PluginNotFound`` if missing).
        A change that alters nothing writes nothing (``changed=False``)."""

    def ensure(self, plugins: Iterable[Plugin], *, actor: str | None = None) -> list[Plugin]:
        """Insert the records that are missing, never touching existing ones; returns those created."""

    def audit(self, slug: str | None = None, *, actor: str | None = None, limit: int = 100) -> list[AuditEntry]:
        """Admin changes, newest first."""

    def close(self) -> None:
        """Release connections."""


class Changes(NamedTuple):
    """What changed in a store after a revision, read in one snapshot: ``plugins``,
    the records inserted or updated after it (in no particular order);
    ``deleted``, the slugs deleted after it that are not there now; ``revision``,
    the store revision this is consistent at (the view after applying it holds
    exactly the store's rows at ``revision``)."""

    revision: int
    plugins: list[Plugin]
    deleted: list[str]


@runtime_checkable
class ChangeFeed(Protocol):
    """What a store may add so that a process follows it incrementally.

    Optional: a view on a store without it loads every row when the revision moves.
    """

    def changes(self, since: int) -> Changes | None:
        """The changes after revision ``since``, or None when the store cannot prove
        it has every one of them (deletions pruned, a TRUNCATE, ``since`` ahead of
        the store, a schema without change revisions): the caller loads everything."""


@runtime_checkable
class RevisionReads(Protocol):
    """What a store may add: a revision read sent now and answered later, so the
    dispatch check overlaps its round trip with building the message.

    Optional: a store without it is read with ``revision()`` before the message
    is built."""

    def revision_read(self) -> Any:
        """A ``readers.PendingRevision``: ``result()`` is the revision (the errors of
        ``revision()``), ``discard()`` gives its connection back unread."""


@runtime_checkable
class WorkerRegistry(Protocol):
    """What a store shared by every process may add: which workers are alive.

    Optional (``MemoryStore`` lives in one process and has none). With it,
    ``wait=True`` admin calls and ``PluginHost.workers()`` return as soon as every
    registered worker has answered instead of waiting their whole timeout.
    """

    def report_worker(self, hostname: str, revision: int) -> None:
        """Record that ``hostname`` is alive and has applied ``revision``."""

    def forget_worker(self, hostname: str) -> None:
        """Remove ``hostname`` (it is stopping)."""

    def live_workers(self, within_s: float) -> dict[str, int]:
        """``{hostname: revision}`` of the workers that reported in the last ``within_s`` seconds."""


def next_version(current: Plugin, changes: dict[str, Any], expected_version: int | None) -> Plugin | None:
    """The record after ``changes`` (version + 1), or None if they change nothing.

    Raises ``ConcurrentUpdate`` if ``expected_version`` is given and is not the
    current version. Shared by every store so they agree on what a change is.
    """
    if expected_version is not None and expected_version != current.version:
        raise ConcurrentUpdate(f"plugin '{current.slug}': expected version {expected_version}, found {current.version}")
    if all(getattr(current, k) == v for k, v in changes.items()):
        return None
    return Plugin.model_validate(
        {**current.model_dump(), **changes, "version": current.version + 1, "updated_at": datetime.now(timezone.utc)}
    )


def snapshot(plugin: Plugin) -> dict[str, Any]:
    """The audited view of a record."""
    record = plugin.model_dump(mode="json", exclude={"updated_at"})
    # Secrets never reach the audit log: the key is kept, the value masked.
    record["config"] = mask_secrets(record["config"])
    return record


def audit_records(before: Plugin | None, after: Plugin) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """The audited views of a change: as ``snapshot``, except that a secret the
    change set to a new value is ``******** (changed)`` in ``after`` (a rotation
    is a change in the log; neither value is in it)."""
    if before is None:
        return None, snapshot(after)
    old = before.model_dump(mode="json", exclude={"updated_at"})
    new = after.model_dump(mode="json", exclude={"updated_at"})
    old["config"], new["config"] = mask_change(old["config"], new["config"])
    return old, new
