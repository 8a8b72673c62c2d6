"""This process's view of the plugin table: the one owner of the cached plugins,
the revision they were read at, readiness and the freshness rules.

Everything that loads, follows or answers "is this plugin enabled, with what
config" goes through a ``PluginView``; nothing else changes its state.

The rules (the guarantees in the README rest on them):

- The view is labelled with a revision only when it holds exactly the store's
  rows at that revision: a full load, or (after this process's own write) the
  previous view plus that one row when the write moved the revision by one.
- Outside a worker, ``check_store`` reads the store's revision before each
  dispatch (one indexed read) and reloads if it moved (G1).
- In a worker pool process, ``follow`` compares the view with the revision the
  worker's main process published (no query per task) and reloads when it is
  behind; if it is behind and cannot load, it raises ``StoreUnavailable`` so the
  caller runs nothing on a view it knows is stale (G2).
- A config model validates a plugin's config once per record it loads, not once
  per task.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

from pydantic import BaseModel, ValidationError

from . import metrics
from .errors import InvalidConfig, StoreUnavailable
from .model import Plugin, describe_validation_error, secret_fields
from .store import SQLAlchemyStore, Store
from .store.base import RevisionReads, Written
from .store.readers import PendingRevision

log = logging.getLogger("pluginhost.view")


class PluginView:
    """The plugins of one store as this process last read them.

    ``open_store`` makes the Store on first use; ``seeds`` gives the rows of the
    declared capabilities (created in the store, if missing, when the view first
    becomes ready); ``auto_migrate`` says whether a SQL store's schema may be
    upgraded then.
    """

    def __init__(
        self,
        open_store: Callable[[], Store],
        seeds: Callable[[], Iterable[Plugin]],
        auto_migrate: Callable[[], bool],
    ) -> None:
        self._open_store = open_store
        self._seeds = seeds
        self._auto_migrate = auto_migrate
        self._store: Store | None = None
        self._lock = threading.RLock()
        self._plugins: dict[str, Plugin] = {}
        self._configs: dict[tuple[str, int], Any] = {}
        self.config_models: dict[str, type[BaseModel]] = {}
        self.revision = -1
        self.ready = False
        #: In a worker: the revision the main process publishes (a shared integer
        #: created before the pool forks); None elsewhere.
        self.published: Any = None
        self._stale_logged = False

    # -- the store ---------------------------------------------------------------

    @property
    def store(self) -> Store:
        """The Store (opened on first use)."""
        if self._store is None:
            with self._lock:
                if self._store is None:
                    self._store = self._open_store()
        return self._store

    def use_store(self, open_store: Callable[[], Store]) -> None:
        """Swap the store: nothing is loaded until the next use."""
        with self._lock:
            self._open_store = open_store
            self._store = None
            self.ready = False
            self.revision = -1

    # -- loading -----------------------------------------------------------------

    def ensure_ready(self) -> list[Plugin]:
        """On first use: migrate (if allowed), create the declared rows, load.
        Returns the rows it created."""
        if self.ready:
            return []
        with self._lock:
            if self.ready:
                return []
            store = self.store
            if isinstance(store, SQLAlchemyStore) and self._auto_migrate():
                store.migrate()
            created = store.ensure(list(self._seeds()), actor="sync")
            self.reload()
            self.ready = True
            return created

    def resync(self) -> list[Plugin]:
        """``sync()``: become ready again (migrate, create declared rows, load)."""
        with self._lock:
            self.ready = False
            return self.ensure_ready()

    def reload(self) -> None:
        """Load every row and the revision they were read at (one transaction)."""
        with self._lock:
            revision, plugins = self.store.load()
            self._plugins = {p.slug: p for p in plugins}
            self._configs = {}
            self.revision = revision
        metrics.applied_revision(revision)

    def declared(self, record: Plugin) -> None:
        """A capability was declared after the view became ready: create its row."""
        if self.ready:
            self.store.ensure([record], actor="declare")

    # -- freshness ---------------------------------------------------------------

    def fresh(self) -> None:
        """Bring the view up to date before a read: follow the published revision
        in a worker, else read the store's."""
        if self.published is not None:
            self.follow()
        else:
            self.check_store()

    def check_store(self) -> None:
        """The strict check before dispatch: read the store's revision (one indexed
        read, one round trip) and reload if it moved."""
        self.ensure_ready()
        if self.store.revision() != self.revision:
            self.reload()

    def begin_check(self) -> PendingCheck:
        """``check_store`` in two halves: the revision read is sent now, and
        ``finish()`` waits for its answer and reloads if it moved. In between the
        caller may do what does not depend on the answer (build the message); the
        read still starts after every commit that finished before this call (G1)."""
        self.ensure_ready()
        store = self.store
        if isinstance(store, RevisionReads):
            return PendingCheck(self, store.revision_read())
        return PendingCheck(self, PendingRevision.answered(store.revision()))

    def follow(self) -> None:
        """In a worker pool process: load the revision the main process published
        if the view is behind it. Raises ``StoreUnavailable`` when the view is
        behind (or was never loaded) and cannot be loaded: run nothing on it."""
        published = self.published.value
        if self.ready and published <= self.revision:
            return
        try:
            if self.ready:
                self.reload()
            else:
                self.ensure_ready()
        except StoreUnavailable as exc:
            if not self._stale_logged:  # once per outage, not once per task
                self._stale_logged = True
                log.warning(
                    "pluginhost: cannot load revision %d (view at %d): %s; capability runs wait and are retried",
                    published, self.revision, exc,
                )  # fmt: skip
            raise
        if self._stale_logged:
            self._stale_logged = False
            log.warning("pluginhost: store reachable again; view at revision %d", self.revision)

    def applied(self, written: Written) -> None:
        """After this process's admin write committed: take its row into the view
        if that is exactly the store at the new revision, else load.

        A write that changed nothing, or one with other writers in between, reports
        a revision that covers rows this view has not read: the view is never
        labelled with it. If the load fails the change still stands (the caller
        must not raise "nothing was written"): the view keeps its older revision,
        so the next read loads it."""
        with self._lock:
            if written.changed and written.revision == self.revision + 1:
                self._plugins = {**self._plugins, written.plugin.slug: written.plugin}
                self.revision = written.revision
                metrics.applied_revision(written.revision)
                return
            if written.revision == self.revision:
                return
            try:
                self.reload()
            except StoreUnavailable as exc:
                log.warning(
                    "pluginhost: revision %s is committed, but this process cannot load it yet (%s);"
                    " the next read loads it",
                    written.revision, exc,
                )  # fmt: skip

    # -- answers -----------------------------------------------------------------

    def plugin(self, slug: str) -> Plugin | None:
        """The record of ``slug`` as the view holds it (no freshness check; not a copy)."""
        return self._plugins.get(slug)

    def plugins(self) -> list[Plugin]:
        """Every record as the view holds it (no freshness check; not copies)."""
        return list(self._plugins.values())

    def slugs(self) -> set[str]:
        return set(self._plugins)

    def config_for(self, plugin: Plugin) -> Any:
        """A plugin's config as its config model, or the dict if none was declared.

        The model validates each record once (per reload), not once per task; each
        call gets its own shallow copy, so a task that sets a field does not change
        the next task's config (nested values are shared: treat them as read-only)."""
        model = self.config_models.get(plugin.slug)
        if model is None:
            return dict(plugin.config)
        key = (plugin.slug, plugin.version)
        validated = self._configs.get(key)
        if validated is None or plugin is not self._plugins.get(plugin.slug):
            try:
                validated = model.model_validate(plugin.config)
            except ValidationError as exc:
                secret = secret_fields(model)
                raise InvalidConfig(
                    describe_validation_error(exc, owner=f"plugin '{plugin.slug}'", secret=secret)
                ) from None
            if plugin is self._plugins.get(plugin.slug):
                self._configs[key] = validated
        return validated.model_copy()


class PendingCheck:
    """A dispatch check whose revision read is on its way (``PluginView.begin_check``)."""

    __slots__ = ("_view", "_read", "done")

    def __init__(self, view: PluginView, read: PendingRevision) -> None:
        self._view, self._read = view, read
        self.done = False

    def finish(self) -> None:
        """Wait for the read's answer; reload the view if the revision moved."""
        if self.done:
            return
        self.done = True
        if self._read.result() != self._view.revision:
            self._view.reload()

    def discard(self) -> None:
        """The answer is not needed (the dispatch failed before it was)."""
        if not self.done:
            self.done = True
            self._read.discard()
