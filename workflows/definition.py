"""Workflow, Step, Parallel, Sleep and WaitFor: definitions with a JSON round-trip.

A workflow is a list of stages. ``Step`` and ``Parallel`` run capabilities;
``Sleep`` and ``WaitFor`` are waits: the run stops there, holding no worker slot
and no broker message (its wake-up is a row in the store), and goes on when the
time comes or the signal arrives (see ``runtime.py``, ``waits``).
"""

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


#: ``"90s"``, ``"15m"``, ``"1h"``, ``"3d"``, ``"1.5h"``: a number and a unit.
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
#: The longest wait a definition may hold (a year).
MAX_WAIT_S = 366 * 86400.0


def parse_duration(value: Any, what: str = "duration") -> float:
    """Seconds, from a number of seconds or a text like ``"90s"``, ``"1h"``,
    ``"3d"`` (units ms, s, m, h, d, w; no unit: seconds). ``ValueError`` unless
    it is a positive, finite span of at most a year."""
    if isinstance(value, bool):
        raise ValueError(f"{what} must be seconds or a text like '90s', '1h', '3d', got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION_RE.match(value)):
        seconds = float(m.group(1)) * _UNIT_S[m.group(2) or "s"]
    else:
        raise ValueError(f"{what} must be seconds or a text like '90s', '1h', '3d', got {value!r}")
    if not 0 < seconds <= MAX_WAIT_S:
        raise ValueError(f"{what} must be more than 0 and at most 366 days, got {value!r}")
    return seconds


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


class Sleep(BaseModel):
    """Wait ``duration`` (seconds, or ``"90s"``, ``"1h"``, ``"3d"``) before the
    next stage. The run is ``sleeping`` meanwhile: its wake-up time is a row in
    the store, claimed by a worker when due (no Celery ETA, no message held).
    ``name`` tells the waits of a run apart in its history (default: ``sleep``
    and the stage number)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["sleep"] = "sleep"
    duration: float
    name: str | None = None

    def __init__(self, duration: float | str | None = None, /, **data: Any) -> None:
        if duration is not None:
            data["duration"] = duration
        _construct(super().__init__, data, "sleep")

    @field_validator("duration", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> float:
        return parse_duration(value, "sleep duration")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        return None if value is None else _check_name(value, "sleep name")


class WaitFor(BaseModel):
    """Wait for the signal ``signal`` (``Workflows.signal``) before the next stage.

    The run is ``waiting`` meanwhile (no worker slot, no message). The signal's
    payload merges into the context, and ``signals.<name>`` becomes
    ``"received"``. A signal sent before the run reaches this stage is kept and
    taken when it does. ``timeout`` (seconds or ``"3d"``; none: wait forever),
    then ``on_timeout``:

    - ``fail``: the run fails ("timed out"); ``resume`` goes on after the wait;
    - ``skip``: the steps after the wait are skipped and the run succeeds;
    - ``continue``: the run goes on with ``signals.<name> == "timed_out"`` (a
      later step's ``when`` can branch on it, e.g. to send a reminder).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["wait"] = "wait"
    signal: str
    timeout: float | None = None
    on_timeout: Literal["fail", "skip", "continue"] = "fail"

    def __init__(self, signal: str | None = None, /, **data: Any) -> None:
        if signal is not None:
            data["signal"] = signal
        _construct(super().__init__, data, "wait")

    @field_validator("signal")
    @classmethod
    def _signal(cls, value: str) -> str:
        return _check_name(value, "signal name")

    @field_validator("timeout", mode="before")
    @classmethod
    def _timeout(cls, value: Any) -> float | None:
        return None if value is None else parse_duration(value, "wait timeout")


#: The stages that stop a run until a time or a signal.
Wait = Sleep | WaitFor


def _stage_type(value: Any) -> str:
    # Hand-written JSON may leave "type" out: a stage with "steps" is parallel.
    if isinstance(value, dict):
        return str(value.get("type") or ("parallel" if "steps" in value else "step"))
    return str(getattr(value, "type", "step"))


Stage = Annotated[
    Annotated[Step, Tag("step")]
    | Annotated[Parallel, Tag("parallel")]
    | Annotated[Sleep, Tag("sleep")]
    | Annotated[WaitFor, Tag("wait")],
    Discriminator(_stage_type),
]


class Workflow(BaseModel):
    """A named sequence of stages: steps, parallel groups, sleeps and waits for
    signals. ``key``: the input field that names a run to ``signal_by_key``
    (e.g. ``"email"``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    steps: list[Stage] = Field(min_length=1)
    key: str | None = Field(default=None, min_length=1, max_length=64)

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
        signals: set[str] = set()
        for wait in self.waits().values():
            if isinstance(wait, WaitFor):
                if wait.signal in signals:
                    raise ValueError(f"signal {wait.signal!r} is waited for more than once")
                signals.add(wait.signal)
        if not self.flat():
            raise ValueError("a workflow needs at least one step")
        return self

    def stages(self) -> list[list[Step]]:
        """Each stage's steps: one for a Step, several for a Parallel, none for a wait."""
        return [
            list(s.steps) if isinstance(s, Parallel) else [] if isinstance(s, (Sleep, WaitFor)) else [s]
            for s in self.steps
        ]

    def waits(self) -> dict[int, Sleep | WaitFor]:
        """The waits, by stage number."""
        return {i: s for i, s in enumerate(self.steps) if isinstance(s, (Sleep, WaitFor))}

    def wait_for(self, signal: str) -> tuple[int, WaitFor] | None:
        """The stage that waits for ``signal``, or None."""
        for stage, wait in self.waits().items():
            if isinstance(wait, WaitFor) and wait.signal == signal:
                return stage, wait
        return None

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
        kind = _stage_type(stage) if isinstance(stage, dict) else "step"
        models: dict[str, type[BaseModel]] = {"parallel": Parallel, "sleep": Sleep, "wait": WaitFor}
        model = models.get(kind, Step)
        if not _validates(model, stage):
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
