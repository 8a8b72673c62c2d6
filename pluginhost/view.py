"""This process's view of the plugin table: the one owner of the cached plugins,
the revision they were read at, readiness and the freshness rules.

Everything that loads, follows or answers "is this plugin enabled, with what
config" goes through a ``PluginView``; nothing else changes its state.

The rules (the guarantees in the README rest on them):

- The view is labelled with a revision only when it holds exactly the store's
  rows at that revision: a full load; the previous view plus the changes the
  store proves complete since its revision (``catch_up``, read in one snapshot);
  or (after this process's own write) the previous view plus that one row when
  the write moved the revision by one.
- Outside a worker, ``check_store`` reads the store's revision before each
  dispatch (one indexed read) and catches up if it moved (G1).
- In a worker pool process, ``follow`` compares the view with the revision the
  worker's main process published (no query per task) and catches up when it is
  behind; if it is behind and cannot load, it raises ``StoreUnavailable`` so the
  caller runs nothing on a view it knows is stale (G2).
- One catch-up per revision per process: threads that find the view behind at
  once wait for one catch-up and then find it current.
- A config model validates a plugin's config once per record it loads, not once
  per task; a catch-up keeps the validated configs of the rows it did not change.
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
from .store.base import ChangeFeed, Changes, RevisionReads, Written
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
        #: slug -> (the record it was validated for, its config model instance)
        self._configs: dict[str, tuple[Plugin, Any]] = {}
        #: Loads begun (``_begun``) and the number of the last one that completed:
        #: a load begun after a reader looked at the store's revision holds it.
        self._begun = 0
        self._completed = 0
        #: What this process read from the store: full loads, incremental
        #: catch-ups, and the plugin rows they returned.
        self.full_loads = 0
        self.catch_ups = 0
        self.rows_read = 0
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
        """Load every row and the revision they were read at (one snapshot)."""
        with self._lock:
            self._begun += 1
            begun = self._begun
            revision, plugins = self.store.load()
            self._plugins = {p.slug: p for p in plugins}
            self._configs = {}
            self.revision = revision
            self._completed = begun
            self.full_loads += 1
            self.rows_read += len(plugins)
        metrics.applied_revision(revision)

    def catch_up(self) -> None:
        """Bring the view to the store's current revision: read only what changed
        since the view's revision (rows and deletions, one snapshot), or load
        every row when the store cannot prove it has every change since then
        (deletions pruned past it, a TRUNCATE, a store behind the view, a store
        without a change feed, a view never loaded)."""
        with self._lock:
            store = self.store
            if self.revision < 0 or not isinstance(store, ChangeFeed):
                self.reload()
                return
            self._begun += 1
            begun = self._begun
            changes = store.changes(self.revision)
            if changes is None:
                log.info("pluginhost: changes since revision %d cannot be proven complete: loading all", self.revision)
                self.reload()
                return
            self._apply(changes)
            self._completed = begun
        metrics.applied_revision(changes.revision)

    def _apply(self, changes: Changes) -> None:
        self.catch_ups += 1
        self.rows_read += len(changes.plugins)
        if changes.revision == self.revision:
            return
        # A new dict, not the old one changed in place: a reader holding the
        # previous one keeps a consistent view.
        plugins = dict(self._plugins)
        for plugin in changes.plugins:
            plugins[plugin.slug] = plugin
            self._configs.pop(plugin.slug, None)
        for slug in changes.deleted:
            plugins.pop(slug, None)
            self._configs.pop(slug, None)
        self._plugins = plugins
        self.revision = changes.revision

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
        read, one round trip) and catch up if it moved."""
        self.ensure_ready()
        self.meet(self.store.revision())

    def meet(self, seen: int) -> None:
        """Catch up if the view is not at ``seen``, a revision just read from the
        store (unless another thread's load that began after that read completed)."""
        if seen == self.revision:
            return
        begun = self._begun  # read after ``seen``: a load begun later holds it
        with self._lock:
            if self.revision == seen or self._completed > begun:
                return  # another thread caught up meanwhile
            self.catch_up()

    def begin_check(self) -> PendingCheck:
        """``check_store`` in two halves: the revision read is sent now, and
        ``finish()`` waits for its answer and catches up if it moved. In between the
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
            with self._lock:  # threads that found the view behind wait for one catch-up
                if not self.ready:
                    self.ensure_ready()
                elif published > self.revision:
                    self.catch_up()
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
        labelled with it, it catches up instead. If that fails the change still stands (the caller
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
                self.catch_up()
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

        The model validates each record once (per load of it), not once per task; each
        call gets its own shallow copy, so a task that sets a field does not change
        the next task's config (nested values are shared: treat them as read-only)."""
        model = self.config_models.get(plugin.slug)
        if model is None:
            return dict(plugin.config)
        cached = self._configs.get(plugin.slug)
        if cached is not None and cached[0] is plugin:
            validated = cached[1]
        else:
            try:
                validated = model.model_validate(plugin.config)
            except ValidationError as exc:
                secret = secret_fields(model)
                raise InvalidConfig(
                    describe_validation_error(exc, owner=f"plugin '{plugin.slug}'", secret=secret)
                ) from None
            if plugin is self._plugins.get(plugin.slug):
                self._configs[plugin.slug] = (plugin, validated)
        return validated.model_copy()


class PendingCheck:
    """A dispatch check whose revision read is on its way (``PluginView.begin_check``)."""

    __slots__ = ("_view", "_read", "done")

    def __init__(self, view: PluginView, read: PendingRevision) -> None:
        self._view, self._read = view, read
        self.done = False

    def finish(self) -> None:
        """Wait for the read's answer; catch the view up if the revision moved."""
        if self.done:
            return
        self.done = True
        self._view.meet(self._read.result())

    def discard(self) -> None:
        """The answer is not needed (the dispatch failed before it was)."""
        if not self.done:
            self.done = True
            self._read.discard()
