"""Workflow, Step and Parallel: definitions with a JSON round-trip."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from . import conditions
from .errors import InvalidWorkflow

NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,63}$"
_NAME_RE = re.compile(NAME_PATTERN)


def _check_name(value: str, what: str) -> str:
    if not _NAME_RE.match(value) or value.endswith("\n"):
        raise ValueError(f"{what} {value!r} is invalid: expected 1-64 characters of a-z, 0-9, '_', '.', '-'")
    return value


class Step(BaseModel):
    """One capability run as a workflow step.

    ``on_disabled``: what happens if the capability's plugin is disabled when
    the step is about to run: ``skip`` (the context passes through) or ``fail``.
    ``retries`` extra attempts after a failure, ``retry_backoff`` seconds before
    the first retry (doubling each time, capped at 60 s), ``timeout`` seconds
    per attempt (a Celery soft time limit). ``when``: a CEL expression over the
    context the step receives (``"plan == 'pro'"``); the step runs only when it
    is true, else it is skipped ("condition false"); see ``conditions.py``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["step"] = "step"
    slug: str
    on_disabled: Literal["skip", "fail"] = "skip"
    retries: int = Field(default=0, ge=0, le=100)
    retry_backoff: float = Field(default=1.0, ge=0, le=3600)
    timeout: float | None = Field(default=None, gt=0, le=86400)
    when: str | None = Field(default=None, min_length=1, max_length=2000)

    def __init__(self, slug: str | None = None, /, **data: Any) -> None:
        if slug is not None:
            data["slug"] = slug
        _construct(super().__init__, data, "step")

    @field_validator("slug")
    @classmethod
    def _slug(cls, value: str) -> str:
        return _check_name(value, "step slug")

    @model_validator(mode="after")
    def _condition(self) -> Step:
        if self.when is not None:
            try:
                conditions.check(self.when)
            except ValueError as exc:
                raise ValueError(f"step {self.slug!r}: {exc}") from None
        return self

    def backoff_s(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (1-based)."""
        return float(min(60.0, self.retry_backoff * 2 ** (attempt - 1)))


class Parallel(BaseModel):
    """Steps that run at once (a Celery chord); outputs merge in declaration order."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["parallel"] = "parallel"
    steps: list[Step] = Field(min_length=1)

    def __init__(self, *steps: Step, **data: Any) -> None:
        if steps:
            data["steps"] = list(steps)
        _construct(super().__init__, data, "parallel step")


def _stage_type(value: Any) -> str:
    # Hand-written JSON may leave "type" out: a stage with "steps" is parallel.
    if isinstance(value, dict):
        return str(value.get("type") or ("parallel" if "steps" in value else "step"))
    return str(getattr(value, "type", "step"))


Stage = Annotated[
    Annotated[Step, Tag("step")] | Annotated[Parallel, Tag("parallel")],
    Discriminator(_stage_type),
]


class Workflow(BaseModel):
    """A named sequence of steps and parallel groups."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    steps: list[Stage] = Field(min_length=1)

    def __init__(self, name: str | None = None, /, **data: Any) -> None:
        if name is not None:
            data["name"] = name
        _construct(super().__init__, data, "workflow")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _check_name(value, "workflow name")

    @model_validator(mode="after")
    def _unique(self) -> Workflow:
        seen: set[str] = set()
        for step in self.flat():
            if step.slug in seen:
                raise ValueError(f"step {step.slug!r} appears more than once")
            seen.add(step.slug)
        return self

    def stages(self) -> list[list[Step]]:
        """Each stage's steps: one for a Step, several for a Parallel."""
        return [list(s.steps) if isinstance(s, Parallel) else [s] for s in self.steps]

    def flat(self) -> list[Step]:
        """Every step in declaration order (its index is the step's position)."""
        return [step for stage in self.stages() for step in stage]

    @classmethod
    def parse(cls, data: Workflow | dict[str, Any] | str | bytes) -> Workflow:
        """A Workflow from a model, dict or JSON text; ``InvalidWorkflow`` if malformed."""
        if isinstance(data, Workflow):
            return data
        if isinstance(data, dict) and not all(isinstance(k, str) for k in data):
            raise InvalidWorkflow("invalid workflow: keys must be strings")
        if not isinstance(data, (dict, str, bytes)):
            raise InvalidWorkflow(f"invalid workflow: expected a JSON object, got {type(data).__name__}")
        try:
            if isinstance(data, (str, bytes)):
                return cls.model_validate_json(data)
            return cls.model_validate(data)
        except ValidationError as exc:
            raise InvalidWorkflow(_describe(exc)) from None
        except InvalidWorkflow as exc:
            # A step or parallel group refused itself (their constructors run during
            # validation): say which one, as the JSON path of the file.
            raise InvalidWorkflow(f"invalid workflow at {_failing_stage(data)}: {exc}") from None


def _failing_stage(data: dict[str, Any] | str | bytes) -> str:
    """The JSON path of the first stage (or parallel step) that does not validate
    alone, e.g. ``'steps[2].steps[0]'``; ``'steps'`` if none can be found."""
    import json

    try:
        obj = json.loads(data) if isinstance(data, (str, bytes)) else data
    except ValueError:
        return "'steps'"
    stages = obj.get("steps") if isinstance(obj, dict) else None
    for i, stage in enumerate(stages if isinstance(stages, list) else []):
        inner = stage.get("steps") if isinstance(stage, dict) and _stage_type(stage) == "parallel" else None
        for j, step in enumerate(inner if isinstance(inner, list) else []):
            if not _validates(Step, step):
                return f"'steps[{i}].steps[{j}]'"
        if not _validates(Parallel if inner is not None else Step, stage):
            return f"'steps[{i}]'"
    return "'steps'"


def _validates(model: type[BaseModel], value: Any) -> bool:
    try:
        model.model_validate(value)
    except (ValidationError, InvalidWorkflow):
        return False
    return True


def _construct(init: Any, data: dict[str, Any], what: str) -> None:
    try:
        init(**data)
    except ValidationError as exc:
        raise InvalidWorkflow(_describe(exc, what)) from None


def _describe(exc: ValidationError, what: str = "workflow") -> str:
    err = exc.errors(include_url=False)[0]
    loc = ".".join(str(p) for p in err.get("loc", ()))
    msg = str(err.get("msg", "invalid"))
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    where = f" at '{loc}'" if loc else ""
    if err.get("type") == "missing":
        return f"invalid {what}: field '{loc}' is required"
    return f"invalid {what}{where}: {msg}"
