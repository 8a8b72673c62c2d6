"""PluginHost: the registry service that a Celery app carries."""

from __future__ import annotations

import builtins
import itertools
import logging
import random
import time
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar, cast, overload

from celery import Celery
from pydantic import BaseModel, ValidationError

from . import control, settings
from .capability import Capability, declare, dispatch, dispatch_many, execute_inline, execute_with
from .errors import (
    CapabilityNotFound,
    ConcurrentUpdate,
    InvalidConfig,
    InvalidPlugin,
    PluginNotFound,
)
from .model import (
    AuditEntry,
    Kind,
    Plugin,
    check_actor,
    check_config_model,
    check_json_object,
    check_known_keys,
    check_limit,
    check_slug,
    check_sort,
    config_keys,
    describe_validation_error,
    did_you_mean,
    dump_config,
    keep_secrets,
    secret_fields,
)
from .store import Store, open_store
from .store.base import Written
from .view import PluginView

if TYPE_CHECKING:
    from celery.result import AsyncResult, GroupResult

log = logging.getLogger("pluginhost")
F = TypeVar("F", bound=Callable[..., Any])
OnDisabled = Literal["fail", "skip", "defer"]
#: The host attached to each app (``PluginHost.from_app``).
HOSTS: weakref.WeakKeyDictionary[Celery, PluginHost] = weakref.WeakKeyDictionary()
#: A configure that read the stored config is retried for this long when other
#: writers keep changing the plugin in between (then ``ConcurrentUpdate``).
_CONFIGURE_RETRY_S = 5.0


class _Switch(Protocol):
    """The call ``PluginHost.enable`` and ``PluginHost.disable`` share: the plugin
    after the change, or with ``wait`` the workers that applied it."""

    @overload
    def __call__(
        self,
        slug: str,
        *,
        actor: str | None = ...,
        wait: Literal[False] = ...,
        timeout: float = ...,
        expected_version: int | None = ...,
    ) -> Plugin: ...
    @overload
    def __call__(
        self,
        slug: str,
        *,
        actor: str | None = ...,
        wait: Literal[True],
        timeout: float = ...,
        expected_version: int | None = ...,
    ) -> builtins.list[str]: ...
    @overload
    def __call__(
        self,
        slug: str,
        *,
        actor: str | None = ...,
        wait: bool,
        timeout: float = ...,
        expected_version: int | None = ...,
    ) -> Plugin | builtins.list[str]: ...


def _switch(enabled: bool, doc: str) -> _Switch:
    """``PluginHost.enable`` (``enabled`` True) or ``PluginHost.disable``: one body,
    each with its own name and docstring."""
    action = "enable" if enabled else "disable"

    def switch(
        self,  # a PluginHost: left unannotated, as a method's self is
        slug: str,
        *,
        actor: str | None = None,
        wait: bool = False,
        timeout: float = 1.0,
        expected_version: int | None = None,
    ) -> Plugin | builtins.list[str]:
        return self._update(slug, {"enabled": enabled}, action, actor, wait, timeout, expected_version)

    switch.__name__ = action
    switch.__qualname__ = f"PluginHost.{action}"
    switch.__doc__ = doc
    # A method at run time; typed as what an instance's attribute is (self bound).
    return cast(_Switch, switch)


class PluginHost:
    """Plugins from a store, capabilities as Celery tasks, admin operations that
    reach every worker.

    ``store`` is a Store or a URL; without one, ``app.conf.pluginhost_store`` is
    read when the store is first needed (so config loaded after the host is
    created counts), else a SQLite file ``pluginhost.db`` in the working
    directory. Nothing touches the store until it is first used.
    """

    def __init__(self, app: Celery, store: str | Store | None = None) -> None:
        self.app = app
        self._caps: dict[str, Capability] = {}
        #: This process's view of the plugin table (the one owner of its state).
        self.view = PluginView(
            self._opener(store),
            seeds=lambda: [c.record for c in self._caps.values()],
            auto_migrate=lambda: bool(settings.value(self.app, "pluginhost_auto_migrate")),
        )
        self.worker = control.WorkerLink(self.view)
        control.install(app, self.worker)
        HOSTS[app] = self

    # -- construction ----------------------------------------------------------

    @classmethod
    def from_app(cls, app: Celery) -> PluginHost:
        """The host attached to ``app`` (created from ``app.conf`` if there is none)."""
        host = HOSTS.get(app)
        return host if host is not None else cls(app)

    def with_store(self, store: str | Store) -> PluginHost:
        """Swap the store (a Store or URL); the view is loaded again on next use."""
        self.view.use_store(self._opener(store))
        return self

    def _opener(self, store: str | Store | None) -> Callable[[], Store]:
        def open_it() -> Store:
            # read when first needed, so config loaded after the host is created counts
            spec = store or settings.value(self.app, "pluginhost_store")
            return open_store(
                spec or f"sqlite:///{Path.cwd() / 'pluginhost.db'}",
                timeout_s=settings.value(self.app, "pluginhost_store_timeout_s"),
            )

        return open_it

    @property
    def store(self) -> Store:
        """The Store this host reads and writes (opened on first use)."""
        return self.view.store

    # -- capabilities ----------------------------------------------------------

    def capability(
        self,
        slug: str,
        *,
        plugin: str | None = None,
        config_model: type[BaseModel] | None = None,
        input_model: type[BaseModel] | None = None,
        on_disabled: OnDisabled = "fail",
        kind: Kind | str = Kind.capability,
        label_en: str = "",
        label_ar: str = "",
        sort: int = 0,
        **task_options: Any,
    ) -> Callable[[F], F]:
        """Decorator form of ``register_capability``; returns the function unchanged
        (the Celery task is ``host.task(slug)``)."""

        def wrap(fn: F) -> F:
            self.register_capability(
                slug,
                fn,
                plugin=plugin,
                config_model=config_model,
                input_model=input_model,
                on_disabled=on_disabled,
                kind=kind,
                label_en=label_en,
                label_ar=label_ar,
                sort=sort,
                **task_options,
            )
            return fn

        return wrap

    def register_capability(
        self,
        slug: str,
        fn: Callable[..., Any],
        *,
        plugin: str | None = None,
        config_model: type[BaseModel] | None = None,
        input_model: type[BaseModel] | None = None,
        on_disabled: OnDisabled = "fail",
        kind: Kind | str = Kind.capability,
        label_en: str = "",
        label_ar: str = "",
        sort: int = 0,
        **task_options: Any,
    ) -> Capability:
        """Declare ``fn`` as capability ``slug``: an ordinary Celery task on this app.

        Declaring touches neither the store nor the broker; the plugin row is
        created (if missing) on first store use or ``sync()``.
        """
        check_slug(slug, "capability slug")
        plugin_slug = check_slug(plugin or slug, "plugin slug")
        if slug in self._caps:
            raise InvalidPlugin(f"capability '{slug}' is already declared on this host")
        if config_model is not None:
            known = self.view.config_models.get(plugin_slug)
            if known is not None and known is not config_model:
                raise InvalidPlugin(f"plugin '{plugin_slug}' already has config model {known.__name__}")
            check_config_model(plugin_slug, config_model)
        cap = declare(
            self.view,
            self,
            slug,
            fn,
            plugin=plugin_slug,
            input_model=input_model,
            on_disabled=on_disabled,
            record=_seed_record(plugin_slug, kind, label_en, label_ar, sort, config_model),
            task_options=task_options,
        )
        self._caps[slug] = cap
        if config_model is not None:
            self.view.config_models[plugin_slug] = config_model
        self.view.declared(cap.record)
        return cap

    def capabilities(self) -> list[str]:
        """Declared capability slugs, sorted."""
        return sorted(self._caps)

    def declared(self, slug: str) -> Capability:
        """The declaration of capability ``slug`` (task name, plugin, policy, models)."""
        return self._capability(slug)

    def plugin_of(self, slug: str) -> str:
        """The plugin slug that capability ``slug`` belongs to."""
        return self._capability(slug).plugin

    def task(self, slug: str) -> Any:
        """The Celery task behind capability ``slug``."""
        return self._capability(slug).task

    def run_capability(self, slug: str, input: dict[str, Any] | None = None, **apply_async_options: Any) -> AsyncResult:
        """Enqueue a run. Raises (and enqueues nothing) if the slug is unknown, the
        input is invalid or the plugin is disabled in the store."""
        return dispatch(self.view, self._capability(slug), input, apply_async_options)

    def run_capability_many(
        self, slug: str, inputs: Iterable[dict[str, Any]], **apply_async_options: Any
    ) -> GroupResult:
        """Enqueue one run per input. Every input is validated first (one bad input
        rejects the batch, naming its index) and the store is checked once; nothing
        is enqueued unless all pass. Published on one producer connection."""
        return dispatch_many(self.view, self._capability(slug), inputs, apply_async_options)

    def call_capability(self, slug: str, input: dict[str, Any] | None = None) -> Any:
        """Run a capability in this process with the same checks; returns its result."""
        return execute_inline(self.view, self, self._capability(slug), input)

    def call_capability_with(self, slug: str, plugin: Plugin, input: dict[str, Any] | None = None) -> Any:
        """Run a capability in this process against ``plugin``, the record of its
        plugin the caller already read and checked (e.g. from ``get()``): the
        decision and the run use that one snapshot, the view is not read again.
        Raises ``CapabilityDisabled`` if that record is disabled."""
        return execute_with(self.view, self, self._capability(slug), plugin, input)

    # -- reads -----------------------------------------------------------------

    def get(self, slug: str) -> Plugin | None:
        """The plugin ``slug``, or None."""
        self.view.fresh()
        found = self.view.plugin(slug)
        return found.model_copy() if found else None

    def list(self) -> list[Plugin]:
        """Every plugin, ordered by (sort, slug)."""
        self.view.fresh()
        return [p.model_copy() for p in sorted(self.view.plugins(), key=_order)]

    def nav(self, kind: Kind | str | None = None) -> builtins.list[Plugin]:
        """Enabled plugins (of ``kind`` if given), ordered by (sort, slug)."""
        try:
            want = Kind(kind) if kind is not None else None
        except ValueError:
            raise InvalidPlugin(f"unknown kind {kind!r}: expected one of {', '.join(k.value for k in Kind)}") from None
        return [p for p in self.list() if p.enabled and (want is None or p.kind == want)]

    def is_enabled(self, slug: str) -> bool:
        """Whether plugin ``slug`` is enabled; an unknown slug is not."""
        self.view.fresh()
        found = self.view.plugin(slug)
        return bool(found and found.enabled)

    def config_value(self, slug: str, key: str, default: Any = None) -> Any:
        """One value of a plugin's config (``default`` if the plugin or key is missing)."""
        self.view.fresh()
        found = self.view.plugin(slug)
        return found.config.get(key, default) if found else default

    def audit(
        self, slug: str | None = None, *, actor: str | None = None, limit: int = 100
    ) -> builtins.list[AuditEntry]:
        """Admin changes, newest first (at most ``limit``, 1 or more; of plugin
        ``slug`` and by ``actor`` if given). Secrets are masked as the entries were
        written: ``********`` set, ``******** (changed)`` set to a new value by that
        change, null unset. Bad arguments raise ``InvalidPlugin``/``InvalidArgument``."""
        if slug is not None:
            check_slug(slug)
        check_actor(actor)
        check_limit(limit)
        self.view.ensure_ready()
        entries = self.store.audit(slug, actor=actor, limit=limit)
        if not entries and slug is not None and self.store.get(slug) is None:
            raise self.not_found(slug)  # a typo, not a plugin without changes
        return entries

    @property
    def revision(self) -> int:
        """The store revision this process's view was read at."""
        self.view.fresh()
        return self.view.revision

    # -- admin -----------------------------------------------------------------

    @overload
    def register(
        self,
        plugin: Plugin | dict[str, Any],
        *,
        actor: str | None = ...,
        wait: Literal[False] = ...,
        timeout: float = ...,
        expected_version: int | None = ...,
    ) -> Plugin: ...
    @overload
    def register(
        self,
        plugin: Plugin | dict[str, Any],
        *,
        actor: str | None = ...,
        wait: Literal[True],
        timeout: float = ...,
        expected_version: int | None = ...,
    ) -> builtins.list[str]: ...
    @overload
    def register(
        self,
        plugin: Plugin | dict[str, Any],
        *,
        actor: str | None = ...,
        wait: bool,
        timeout: float = ...,
        expected_version: int | None = ...,
    ) -> Plugin | builtins.list[str]: ...
    def register(
        self,
        plugin: Plugin | dict[str, Any],
        *,
        actor: str | None = None,
        wait: bool = False,
        timeout: float = 1.0,
        expected_version: int | None = None,
    ) -> Plugin | builtins.list[str]:
        """Insert or update a plugin record (the whole record, config included:
        ``configure`` is the call that keeps stored secrets), then refresh everywhere."""
        check_actor(actor)
        record = Plugin.parse(plugin)
        record = record.model_copy(update={"config": self._validated_config(record.slug, record.config)})
        return self._admin(
            lambda: self.store.upsert(record, actor=actor, expected_version=expected_version), wait, timeout
        )

    enable = _switch(True, "Enable a plugin: persisted, audited, applied here and broadcast to workers.")
    disable = _switch(False, "Disable a plugin: persisted, audited, applied here and broadcast to workers.")

    def configure(
        self,
        slug: str,
        config: dict[str, Any],
        *,
        merge: bool = False,
        actor: str | None = None,
        wait: bool = False,
        timeout: float = 1.0,
        expected_version: int | None = None,
    ) -> Any:
        """Set a plugin's config; returns the plugin (the acknowledging workers with ``wait``).

        By default ``config`` replaces the stored config: a key left out goes back
        to its config-model default (or is gone, without a model), except a stored
        secret, which is kept (clear one by setting it, e.g. to null). With
        ``merge=True`` only the top-level keys given change (an object given
        replaces the stored one, its secrets kept likewise). Either way the result
        is validated before anything is written: ``InvalidConfig`` names unknown
        keys (where a config model is declared) or the failing field, never a
        secret's value. Reading the stored config and writing the new one is
        atomic: retried if another writer got in between, ``ConcurrentUpdate`` if
        ``expected_version`` is given and is not the stored version.
        """
        check_slug(slug)
        owner = f"plugin '{slug}'"
        check_json_object(config, owner=owner)
        model = self.view.config_models.get(slug)
        keys = config_keys(model) if model is not None else None
        secrets = secret_fields(model) if model is not None else frozenset()
        self.view.ensure_ready()
        give_up = time.monotonic() + _CONFIGURE_RETRY_S
        for attempt in itertools.count():
            stored = self.store.get(slug)
            if stored is None:
                raise self.not_found(slug)
            if expected_version is not None and expected_version != stored.version:
                raise ConcurrentUpdate(f"{owner}: expected version {expected_version}, found {stored.version}")
            given = config
            if merge:
                given = {**{k: v for k, v in stored.config.items() if keys is None or k in keys}, **config}
            wanted = keep_secrets(given, stored.config, secret=secrets, keys=keys)
            new_config = self._validated_config(slug, wanted)
            # The write depends on what was read: it applies only to that version.
            depends = merge or wanted != config
            guard = expected_version if expected_version is not None else stored.version if depends else None
            try:
                return self._update(slug, {"config": new_config}, "configure", actor, wait, timeout, guard)
            except ConcurrentUpdate:
                if expected_version is not None or guard is None or time.monotonic() > give_up:
                    raise
                time.sleep(random.uniform(0, min(0.05, 0.002 * 2**attempt)))  # writers spread out
        raise AssertionError("unreachable")

    def set_sort(
        self,
        slug: str,
        sort: int,
        *,
        actor: str | None = None,
        wait: bool = False,
        timeout: float = 1.0,
        expected_version: int | None = None,
    ) -> Any:
        """Move a plugin in the navigation order (``sort`` is a 32-bit integer)."""
        check_slug(slug)
        check_sort(slug, sort)
        return self._update(slug, {"sort": sort}, "sort", actor, wait, timeout, expected_version)

    def refresh(
        self, *, actor: str | None = None, wait: bool = False, timeout: float = 1.0
    ) -> builtins.list[str] | None:
        """Re-read the store here and tell every worker to do the same."""
        view = self.view
        view.ensure_ready()
        view.reload()
        acks = self._broadcast(view.revision, wait, timeout)
        return acks if wait else None

    def sync(self) -> builtins.list[Plugin]:
        """Migrate the schema if allowed and create missing rows for declared capabilities."""
        return self.view.resync()

    def workers(self, timeout: float = 1.0) -> dict[str, dict[str, Any]]:
        """Live workers and the store revision each has applied.

        Returns once every worker in the store's registry has answered (else after
        ``timeout``). A registered worker that did not answer is listed with an
        ``error`` and the revision it last reported."""
        registered = control.registered_workers(self.app, self.store)
        destination = sorted(registered) if registered else None
        found = control.worker_revisions(self.app, timeout=timeout, destination=destination)
        registered = registered or {}
        for name, revision in registered.items():
            if name not in found:
                found[name] = {"error": "registered but did not answer", "reported_revision": revision}
        return found

    # -- internals -------------------------------------------------------------

    def _capability(self, slug: str) -> Capability:
        cap = self._caps.get(slug) if isinstance(slug, str) else None
        if cap is None:
            known = ", ".join(self.capabilities()) or "none"
            hint = did_you_mean(slug, self._caps) if isinstance(slug, str) else ""
            raise CapabilityNotFound(f"capability {slug!r} is not declared on this host{hint} (declared: {known})")
        return cap

    def not_found(self, slug: str) -> PluginNotFound:
        """The ``PluginNotFound`` for ``slug``, naming the closest known slugs."""
        known = self.view.slugs() | {c.plugin for c in self._caps.values()}
        return PluginNotFound(f"plugin '{slug}' not found{did_you_mean(slug, known)}")

    def _update(
        self,
        slug: str,
        changes: dict[str, Any],
        action: str,
        actor: str | None,
        wait: bool,
        timeout: float,
        expected_version: int | None,
    ) -> Any:
        check_slug(slug)
        check_actor(actor)

        def write() -> Written:
            try:
                return self.store.update(slug, changes, action=action, actor=actor, expected_version=expected_version)
            except PluginNotFound:
                raise self.not_found(slug) from None

        return self._admin(write, wait, timeout)

    def _admin(self, write: Callable[[], Written], wait: bool, timeout: float) -> Plugin | builtins.list[str]:
        self.view.ensure_ready()
        written = write()
        self.view.applied(written)  # never raises "nothing was written" after the commit
        acks = self._broadcast(written.revision, wait, timeout)
        return acks if wait else written.plugin

    def _broadcast(self, revision: int, wait: bool, timeout: float) -> builtins.list[str]:
        """Tell every worker to re-read the store; with ``wait``, the workers of this
        deployment (the store's registry) that applied ``revision``."""
        if not wait:
            return control.broadcast_refresh(self.app, revision)
        registered = control.registered_workers(self.app, self.store)
        if registered is None:  # no registry (MemoryStore): every answer counts
            return control.broadcast_refresh(self.app, revision, wait=True, timeout=timeout)
        # Workers outside the registry (another deployment on this broker, or one
        # whose registration failed) get the refresh too, but only ours can ack.
        control.broadcast_refresh(self.app, revision)
        if not registered:
            return []
        return control.broadcast_refresh(self.app, revision, wait=True, timeout=timeout, destination=sorted(registered))

    def _validated_config(self, slug: str, config: Any) -> dict[str, Any]:
        """``config`` as it is stored: a JSON object the store can hold, validated
        by the plugin's config model if one is declared (unknown keys refused,
        secrets kept in clear)."""
        owner = f"plugin '{slug}'"
        check_json_object(config, owner=owner)
        model = self.view.config_models.get(slug)
        if model is None:
            return dict(config)
        check_known_keys(model, config, owner=owner)
        try:
            return dump_config(model.model_validate(config))
        except ValidationError as exc:
            raise InvalidConfig(describe_validation_error(exc, owner=owner, secret=secret_fields(model))) from None

    def config_for(self, plugin: Plugin) -> Any:
        """A plugin's live config as its config model (or the dict if none was declared)."""
        return self.view.config_for(plugin)


def _order(plugin: Plugin) -> tuple[int, str]:
    return (plugin.sort, plugin.slug)


def _seed_record(
    slug: str,
    kind: Kind | str,
    label_en: str,
    label_ar: str,
    sort: int,
    config_model: type[BaseModel] | None,
) -> Plugin:
    config: dict[str, Any] = {}
    if config_model is not None:
        try:
            config = dump_config(config_model())
        except ValidationError:
            config = {}  # the model has required fields: the admin configures it
    try:
        return Plugin(slug=slug, kind=Kind(kind), label_en=label_en, label_ar=label_ar, sort=sort, config=config)
    except (ValidationError, ValueError) as exc:
        msg = describe_validation_error(exc, owner=f"plugin '{slug}'") if isinstance(exc, ValidationError) else str(exc)
        raise InvalidPlugin(msg) from None


__all__ = ["PluginHost", "PluginNotFound"]
