"""Capabilities are Celery tasks: declaration, the dispatch check and the execute check.

Every check reads the plugin view (``view.py``), never the host: the producer side
validates the input and reads the store's revision before it enqueues (G1, G5);
the worker side follows the published revision and decides run, skip, defer or
refuse just before the body runs (G2). The input is validated once on each side.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn

from celery import Task
from celery.exceptions import Reject, Retry
from celery.result import GroupResult
from celery.utils import uuid
from pydantic import BaseModel, ValidationError

from . import metrics, settings
from .errors import (
    CapabilityDisabled,
    InvalidArgument,
    InvalidInput,
    InvalidPlugin,
    StoreUnavailable,
)
from .model import Plugin, check_json_object, check_slug, describe_validation_error

if TYPE_CHECKING:
    from celery.result import AsyncResult

    from .host import PluginHost
    from .view import PendingCheck, PluginView

log = logging.getLogger("pluginhost.capability")

TASK_PREFIX = "pluginhost.capability."
POLICIES = ("fail", "skip", "defer")
#: The longest wait between tries of a run whose worker cannot load the current view.
STALE_RETRY_MAX_S = 30.0

# At-least-once by default: a run whose worker dies is redelivered, not dropped.
DEFAULT_TASK_OPTIONS: dict[str, Any] = {
    "acks_late": True,
    "reject_on_worker_lost": True,
    # Refusals are expected outcomes: logged as such, without a traceback.
    "throws": (CapabilityDisabled, InvalidInput),
}


@dataclass
class CapabilityContext:
    """What a capability function gets as its optional second argument."""

    config: Any
    plugin: Plugin
    task: Any
    host: PluginHost = field(repr=False)


@dataclass
class Capability:
    """A declared capability: its function, checks and Celery task."""

    slug: str
    plugin: str
    fn: Callable[..., Any]
    input_model: type[BaseModel] | None
    on_disabled: str
    record: Plugin
    wants_ctx: bool
    task: Any = None

    @property
    def task_name(self) -> str:
        return TASK_PREFIX + self.slug


class CapabilityTask(Task):
    """Base class of every capability task (so they can be told apart, e.g. in signals)."""

    pluginhost_capability: str = ""


def declare(
    view: PluginView,
    host: PluginHost,
    slug: str,
    fn: Callable[..., Any],
    *,
    plugin: str,
    input_model: type[BaseModel] | None,
    on_disabled: str,
    record: Plugin,
    task_options: dict[str, Any],
) -> Capability:
    """Check a declaration and create its Celery task on ``host.app`` (``host`` is
    what the function's context names; every check uses ``view``)."""
    check_slug(slug, "capability slug")
    check_slug(plugin, "plugin slug")
    if on_disabled not in POLICIES:
        raise InvalidPlugin(
            f"capability '{slug}': on_disabled must be one of {', '.join(POLICIES)}, got {on_disabled!r}"
        )
    if "pickle" in str(task_options.get("serializer", "")):
        raise InvalidPlugin(f"capability '{slug}': only JSON is accepted for capability messages, not pickle")
    if input_model is not None and not (isinstance(input_model, type) and issubclass(input_model, BaseModel)):
        raise InvalidPlugin(f"capability '{slug}': input_model must be a pydantic model class, got {input_model!r}")
    cap = Capability(
        slug=slug,
        plugin=plugin,
        fn=fn,
        input_model=input_model,
        on_disabled=on_disabled,
        record=record,
        wants_ctx=_wants_ctx(slug, fn),
    )

    def run(self: CapabilityTask, payload: Any = None) -> Any:
        return _execute_in_worker(view, host, cap, self, payload)

    name = getattr(fn, "__name__", "")
    # Celery compiles a checker named after the function: it must be an identifier.
    run.__name__ = name if name.isidentifier() else "capability_" + "".join(c if c.isalnum() else "_" for c in slug)
    run.__doc__ = getattr(fn, "__doc__", None)
    run.__module__ = getattr(fn, "__module__", __name__)
    options = {**DEFAULT_TASK_OPTIONS, **task_options}
    cap.task = host.app.task(
        name=cap.task_name,
        bind=True,
        base=CapabilityTask,
        shared=False,
        lazy=False,
        pluginhost_capability=slug,
        **options,
    )(run)
    return cap


def dispatch(view: PluginView, cap: Capability, input: Any, options: dict[str, Any]) -> AsyncResult:
    """The producer side: validate, check the store, then enqueue (G1, G5).

    The store's revision read is sent first and its answer read just before the
    message is published (``CheckedProducer``), so its round trip overlaps with
    Celery building the message; a refusal there publishes nothing. Where the
    publish cannot be seen (eager mode, a caller's own producer or connection)
    the check runs before ``apply_async``, as it always did."""
    payload, _ = check_input(cap, input)
    task = cap.task
    if task.app.conf.task_always_eager or not _OWN_PUBLISH.isdisjoint(options):
        _check_before_dispatch(view, cap)
        result = task.apply_async(args=(payload,), **options)
    elif callable(getattr(cap.fn, "dispatch", None)):
        result = _dispatch_by_function(view, cap, payload, options)
    else:
        result = _dispatch_overlapped(view, cap, payload, options)
    metrics.dispatched(cap.slug)
    return result


def _dispatch_by_function(view: PluginView, cap: Capability, payload: Any, options: dict[str, Any]) -> AsyncResult:
    """A capability function that starts its own work from the producer (e.g. a
    workflow sending its canvas, with no task hop): ``fn.dispatch(capability,
    plugin, on_disabled, payload, options)`` is called once the store check
    passed, and returns the AsyncResult, or None to have the capability task sent
    as usual. The function takes over the worker-side check (G2) of what it sends."""
    _check_before_dispatch(view, cap)
    start = getattr(cap.fn, "dispatch")  # noqa: B009 - a protocol of the function, checked by the caller
    started = start(cap.slug, cap.plugin, cap.on_disabled, payload, dict(options))
    if started is not None:
        return started  # type: ignore[no-any-return]
    return cap.task.apply_async(args=(payload,), **options)


#: ``apply_async`` options with which Celery publishes on something other than
#: the producer passed in (then the check cannot run at the publish).
_OWN_PUBLISH = frozenset({"producer", "publisher", "connection"})


def _dispatch_overlapped(view: PluginView, cap: Capability, payload: Any, options: dict[str, Any]) -> AsyncResult:
    task = cap.task
    pending = view.begin_check()
    check = _PublishCheck(view, cap, pending)
    options = dict(options)
    task_id = options.pop("task_id", None) or uuid()
    try:
        with task.app.producer_or_acquire() as producer:
            result = task.apply_async(
                args=(payload,), task_id=task_id, producer=CheckedProducer(producer, check), **options
            )
    except BaseException:
        _forget_result(task.app, task_id)  # refused or failed before the publish: nothing was sent
        raise
    finally:
        pending.discard()  # a no-op once answered
    if not check.done:  # Celery publishes every message through the producer it is given
        log.error("capability '%s': run %s was sent without passing its producer's publish", cap.slug, task_id)
    return result


class _PublishCheck:
    """The check's second half, run once, at the first publish."""

    __slots__ = ("view", "cap", "pending", "done")

    def __init__(self, view: PluginView, cap: Capability, pending: PendingCheck) -> None:
        self.view, self.cap, self.pending = view, cap, pending
        self.done = False

    def __call__(self) -> None:
        if self.done:
            return  # Celery's publish retries call publish again
        self.done = True
        self.pending.finish()
        try:
            _refuse_if_disabled(self.view, self.cap)
        except CapabilityDisabled:
            metrics.refused(self.cap.slug, "dispatch")
            raise


class CheckedProducer:
    """The producer handed to ``apply_async``: the store check finishes before the
    message is published, and raises instead of publishing when it refuses.
    Everything else is the producer it wraps.

    The check ends at the first use of the producer's connection, or at the
    publish if that comes first. Celery's ``send_task`` takes the connection once
    the message is built and before it talks to the broker or the result backend
    (Redis subscribes to the result there): so the revision read's connection is
    held only while the message is built, never across other I/O (under gevent,
    or a threaded web server, a reader held across I/O meant one more reader per
    concurrent dispatch), and a refused run has not subscribed. Correctness rests
    on the publish: nothing is published before the check passed."""

    def __init__(self, producer: Any, check: Callable[[], None]) -> None:
        self._producer = producer
        self._check = check

    @property
    def connection(self) -> Any:
        self._check()
        return self._producer.connection

    def publish(self, *args: Any, **kwargs: Any) -> Any:
        self._check()
        return self._producer.publish(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._producer, name)


def _forget_result(app: Any, task_id: str) -> None:
    """A run refused at its publish: the result backend had begun to listen for
    its result (Redis subscribes, RPC binds a queue); it never comes."""
    consumer = getattr(app.backend, "result_consumer", None)
    cancel = getattr(consumer, "cancel_for", None)
    if cancel is None:
        return
    try:
        cancel(task_id)
    except Exception:  # noqa: BLE001 - best effort: the subscription ends with the process
        log.debug("could not stop listening for refused run %s", task_id, exc_info=True)


def dispatch_many(view: PluginView, cap: Capability, inputs: Any, options: dict[str, Any]) -> GroupResult:
    """A batch: every input validated first, one store check, one producer (G1, G5).

    The check covers the whole batch: a ``disable()`` that returns while the
    batch is being published does not stop the rest of it; the workers refuse
    those runs (G2)."""
    if isinstance(inputs, (str, bytes, dict)) or not isinstance(inputs, Iterable):
        raise InvalidInput(
            f"capability '{cap.slug}': inputs must be a list of JSON objects, got {type(inputs).__name__}"
        )
    for reserved in ("task_id", "args", "kwargs", "producer"):
        if reserved in options:
            raise InvalidArgument(f"capability '{cap.slug}': {reserved}= is not accepted for a batch (one per message)")
    payloads = []
    for index, item in enumerate(inputs):
        try:
            payloads.append(check_input(cap, item)[0])
        except InvalidInput as exc:
            raise InvalidInput(f"input {index}: {exc}") from None
    _check_before_dispatch(view, cap)
    task = cap.task
    with task.app.producer_or_acquire() as producer:
        results = [task.apply_async(args=(payload,), producer=producer, **options) for payload in payloads]
    metrics.dispatched(cap.slug, len(results))
    return GroupResult(uuid(), results, app=task.app)


def _check_before_dispatch(view: PluginView, cap: Capability) -> None:
    """The producer-side store check (G1): read the store's revision, refuse if disabled."""
    view.check_store()
    try:
        _refuse_if_disabled(view, cap)
    except CapabilityDisabled:
        metrics.refused(cap.slug, "dispatch")
        raise


def execute_inline(view: PluginView, host: PluginHost, cap: Capability, input: Any) -> Any:
    """``call_capability``: the same checks, the function run in this process
    (inside a worker, against the worker's live view, as a task would be)."""
    _, arg = check_input(cap, input)
    view.fresh()
    plugin = view.plugin(cap.plugin)
    if plugin is None or not plugin.enabled:
        if cap.on_disabled == "skip":
            log.info("capability '%s' skipped: plugin '%s' is disabled", cap.slug, cap.plugin)
            return None
        _refuse_if_disabled(view, cap)
    assert plugin is not None
    return _call(view, host, cap, plugin, arg, cap.task)


def check_input(cap: Capability, input: Any) -> tuple[dict[str, Any], Any]:
    """The input as a JSON object, validated against the input model
    (``InvalidInput``), and what the function gets: the model instance, or the
    object itself without a model."""
    if input is None:
        input = {}
    owner = f"capability '{cap.slug}' input"
    if isinstance(input, BaseModel):
        input = input.model_dump(mode="json")
    check_json_object(input, owner=owner, error=InvalidInput)
    if cap.input_model is None:
        return input, input
    try:
        return input, cap.input_model.model_validate(input)
    except ValidationError as exc:
        raise InvalidInput(describe_validation_error(exc, owner=owner)) from None


def _execute_in_worker(view: PluginView, host: PluginHost, cap: Capability, task: CapabilityTask, payload: Any) -> Any:
    """The worker side: re-check enablement just before running (G2)."""
    try:
        view.fresh()
    except StoreUnavailable:
        # This process knows its view is behind and cannot load the new one: the
        # body must not run on it, and the run must not be lost. Wait and retry.
        waits = int(task.request.get("pluginhost_stale_waits") or 0)
        base = settings.value(task.app, "pluginhost_stale_retry_s")
        _send_again(task, min(base * 2**waits, STALE_RETRY_MAX_S), pluginhost_stale_waits=waits + 1)
    plugin = view.plugin(cap.plugin)
    if plugin is None or not plugin.enabled:
        return _on_disabled(view, cap, task)
    _, arg = check_input(cap, payload)
    return _call(view, host, cap, plugin, arg, task)


def _on_disabled(view: PluginView, cap: Capability, task: CapabilityTask) -> Any:
    metrics.refused(cap.slug, "worker")
    if cap.on_disabled == "skip":
        metrics.skipped(cap.slug)
        log.info("capability '%s' skipped (task %s): plugin '%s' is disabled", cap.slug, task.request.id, cap.plugin)
        task.send_event("task-skipped", reason=f"plugin '{cap.plugin}' is disabled")
        return None
    if cap.on_disabled == "defer":
        since = float(task.request.get("pluginhost_deferred_since") or time.time())
        limit = settings.value(task.app, "pluginhost_defer_max_s")
        waited = time.time() - since
        if limit is not None and waited >= float(limit):
            raise CapabilityDisabled(
                f"{_disabled_reason(cap, 'is disabled')}; deferred for {waited:.1f} s,"
                f" past pluginhost_defer_max_s={float(limit):g}"
            )
        metrics.deferred(cap.slug)
        countdown = settings.value(task.app, "pluginhost_defer_interval_s")
        log.info("capability '%s' deferred %.1fs: plugin '%s' is disabled", cap.slug, countdown, cap.plugin)
        _send_again(task, countdown, pluginhost_deferred_since=since)
    _refuse_if_disabled(view, cap)


def _send_again(task: CapabilityTask, countdown: float, **headers: Any) -> NoReturn:
    """Send this run again in ``countdown`` seconds, then end this delivery as RETRY.

    Unlike ``task.retry`` this spends none of the task's own ``max_retries``
    (waiting for a plugin or for the store is not a failure of the body), so it
    waits as long as it has to. If the new message cannot be sent, this delivery
    is rejected back to the queue rather than lost.
    """
    request = task.request
    sig = task.signature_from_request(request, countdown=countdown, headers={**(request.headers or {}), **headers})
    try:
        sig.apply_async()
    except Exception as exc:  # broker unreachable: keep the delivery itself
        raise Reject(exc, requeue=True) from None
    raise Retry(when=countdown, sig=sig)


def _refuse_if_disabled(view: PluginView, cap: Capability) -> None:
    plugin = view.plugin(cap.plugin)
    if plugin is None:
        raise CapabilityDisabled(_disabled_reason(cap, "is not in the store"))
    if not plugin.enabled:
        raise CapabilityDisabled(_disabled_reason(cap, "is disabled"))


def _disabled_reason(cap: Capability, why: str) -> str:
    # Name the plugin (the switch an admin flips); name the capability too when it differs.
    if cap.slug == cap.plugin:
        return f"plugin '{cap.plugin}' {why}"
    return f"capability '{cap.slug}' is disabled: plugin '{cap.plugin}' {why}"


def _call(view: PluginView, host: PluginHost, cap: Capability, plugin: Plugin, arg: Any, task: Any) -> Any:
    """Run the function: ``arg`` is the validated input, ``plugin`` the record the
    decision to run was made on."""
    metrics.executed(cap.slug)
    if cap.wants_ctx:
        ctx = CapabilityContext(config=view.config_for(plugin), plugin=plugin.model_copy(), task=task, host=host)
        return cap.fn(arg, ctx)
    return cap.fn(arg)


def _wants_ctx(slug: str, fn: Callable[..., Any]) -> bool:
    if not callable(fn):
        raise InvalidPlugin(f"capability '{slug}': expected a function, got {type(fn).__name__}")
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return True
    if len(positional) not in (1, 2):
        shown = ", ".join(p.name for p in params)
        raise InvalidPlugin(f"capability '{slug}': the function must take (payload) or (payload, ctx), got ({shown})")
    return len(positional) == 2


def execute_with(view: PluginView, host: PluginHost, cap: Capability, plugin: Plugin, input: Any) -> Any:
    """``call_capability_with``: the function run in this process against
    ``plugin``, the record of the capability's plugin that the caller already
    read and decided on. The view is not read again, so the decision and the run
    come from one snapshot (a workflow step decides run/skip/fail under its own
    policy; a second look could see a change the first did not). A record that
    is not the capability's plugin, or is disabled, is refused."""
    if not isinstance(plugin, Plugin) or plugin.slug != cap.plugin:
        got = plugin.slug if isinstance(plugin, Plugin) else type(plugin).__name__
        raise InvalidPlugin(f"capability '{cap.slug}' belongs to plugin '{cap.plugin}', got a record of {got!r}")
    if not plugin.enabled:
        raise CapabilityDisabled(_disabled_reason(cap, "is disabled"))
    _, arg = check_input(cap, input)
    return _call(view, host, cap, plugin, arg, cap.task)
