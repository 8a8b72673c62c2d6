"""A step's outcome as it travels from one task to the next (across processes).

On PostgreSQL a step's outcome is written without waiting for the answer
(``WorkflowStore.post_step``), so the next task records it again in its own
first statement, where it changes nothing if the first write landed. Until then
the outcome travels in the step's result, in one of two envelopes:

- a sequential step returns ``[CARRIED, context, [outcome, ...]]`` (contexts are
  always dicts, so a list with this tag cannot be one);
- a parallel branch returns ``[position, output, context, outcome | None]``,
  which the stage's merge collects.

An outcome on the wire is a dict with a format number (``{"v": 2, ...}``).
Format 1, the list ``[position, status, output, error, plugin_version,
finished_at]``, is what releases before it sent: it is still read, and written
while ``pluginhost_workflows_outcome_format`` is 1 (a rolling upgrade: until
every worker runs a release that reads format 2).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from ..errors import UnreadableOutcome

CARRIED = "workflows.carried"
#: The format this release writes (unless told to write an older one).
FORMAT = 2
FORMATS = (1, 2)


@dataclass(frozen=True)
class Outcome:
    """A step's recorded result: what ``finish_step`` would write."""

    position: int
    status: str
    output: dict[str, Any] | None
    error: str | None
    plugin_version: int | None
    finished_at: datetime

    @classmethod
    def now(
        cls,
        position: int,
        status: str,
        *,
        output: dict[str, Any] | None = None,
        error: str | None = None,
        plugin_version: int | None = None,
    ) -> Outcome:
        return cls(position, status, output, error, plugin_version, datetime.now(timezone.utc))

    def to_wire(self, fmt: int = FORMAT) -> Any:
        finished = self.finished_at.isoformat()
        if fmt == 1:
            return [self.position, self.status, self.output, self.error, self.plugin_version, finished]
        return {
            "v": 2,
            "position": self.position,
            "status": self.status,
            "output": self.output,
            "error": self.error,
            "plugin_version": self.plugin_version,
            "finished_at": finished,
        }

    @classmethod
    def from_wire(cls, value: Any) -> Outcome:
        try:
            if isinstance(value, list) and len(value) == 6:  # format 1
                position, status, output, error, plugin_version, finished = value
            elif isinstance(value, dict) and value.get("v") == 2:
                position, status, output, error, plugin_version, finished = (
                    value["position"],
                    value["status"],
                    value["output"],
                    value["error"],
                    value["plugin_version"],
                    value["finished_at"],
                )
            else:
                raise UnreadableOutcome(f"a carried step outcome in an unknown format: {str(value)[:120]}")
            return cls(int(position), str(status), output, error, plugin_version, datetime.fromisoformat(finished))
        except (KeyError, TypeError, ValueError) as exc:
            raise UnreadableOutcome(f"a carried step outcome that cannot be read ({exc}): {str(value)[:120]}") from None


def carrying(context: dict[str, Any], outcomes: list[Outcome], fmt: int = FORMAT) -> Any:
    """What a sequential step returns: ``context``, with the outcomes the next
    task records (none: the context itself)."""
    return [CARRIED, context, [o.to_wire(fmt) for o in outcomes]] if outcomes else context


def unwrap(value: Any) -> tuple[Any, list[Outcome]]:
    """(context, carried outcomes) of what the previous task returned."""
    if isinstance(value, list) and len(value) == 3 and value[0] == CARRIED:
        return value[1], [Outcome.from_wire(o) for o in value[2]]
    return value, []


def branch_result(
    position: int, output: dict[str, Any], context: dict[str, Any], outcome: Outcome | None, fmt: int = FORMAT
) -> list[Any]:
    """What a parallel branch returns to its stage's merge (``outcome`` None: recorded already)."""
    return [position, output, context, None if outcome is None else outcome.to_wire(fmt)]


def read_branch(value: Any) -> tuple[int, dict[str, Any], dict[str, Any], Outcome | None]:
    """(position, output, context, outcome) of a branch result; releases before
    the outcome existed sent three items."""
    position, output, context, *rest = value
    outcome = Outcome.from_wire(rest[0]) if rest and rest[0] else None
    return int(position), output, context, outcome


def unique(outcomes: list[Outcome]) -> list[Outcome]:
    """One outcome per step (branches all carry the step before their stage)."""
    return list({o.position: o for o in outcomes}.values())
