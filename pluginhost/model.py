"""Plugin records, kinds, the slug rule, and what the store can hold: JSON
objects, text, secrets and their masks, and the config-model rules."""

from __future__ import annotations

import difflib
import json
import math
import re
import typing
from collections.abc import Collection
from datetime import datetime
from enum import Enum
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretBytes,
    SecretStr,
    ValidationError,
    field_validator,
)

from .errors import InvalidArgument, InvalidConfig, InvalidPlugin

SLUG_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,63}$"
_SLUG_RE = re.compile(SLUG_PATTERN)
_MAX_LABEL = 200
_MAX_ACTOR = 200
#: The sort column is a 32-bit integer (PostgreSQL ``integer``).
SORT_MIN, SORT_MAX = -(2**31), 2**31 - 1
#: JSON integers are 64-bit: what every consumer (Go, PostgreSQL bigint, JSON
#: parsers with a digit limit) reads back unchanged.
INT_MIN, INT_MAX = -(2**63), 2**63 - 1
#: Deeper JSON is refused (it is a mistake or an attack, and serialisers recurse).
MAX_DEPTH = 100


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


def did_you_mean(word: str, known: Collection[str]) -> str:
    """``"; did you mean 'x'?"`` for the names in ``known`` closest to ``word``, or ``""``."""
    close = difflib.get_close_matches(word, list(known), n=3, cutoff=0.6)
    if not close:
        return ""
    return "; did you mean " + " or ".join(repr(c) for c in close) + "?"


def text_problem(text: str) -> str | None:
    """Why PostgreSQL text (and JSONB) cannot hold ``text``, or None if it can."""
    if "\x00" in text:
        return "contains a NUL character"
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return "is not valid Unicode (a lone surrogate)"
    return None


def check_actor(actor: object) -> str | None:
    """Return ``actor`` (text for the audit log, or None), else raise ``InvalidArgument``."""
    if actor is None:
        return None
    if not isinstance(actor, str):
        raise InvalidArgument(f"actor must be text or None, got {type(actor).__name__}")
    if len(actor) > _MAX_ACTOR:
        raise InvalidArgument(f"actor is at most {_MAX_ACTOR} characters, got {len(actor)}")
    problem = text_problem(actor)
    if problem:
        raise InvalidArgument(f"actor {problem}, got {_short(actor)}")
    return actor


def check_limit(limit: object) -> int:
    """Return ``limit`` if it is a positive 64-bit integer, else raise ``InvalidArgument``."""
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= INT_MAX:
        raise InvalidArgument(f"limit must be an integer from 1 to {INT_MAX}, got {_short(limit)}")
    return limit


def check_sort(slug: str, sort: object) -> int:
    """Return ``sort`` if the sort column can hold it, else raise ``InvalidPlugin``."""
    if isinstance(sort, bool) or not isinstance(sort, int):
        raise InvalidPlugin(f"plugin '{slug}': sort must be an integer, got {_short(sort)}")
    if not SORT_MIN <= sort <= SORT_MAX:
        raise InvalidPlugin(f"plugin '{slug}': sort {_SORT_RANGE}, got {_short(sort)}")
    return sort


_SORT_RANGE = f"must be a 32-bit integer ({SORT_MIN} to {SORT_MAX})"


def check_json_object(value: object, *, owner: str, error: type[Exception] = InvalidConfig) -> dict[str, Any]:
    """Return ``value`` if it is a JSON object the store and every consumer can
    hold (str keys; 64-bit integers; finite numbers; text without NUL or lone
    surrogates; at most ``MAX_DEPTH`` levels); raise ``error`` naming the
    offending path otherwise. Values under secret-looking keys are never shown."""
    if not isinstance(value, dict):
        raise error(f"{owner}: expected a JSON object, got {type(value).__name__}")
    if not _holdable(value, 0):  # the common case is one pass that builds no paths
        _check_json(value, owner, "", error, 0, False)  # raises, naming the offending path
    return value


def _holdable(value: object, depth: int) -> bool:
    """Whether ``_check_json`` would accept ``value`` (the same rules, without the
    paths and secret-key tracking its messages need: this runs on every dispatch)."""
    if value is None or isinstance(value, bool):
        return True
    if isinstance(value, str):
        return "\x00" not in value and (value.isascii() or text_problem(value) is None)
    if isinstance(value, int):
        return INT_MIN <= value <= INT_MAX
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return depth < MAX_DEPTH and all(
            isinstance(k, str) and _holdable(k, depth) and _holdable(v, depth + 1) for k, v in value.items()
        )
    if isinstance(value, (list, tuple)):
        return depth < MAX_DEPTH and all(_holdable(v, depth + 1) for v in value)
    return False


def _check_json(value: object, owner: str, path: str, error: type[Exception], depth: int, secret: bool) -> None:
    if value is None or isinstance(value, bool):
        return
    where = path or "."
    if isinstance(value, str):
        problem = text_problem(value)
        if problem:
            raise error(f"{owner}: field '{_short_path(where)}' {problem}")
        return
    if isinstance(value, int):
        if not INT_MIN <= value <= INT_MAX:
            raise error(f"{owner}: field '{_short_path(where)}' must be a 64-bit integer, got {_shown(value, secret)}")
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise error(f"{owner}: field '{_short_path(where)}' must be a finite number, got {_shown(value, secret)}")
        return
    if depth >= MAX_DEPTH and isinstance(value, (dict, list, tuple)):
        raise error(f"{owner}: field '{_short_path(where)}' is nested more than {MAX_DEPTH} levels deep")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise error(f"{owner}: keys must be strings, got {_short(key)} at '{_short_path(where)}'")
            problem = text_problem(key)
            if problem:
                raise error(f"{owner}: key {_short(key)} at '{_short_path(where)}' {problem}")
            _check_json(item, owner, f"{path}.{key}" if path else key, error, depth + 1, secret or is_secret_key(key))
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_json(item, owner, f"{path}[{i}]", error, depth + 1, secret)
        return
    detail = (
        f"a {type(value).__name__} value; a secret, not shown" if secret else f"{type(value).__name__} {_short(value)}"
    )
    raise error(f"{owner}: field '{_short_path(where)}' is not JSON-serialisable ({detail})")


def _shown(value: object, secret: bool) -> str:
    return f"a value of type {type(value).__name__} (a secret, not shown)" if secret else _short(value)


def _short(value: object, limit: int = 60) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"an integer of {value.bit_length()} bits"
    try:
        text = repr(value)
    except ValueError:  # a container holding an integer too long to print
        return f"a {type(value).__name__} that cannot be shown"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _short_path(path: str, limit: int = 80) -> str:
    return path if len(path) <= limit else path[: limit - 3] + "..."


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
        problem = text_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("sort")
    @classmethod
    def _sort(cls, value: int) -> int:
        if not SORT_MIN <= value <= SORT_MAX:
            raise ValueError(_SORT_RANGE)
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
    """One admin change: who, when, what, before and after.

    Secret values are masked when the entry is written: ``********`` is a set
    secret, ``******** (changed)`` one this change set to a new value, and null
    (or an absent key) an unset one."""

    id: int
    at: datetime
    actor: str | None
    slug: str
    action: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None

    def masked(self) -> AuditEntry:
        """A copy with secret-looking config values masked in before/after (masks kept)."""

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
        return (
            "; ".join(
                f"{k}: {json.dumps(b, ensure_ascii=False)} -> {json.dumps(a, ensure_ascii=False)}"
                for k, (b, a) in self.changes().items()
            )
            or "no change"
        )


# -- secrets --------------------------------------------------------------------------

SECRET_WORDS = ("password", "passwd", "secret", "token", "api_key", "apikey", "private_key", "credential")
MASK = "********"
#: The audit log's mask for a secret that a change set to a new value.
MASK_CHANGED = f"{MASK} (changed)"
_MASKS = (MASK, MASK_CHANGED)


def is_secret_key(key: str) -> bool:
    """Whether a config key looks like it holds a secret."""
    lowered = key.lower().replace("-", "_")
    return any(word in lowered for word in SECRET_WORDS)


def _mask(value: Any) -> Any:
    # Unset (null or "") is shown as it is: only a set secret is hidden.
    if value is None or value == "" or (isinstance(value, str) and value in _MASKS):
        return value
    return MASK


def mask_secrets(config: Any) -> Any:
    """A copy of ``config`` with the values of secret-looking keys replaced by
    ``********`` at any depth; an unset secret (null or "") stays as it is."""
    if isinstance(config, dict):
        return {k: _mask(v) if isinstance(k, str) and is_secret_key(k) else mask_secrets(v) for k, v in config.items()}
    if isinstance(config, list):
        return [mask_secrets(v) for v in config]
    return config


def mask_change(before: Any, after: Any) -> tuple[Any, Any]:
    """``before`` and ``after`` masked as ``mask_secrets`` does, except that a
    secret set on both sides to different values is ``******** (changed)`` after:
    a rotation is visible in the audit log, its values are not."""
    return _mask_pair(before, after, False)


def _mask_pair(before: Any, after: Any, secret: bool) -> tuple[Any, Any]:
    if secret:
        shown_before, shown_after = _mask(before), _mask(after)
        if shown_before == MASK and shown_after == MASK and before != after:
            shown_after = MASK_CHANGED
        return shown_before, shown_after
    if isinstance(before, dict) and isinstance(after, dict):

        def one(key: Any, value: Any) -> Any:
            return _mask(value) if isinstance(key, str) and is_secret_key(key) else mask_secrets(value)

        pairs = {
            k: _mask_pair(before[k], after[k], isinstance(k, str) and is_secret_key(k)) for k in before if k in after
        }
        return (
            {k: pairs[k][0] if k in pairs else one(k, v) for k, v in before.items()},
            {k: pairs[k][1] if k in pairs else one(k, v) for k, v in after.items()},
        )
    if isinstance(before, list) and isinstance(after, list):
        common = [_mask_pair(b, a, False) for b, a in zip(before, after)]
        return (
            [c[0] for c in common] + mask_secrets(before[len(common) :]),
            [c[1] for c in common] + mask_secrets(after[len(common) :]),
        )
    return mask_secrets(before), mask_secrets(after)


def describe_validation_error(exc: ValidationError, *, owner: str, secret: Collection[str] = ()) -> str:
    """One line naming the first failing field, its value and what was expected.

    The value is not shown when the field is a secret (a name in ``secret`` or a
    secret-looking one anywhere on its path); containers are shown masked."""
    errors = exc.errors(include_url=False)
    missing = [_loc(e) for e in errors if e.get("type") == "missing"]
    if len(missing) > 1 and len(missing) == len(errors):
        return f"{owner}: fields {', '.join(repr(m) for m in missing)} are required"
    err = errors[0]
    path = err.get("loc", ())
    loc = _loc(err)
    msg = err.get("msg", "invalid")
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if err.get("type") == "missing":
        return f"{owner}: field '{loc}' is required"
    value = err.get("input")
    if any(isinstance(p, str) and (p in secret or is_secret_key(p)) for p in path):
        shown = _shown(value, True)
    else:
        shown = _short(mask_secrets(value) if isinstance(value, (dict, list)) else value)
    return f"{owner}: field '{loc}' {_lower_first(msg)}, got {shown}"


def _loc(err: Any) -> str:
    return ".".join(str(p) for p in err.get("loc", ())) or "."


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


# -- config models ----------------------------------------------------------------------


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The BaseModel classes an annotation names (``Model``, ``Model | None``, ``list[Model]``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _is_secret_type(annotation: Any) -> bool:
    if isinstance(annotation, type) and issubclass(annotation, (SecretStr, SecretBytes)):
        return True
    return any(_is_secret_type(arg) for arg in typing.get_args(annotation))


def _declared_secret(field: Any) -> bool:
    extra = field.json_schema_extra
    return _is_secret_type(field.annotation) or (isinstance(extra, dict) and extra.get("secret") is True)


def secret_fields(model: type[BaseModel]) -> frozenset[str]:
    """The top-level fields of a config model that hold secrets: declared
    (``SecretStr``/``SecretBytes``, ``Field(json_schema_extra={"secret": True})``)
    or named like one (``is_secret_key``)."""
    return frozenset(n for n, f in model.model_fields.items() if is_secret_key(n) or _declared_secret(f))


def check_config_model(slug: str, model: type[BaseModel], _seen: frozenset[type] = frozenset()) -> None:
    """Refuse (``InvalidPlugin``) a config model with a secret field whose name
    does not look like a secret: the audit log, the CLI and the console mask by
    key name, so such a value would be shown."""
    for name, field in model.model_fields.items():
        if _declared_secret(field) and not is_secret_key(name):
            raise InvalidPlugin(
                f"plugin '{slug}': config field '{name}' of {model.__name__} is a secret but its name does not"
                f" look like one; name it with one of {', '.join(SECRET_WORDS)} (e.g. '{name}_secret')"
            )
        for nested in _models_in(field.annotation):
            if nested not in _seen:
                check_config_model(slug, nested, _seen | {model})


def _known_keys(model: type[BaseModel]) -> dict[str, Any] | None:
    """Accepted top-level key -> field annotation, or None when the model allows extra keys."""
    if model.model_config.get("extra") == "allow":
        return None
    known: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        known[name] = field.annotation
        for alias in (field.alias, field.validation_alias):
            if isinstance(alias, str):
                known[alias] = field.annotation
    return known


def config_keys(model: type[BaseModel]) -> frozenset[str] | None:
    """The top-level keys a config model accepts (None: any)."""
    known = _known_keys(model)
    return None if known is None else frozenset(known)


def unknown_keys(model: type[BaseModel], data: dict[str, Any], prefix: str = "") -> list[str]:
    """Paths of the keys in ``data`` that ``model`` (and its nested models) would
    silently drop."""
    known = _known_keys(model)
    if known is None:
        return []
    found = []
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in known:
            found.append(path)
            continue
        nested = _models_in(known[key])
        if len(nested) != 1:
            continue
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            if isinstance(item, dict):
                where = f"{path}[{i}]." if isinstance(value, list) else f"{path}."
                found.extend(unknown_keys(nested[0], item, where))
    return found


def check_known_keys(model: type[BaseModel], data: dict[str, Any], *, owner: str) -> None:
    """Raise ``InvalidConfig`` naming the keys of ``data`` that ``model`` would drop."""
    unknown = unknown_keys(model, data)
    if unknown:
        listed = ", ".join(_short(k) for k in sorted(unknown))
        known = ", ".join(sorted(config_keys(model) or ())) or "none"
        raise InvalidConfig(f"{owner}: unknown config key{'s' if len(unknown) > 1 else ''} {listed} (known: {known})")


def keep_secrets(
    new: dict[str, Any], stored: dict[str, Any], *, secret: Collection[str] = (), keys: Collection[str] | None = None
) -> dict[str, Any]:
    """``new`` plus every stored secret it leaves out: a top-level key in
    ``secret`` or a secret-looking key at any depth (inside objects present on both
    sides). With ``keys``, only those top-level keys are taken from ``stored``."""
    result = dict(new)
    for key, old in stored.items():
        if keys is not None and key not in keys:
            continue
        secret_key = key in secret or is_secret_key(key)
        if key not in result:
            if secret_key:
                result[key] = old
        elif not secret_key and isinstance(result[key], dict) and isinstance(old, dict):
            result[key] = keep_secrets(result[key], old)
    return result


def dump_config(config: BaseModel) -> dict[str, Any]:
    """A config model instance as the JSON object to store, secrets in clear
    (pydantic's JSON dump masks ``SecretStr``, which would store the mask)."""
    dumped = config.model_dump(mode="json")
    return _reveal(config, dumped)  # type: ignore[no-any-return]


def _reveal(value: Any, dumped: Any) -> Any:
    if isinstance(value, (SecretStr, SecretBytes)):
        secret = value.get_secret_value()
        return secret.decode("utf-8") if isinstance(secret, bytes) else secret
    if isinstance(value, BaseModel) and isinstance(dumped, dict):
        fields = type(value).model_fields
        return {k: _reveal(getattr(value, k), v) if k in fields else v for k, v in dumped.items()}
    if isinstance(value, (list, tuple)) and isinstance(dumped, list):
        return [_reveal(a, b) for a, b in zip(value, dumped)]
    if isinstance(value, dict) and isinstance(dumped, dict) and len(value) == len(dumped):
        return {k: _reveal(a, b) for a, (k, b) in zip(value.values(), dumped.items())}
    return dumped


def json_dumps(value: Any) -> str:
    """Canonical JSON text for the store (strict: no NaN)."""
    return json.dumps(value, ensure_ascii=False, allow_nan=False, sort_keys=True)
