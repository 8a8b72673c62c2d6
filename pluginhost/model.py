"""Plugin records, kinds and the slug rule."""

from __future__ import annotations

import json
import math
import re
from datetime import datetime
from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import InvalidConfig, InvalidPlugin

SLUG_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,63}$"
_SLUG_RE = re.compile(SLUG_PATTERN)
_MAX_LABEL = 200


class Kind(str, Enum):
    """What a plugin contributes."""

    capability = "capability"
    source = "source"
    integration = "integration"
    ui = "ui"

    def __str__(self) -> str:
        return self.value


def check_slug(slug: object, what: str = "slug") -> str:
    """Return ``slug`` if it matches the slug rule, else raise ``InvalidPlugin``."""
    if not isinstance(slug, str) or not _SLUG_RE.match(slug) or slug.endswith("\n"):
        raise InvalidPlugin(
            f"invalid {what} {_short(slug)}: expected 1-64 characters of a-z, 0-9, '_', '.', '-',"
            " starting with a letter or digit"
        )
    return slug


def check_json_object(value: object, *, owner: str, error: type[Exception] = InvalidConfig) -> dict[str, Any]:
    """Return ``value`` if it is a JSON object (dict with str keys, finite numbers,
    JSON types all the way down); raise ``error`` naming the offending path otherwise."""
    if not isinstance(value, dict):
        raise error(f"{owner}: expected a JSON object, got {type(value).__name__}")
    _check_json(value, owner, "", error)
    return value


def _check_json(value: object, owner: str, path: str, error: type[Exception]) -> None:
    if value is None or isinstance(value, (bool, str, int)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise error(f"{owner}: field '{path or '.'}' must be a finite number, got {value!r}")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise error(f"{owner}: keys must be strings, got {_short(key)} at '{path or '.'}'")
            _check_json(item, owner, f"{path}.{key}" if path else key, error)
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_json(item, owner, f"{path}[{i}]", error)
        return
    raise error(
        f"{owner}: field '{path or '.'}' is not JSON-serialisable ({type(value).__name__} {_short(value)})"
    )


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Plugin(BaseModel):
    """A hosted plugin record: one row of the plugins table."""

    model_config = ConfigDict(validate_assignment=True, use_enum_values=False)

    slug: str
    kind: Kind = Kind.capability
    enabled: bool = True
    config: dict[str, Any] = Field(default_factory=dict)
    sort: int = 0
    label_en: str = ""
    label_ar: str = ""
    version: int = 0
    updated_at: datetime | None = None

    @field_validator("slug")
    @classmethod
    def _slug(cls, value: str) -> str:
        try:
            return check_slug(value)
        except InvalidPlugin as exc:
            raise ValueError(str(exc)) from None

    @field_validator("config")
    @classmethod
    def _config(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:
            check_json_object(value, owner="config")
        except InvalidConfig as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("label_en", "label_ar")
    @classmethod
    def _label(cls, value: str) -> str:
        if len(value) > _MAX_LABEL:
            raise ValueError(f"labels are at most {_MAX_LABEL} characters, got {len(value)}")
        return value

    @field_validator("sort")
    @classmethod
    def _sort(cls, value: int) -> int:
        if not -(2**31) <= value < 2**31:
            raise ValueError(f"sort must fit in 32 bits, got {value}")
        return value

    @classmethod
    def parse(cls, data: object) -> Plugin:
        """Validate ``data`` into a Plugin, raising ``InvalidPlugin`` with a clear message."""
        if isinstance(data, Plugin):
            data = data.model_dump()
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise InvalidPlugin(describe_validation_error(exc, owner="plugin")) from None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (kind as its string, updated_at as ISO text)."""
        return self.model_dump(mode="json")


class AuditEntry(BaseModel):
    """One admin change: who, when, what, before and after."""

    id: int
    at: datetime
    actor: str | None
    slug: str
    action: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None

    def masked(self) -> AuditEntry:
        """A copy with secret-looking config values masked in before/after."""
        def mask(record: dict[str, Any] | None) -> dict[str, Any] | None:
            if record is None or not isinstance(record.get("config"), dict):
                return record
            return {**record, "config": mask_secrets(record["config"])}

        return self.model_copy(update={"before": mask(self.before), "after": mask(self.after)})

    def changes(self) -> dict[str, tuple[Any, Any]]:
        """Field -> (before, after) for every field this change altered."""
        before, after = self.before or {}, self.after or {}
        return {
            k: (before.get(k), after.get(k))
            for k in sorted(set(before) | set(after))
            if k not in ("version",) and before.get(k) != after.get(k)
        }

    def summary(self) -> str:
        """One line: ``enabled: True -> False; sort: 0 -> 5``."""
        if self.before is None:
            return "created"
        return "; ".join(
            f"{k}: {json.dumps(b, ensure_ascii=False)} -> {json.dumps(a, ensure_ascii=False)}"
            for k, (b, a) in self.changes().items()
        ) or "no change"


SECRET_WORDS = ("password", "passwd", "secret", "token", "api_key", "apikey", "private_key", "credential")
MASK = "********"


def is_secret_key(key: str) -> bool:
    """Whether a config key looks like it holds a secret."""
    lowered = key.lower().replace("-", "_")
    return any(word in lowered for word in SECRET_WORDS)


def mask_secrets(config: Any) -> Any:
    """A copy of ``config`` with the values of secret-looking keys replaced, at any depth."""
    if isinstance(config, dict):
        return {k: MASK if isinstance(k, str) and is_secret_key(k) else mask_secrets(v) for k, v in config.items()}
    if isinstance(config, list):
        return [mask_secrets(v) for v in config]
    return config


def describe_validation_error(exc: ValidationError, *, owner: str) -> str:
    """One line naming the first failing field, its value and what was expected."""
    err = exc.errors(include_url=False)[0]
    loc = ".".join(str(p) for p in err.get("loc", ())) or "."
    msg = err.get("msg", "invalid")
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if err.get("type") == "missing":
        return f"{owner}: field '{loc}' is required"
    value = err.get("input")
    return f"{owner}: field '{loc}' {_lower_first(msg)}, got {_short(value)}"


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


def json_dumps(value: Any) -> str:
    """Canonical JSON text for the store (strict: no NaN)."""
    return json.dumps(value, ensure_ascii=False, allow_nan=False, sort_keys=True)
