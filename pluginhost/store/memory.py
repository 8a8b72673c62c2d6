"""An in-process store for unit tests and scripts (not shared between processes)."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any

from ..errors import ConcurrentUpdate, PluginNotFound
from ..model import AuditEntry, Plugin
from .base import MUTABLE_FIELDS, Changes, Written, audit_records, next_version


class MemoryStore:
    """Dict-backed ``Store``; same semantics as ``SQLAlchemyStore`` within one process."""

    def __init__(self, plugins: Iterable[Plugin] = ()) -> None:
        self._lock = threading.Lock()
        self._plugins: dict[str, Plugin] = {}
        self._audit: list[AuditEntry] = []
        self._revision = 0
        self._changed_at: dict[str, int] = {}  # slug -> the revision of its last change
        for plugin in plugins:
            self.upsert(plugin, actor="init")

    def revision(self) -> int:
        return self._revision

    def load(self) -> tuple[int, list[Plugin]]:
        with self._lock:
            plugins = sorted(self._plugins.values(), key=lambda p: (p.sort, p.slug))
            return self._revision, [p.model_copy() for p in plugins]

    def changes(self, since: int) -> Changes | None:
        """As ``SQLAlchemyStore.changes`` (this store deletes nothing)."""
        with self._lock:
            if since < 0 or since > self._revision:
                return None
            changed = [self._plugins[s].model_copy() for s, at in self._changed_at.items() if at > since]
            return Changes(self._revision, changed, [])

    def get(self, slug: str) -> Plugin | None:
        with self._lock:
            found = self._plugins.get(slug)
            return found.model_copy() if found else None

    def upsert(self, plugin: Plugin, *, actor: str | None = None, expected_version: int | None = None) -> Written:
        with self._lock:
            current = self._plugins.get(plugin.slug)
            if current is None:
                if expected_version not in (None, 0):
                    raise ConcurrentUpdate(
                        f"plugin '{plugin.slug}': expected version {expected_version}, but it does not exist"
                    )
                new = plugin.model_copy(update={"version": 1, "updated_at": _now()})
                return Written(new.model_copy(), self._write(None, new, "create", actor), True)
            fields = {f: getattr(plugin, f) for f in MUTABLE_FIELDS}
            return self._apply(current, fields, "register", actor, expected_version)

    def update(
        self,
        slug: str,
        changes: dict[str, Any],
        *,
        action: str,
        actor: str | None = None,
        expected_version: int | None = None,
    ) -> Written:
        with self._lock:
            current = self._plugins.get(slug)
            if current is None:
                raise PluginNotFound(f"plugin '{slug}' not found")
            return self._apply(current, changes, action, actor, expected_version)

    def ensure(self, plugins: Iterable[Plugin], *, actor: str | None = None) -> list[Plugin]:
        created = []
        with self._lock:
            for plugin in plugins:
                if plugin.slug not in self._plugins:
                    new = plugin.model_copy(update={"version": 1, "updated_at": _now()})
                    self._write(None, new, "create", actor)
                    created.append(new.model_copy())
        return created

    def audit(self, slug: str | None = None, *, actor: str | None = None, limit: int = 100) -> list[AuditEntry]:
        with self._lock:
            rows = [
                a
                for a in reversed(self._audit)
                if (slug is None or a.slug == slug) and (actor is None or a.actor == actor)
            ]
            return [a.model_copy() for a in rows[:limit]]

    def close(self) -> None:
        pass

    def _apply(
        self,
        current: Plugin,
        changes: dict[str, Any],
        action: str,
        actor: str | None,
        expected_version: int | None,
    ) -> Written:
        new = next_version(current, changes, expected_version)
        if new is None:
            return Written(current.model_copy(), self._revision, False)
        return Written(new.model_copy(), self._write(current, new, action, actor), True)

    def _write(self, before: Plugin | None, after: Plugin, action: str, actor: str | None) -> int:
        before_record, after_record = audit_records(before, after)
        self._plugins[after.slug] = after
        self._revision += 1
        self._changed_at[after.slug] = self._revision
        self._audit.append(
            AuditEntry(
                id=len(self._audit) + 1,
                at=after.updated_at or _now(),
                actor=actor,
                slug=after.slug,
                action=action,
                before=before_record,
                after=after_record,
            )
        )
        return self._revision


def _now() -> datetime:
    return datetime.now(timezone.utc)
