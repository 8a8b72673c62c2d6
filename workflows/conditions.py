"""Step conditions: CEL (Common Expression Language) over the run's context.

``Step("provision_workspace", when="plan == 'pro'")`` runs the step only when
the expression is true for the context the step receives; a false one records
the step ``skipped`` with the reason ``condition false``. CEL is made for this:
no side effects, no loops, no access to anything but the context, and always
terminating. An expression is parsed when its workflow is defined (a step that
does not parse is ``InvalidWorkflow``) and once per process to run it.
"""

from __future__ import annotations

import functools
from typing import Any

import celpy

from .errors import ConditionFailed

#: What a skipped step's row says when its condition was false.
CONDITION_FALSE = "condition false"

_ENV = celpy.Environment()


def check(expression: str) -> None:
    """Raise ``ValueError`` (the parser's first line) if ``expression`` is not CEL."""
    try:
        _ENV.compile(expression)
    except celpy.CELParseError as exc:
        where = f" at column {exc.column}" if getattr(exc, "column", None) else ""
        raise ValueError(f"condition {expression!r} does not parse{where}") from None


def holds(expression: str, context: dict[str, Any]) -> bool:
    """Whether ``expression`` is true for ``context``; ``ConditionFailed`` when it
    cannot be evaluated (a name the context lacks, a type error) or is not a bool."""
    try:
        value = _program(expression).evaluate(celpy.json_to_cel(context))
    except celpy.CELEvalError as exc:
        raise ConditionFailed(f"condition {expression!r}: {_eval_message(exc)}") from None
    if isinstance(value, celpy.CELEvalError):
        raise ConditionFailed(f"condition {expression!r}: {_eval_message(value)}")
    if not isinstance(value, celpy.celtypes.BoolType):
        raise ConditionFailed(f"condition {expression!r} gave {type(value).__name__}, not a bool")
    return bool(value)


@functools.lru_cache(maxsize=256)
def _program(expression: str) -> Any:
    return _ENV.program(_ENV.compile(expression))


def _eval_message(exc: BaseException) -> str:
    text = str(exc.args[0]) if exc.args else type(exc).__name__
    return text.split(" (in activation", 1)[0]
