"""What the console shows and does, shared by the HTML pages and the JSON API.

Every change goes through the same PluginHost admin calls as the CLI, with the
authenticated user as actor, waiting for worker acknowledgements. Config leaves
this module masked (``mask_secrets``), and a masked value sent back keeps the
stored secret.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, Literal, Protocol

from ..errors import InvalidConfig, PluginNotFound
from ..host import PluginHost
from ..model import MASK, Plugin, is_secret_key, mask_secrets
from .errors import RunNotFound, WorkflowsNotConfigured
from .schemas import (
    AdminResult,
    AuditRow,
    NavItem,
    NavView,
    PlanRow,
    ResumeResult,
    RunDetail,
    RunSummary,
    StepRow,
    WorkerStatus,
    WorkersView,
    WorkflowView,
)

#: The run states of the workflows package (``workflows.store.RUN_STATES`` is not public).
RUN_STATES = ("pending", "running", "succeeded", "failed")


class FlowsLike(Protocol):
    """The part of ``workflows.Workflows`` the console uses (pluginhost does not
    import the workflows package: it depends on pluginhost, not the reverse)."""

    def list(self) -> Sequence[Any]: ...
    def get(self, name: str, version: int | None = None) -> Any: ...
    def version(self, name: str) -> int | None: ...
    def plan(self, name: str) -> Sequence[Any]: ...
    def runs(self, name: str | None = None, status: str | None = None, limit: int = 50) -> Sequence[Any]: ...
    def run(self, run_id: str) -> Any: ...
    def resume(self, run_id: str) -> Any: ...


class Console:
    """The console's operations over a PluginHost and (optionally) its Workflows."""

    def __init__(
        self,
        host: PluginHost,
        flows: FlowsLike | None = None,
        *,
        ack_timeout_s: float = 1.0,
        workers_timeout_s: float = 0.5,
    ) -> None:
        self.host = host
        self.flows = flows
        self.ack_timeout_s = ack_timeout_s
        self.workers_timeout_s = workers_timeout_s

    @property
    def has_workflows(self) -> bool:
        return self.flows is not None

    # -- plugins ---------------------------------------------------------------

    def plugins(self) -> list[Plugin]:
        """Every plugin in (sort, slug) order, config masked."""
        return [masked(p) for p in self.host.list()]

    def plugin(self, slug: str) -> Plugin:
        return masked(self._stored(slug))

    def nav(self, lang: Literal["en", "ar"] = "en", kind: str | None = None) -> NavView:
        """The navigation menu in one language (a missing label falls back to English, then the slug)."""
        items = [
            NavItem(slug=p.slug, kind=p.kind, sort=p.sort, label=(p.label_ar if lang == "ar" else "") or p.label_en or p.slug)
            for p in self.host.nav(kind)
        ]
        return NavView(lang=lang, dir="rtl" if lang == "ar" else "ltr", items=items)

    def workers(self) -> WorkersView:
        """Live workers and whether each has applied the store's current revision."""
        revision = self.host.revision
        rows = []
        for name, info in sorted(self.host.workers(timeout=self.workers_timeout_s).items()):
            applied = info.get("revision")
            rows.append(WorkerStatus(
                hostname=name,
                revision=applied if isinstance(applied, int) else None,
                current=applied == revision,
                pool=info.get("pool"),
                processes=len(info.get("processes") or []),
                error=info.get("error"),
            ))
        return WorkersView(revision=revision, workers=rows)

    def audit(self, slug: str | None = None, actor: str | None = None, limit: int = 100) -> list[AuditRow]:
        """Admin changes, newest first, secrets masked."""
        rows = []
        for entry in self.host.audit(slug or None, actor=actor or None, limit=limit):
            shown = entry.masked()
            rows.append(AuditRow(**shown.model_dump(), changes=shown.changes(), summary=shown.summary()))
        return rows

    # -- admin -----------------------------------------------------------------

    def set_enabled(self, slug: str, enabled: bool, *, actor: str, expected_version: int | None = None) -> AdminResult:
        call = self.host.enable if enabled else self.host.disable
        return self._admin(slug, lambda **wait: call(slug, actor=actor, expected_version=expected_version, **wait))

    def configure(self, slug: str, config: Any, *, actor: str, expected_version: int | None = None) -> AdminResult:
        """Replace a plugin's config (validated by ``host.configure``); ``********`` keeps a stored secret."""
        if not isinstance(config, dict):
            raise InvalidConfig(f"plugin '{slug}': expected a JSON object, got {type(config).__name__}")
        stored = self._stored(slug)
        restored = unmask(config, stored.config)
        if restored != config and expected_version is None:
            expected_version = stored.version  # the secrets kept must be the ones read
        return self._admin(
            slug, lambda **wait: self.host.configure(slug, restored, actor=actor, expected_version=expected_version, **wait)
        )

    def configure_text(self, slug: str, text: str, *, actor: str, expected_version: int | None = None) -> AdminResult:
        """``configure`` with the JSON text of the page's editor."""
        try:
            config = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidConfig(
                f"plugin '{slug}': config is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
            ) from None
        return self.configure(slug, config, actor=actor, expected_version=expected_version)

    def set_sort(self, slug: str, sort: int, *, actor: str, expected_version: int | None = None) -> AdminResult:
        return self._admin(
            slug, lambda **wait: self.host.set_sort(slug, sort, actor=actor, expected_version=expected_version, **wait)
        )

    def move(self, slug: str, direction: Literal["up", "down"], *, actor: str) -> AdminResult:
        """Swap a plugin with its neighbour in navigation order (no change at either end)."""
        plugins = self.host.list()
        index = next((i for i, p in enumerate(plugins) if p.slug == slug), None)
        if index is None:
            raise PluginNotFound(f"plugin '{slug}' not found")
        other_index = index - 1 if direction == "up" else index + 1
        if not 0 <= other_index < len(plugins):
            return AdminResult(plugin=masked(plugins[index]), acknowledged_by=[], revision=self.host.revision)
        me, other = plugins[index], plugins[other_index]
        if me.sort != other.sort:
            self.host.set_sort(other.slug, me.sort, actor=actor, expected_version=other.version)
            new_sort = other.sort
        else:  # a tie is ordered by slug: step just past the neighbour instead
            new_sort = me.sort - 1 if direction == "up" else me.sort + 1
        return self.set_sort(slug, new_sort, actor=actor, expected_version=me.version)

    # -- workflows -------------------------------------------------------------

    def workflows(self) -> list[WorkflowView]:
        """Every workflow definition (newest version) with its dry-run plan."""
        return [self._view(wf) for wf in self._flows().list()]

    def workflow_names(self) -> list[str]:
        return [wf.name for wf in self._flows().list()]

    def workflow(self, name: str) -> WorkflowView:
        plan = self.plan(name)  # raises the workflows package's WorkflowNotFound
        return self._view(self._flows().get(name), plan)

    def plan(self, name: str) -> list[PlanRow]:
        return [PlanRow.model_validate(step, from_attributes=True) for step in self._flows().plan(name)]

    def runs(self, name: str | None = None, status: str | None = None, limit: int = 50) -> list[RunSummary]:
        runs = self._flows().runs(name=name or None, status=status or None, limit=limit)
        return [RunSummary.model_validate(run, from_attributes=True) for run in runs]

    def run(self, run_id: str) -> RunDetail:
        run = self._flows().run(run_id)
        if run is None:
            raise RunNotFound(f"no workflow run {run_id!r}")
        return RunDetail(
            **RunSummary.model_validate(run, from_attributes=True).model_dump(),
            input=mask_secrets(run.input),
            context=mask_secrets(run.context),
            output=mask_secrets(run.output),
            steps=[StepRow.model_validate(step, from_attributes=True) for step in run.steps],
        )

    def resume(self, run_id: str) -> ResumeResult:
        """Continue a failed run from its failed step."""
        self._flows().resume(run_id)
        return ResumeResult(run_id=run_id)

    # -- internals -------------------------------------------------------------

    def _stored(self, slug: str) -> Plugin:
        plugin = self.host.get(slug)
        if plugin is None:
            raise PluginNotFound(f"plugin '{slug}' not found")
        return plugin

    def _admin(self, slug: str, call: Callable[..., Any]) -> AdminResult:
        acks = call(wait=True, timeout=self.ack_timeout_s)
        return AdminResult(plugin=self.plugin(slug), acknowledged_by=list(acks), revision=self.host.revision)

    def _view(self, definition: Any, plan: list[PlanRow] | None = None) -> WorkflowView:
        return WorkflowView(
            name=definition.name,
            version=self._flows().version(definition.name),
            definition=definition.model_dump(mode="json"),
            plan=self.plan(definition.name) if plan is None else plan,
        )

    def _flows(self) -> FlowsLike:
        if self.flows is None:
            raise WorkflowsNotConfigured("this console was created without a Workflows service (create_app(flows=...))")
        return self.flows


def masked(plugin: Plugin) -> Plugin:
    """A copy of ``plugin`` with secret-looking config values masked."""
    return plugin.model_copy(update={"config": mask_secrets(plugin.config)})


def unmask(submitted: Any, stored: Any) -> Any:
    """``submitted`` with every ``********`` under a secret-looking key replaced by
    the stored value at the same place (a masked secret sent back is kept)."""
    if isinstance(submitted, dict):
        old = stored if isinstance(stored, dict) else {}
        return {
            key: old[key] if value == MASK and is_secret_key(key) and key in old else unmask(value, old.get(key))
            for key, value in submitted.items()
        }
    if isinstance(submitted, list):
        old_items = stored if isinstance(stored, list) else []
        return [unmask(v, old_items[i] if i < len(old_items) else None) for i, v in enumerate(submitted)]
    return submitted
