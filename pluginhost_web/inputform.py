"""A workflow's start form: its fields from the input model's JSON schema, the
submitted form back to a JSON object, and that object checked against the model.

Simple types (string, integer, number, boolean, an enum) get their own input;
anything else (a list, a nested model, a union) is a JSON box for that field.
Every error is ``InvalidInput`` naming the field, the value and what was expected.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from pluginhost import MASK, InvalidInput, check_json_object, is_secret_key

#: The form field of input field ``name`` is ``field.<name>`` (apart from ``csrf_token``).
PREFIX = "field."
#: The form field of a workflow without an input model: the whole input as JSON.
JSON_FIELD = "input"

Kind = Literal["string", "integer", "number", "boolean", "enum", "json"]
SIMPLE = ("string", "integer", "number", "boolean")


@dataclass(frozen=True)
class InputField:
    """One top-level field of an input model, as the form shows it."""

    name: str
    kind: Kind
    required: bool
    default: Any = None
    options: tuple[Any, ...] = ()
    title: str = ""
    description: str = ""

    @property
    def key(self) -> str:
        return PREFIX + self.name


def fields_of(model: type[BaseModel]) -> list[InputField]:
    """The top-level fields of ``model`` in declaration order."""
    schema = model.model_json_schema()
    defs = schema.get("$defs", {})
    required = set(schema.get("required", []))
    return [field_of(name, prop, name in required, defs) for name, prop in schema.get("properties", {}).items()]


def field_of(name: str, prop: dict[str, Any], required: bool, defs: dict[str, Any]) -> InputField:
    shape = resolve(prop, defs)
    options: tuple[Any, ...] = ()
    if "enum" in shape:
        kind: Kind = "enum"
        options = tuple(shape["enum"])
    elif "const" in shape:
        kind, options = "enum", (shape["const"],)
    elif shape.get("type") in SIMPLE:
        kind = shape["type"]
    else:
        kind = "json"
    return InputField(
        name=name,
        kind=kind,
        required=required,
        default=prop.get("default"),
        options=options,
        title=str(prop.get("title") or name),
        description=str(prop.get("description") or ""),
    )


def resolve(prop: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """The schema of one value: a ``$ref`` followed, an optional (``X | None``) unwrapped."""
    ref = prop.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/$defs/"):
        return resolve(defs.get(ref.rpartition("/")[2], {}), defs)
    choices = [c for c in prop.get("anyOf", []) if c.get("type") != "null"]
    if "anyOf" in prop and len(choices) == 1:
        return resolve(choices[0], defs)
    return prop


def parse(fields: list[InputField], form: Mapping[str, Any], *, owner: str) -> dict[str, Any]:
    """The JSON object a submitted start form stands for: an empty optional field is
    left out (the model's default applies), an empty required one is an error."""
    values: dict[str, Any] = {}
    for field in fields:
        raw = form.get(field.key)
        text = raw if isinstance(raw, str) else ""
        if field.kind == "boolean":
            values[field.name] = text not in ("", "false", "off")
            continue
        if text.strip() == "":
            if field.required:
                raise InvalidInput(f"{owner}: field '{field.name}' is required")
            continue
        values[field.name] = parse_value(field, text, owner=owner)
    return values


def parse_value(field: InputField, text: str, *, owner: str) -> Any:
    where = f"{owner}: field '{field.name}'"
    if field.kind == "integer":
        try:
            return int(text.strip())
        except ValueError:
            raise InvalidInput(f"{where} must be an integer, got {text!r}") from None
    if field.kind == "number":
        try:
            number = float(text.strip())
        except ValueError:
            number = math.nan
        if not math.isfinite(number):
            raise InvalidInput(f"{where} must be a number, got {text!r}")
        return number
    if field.kind == "enum":
        for option in field.options:
            if text == str(option):
                return option
        shown = ", ".join(repr(o) for o in field.options)
        raise InvalidInput(f"{where} must be one of {shown}, got {text!r}")
    if field.kind == "json":
        return loads(text, owner=where)
    return text


def parse_object(text: str, *, owner: str) -> dict[str, Any]:
    """A JSON object typed into a box (``InvalidInput`` if it is not one)."""
    return check_json_object(loads(text, owner=owner), owner=owner, error=InvalidInput)


def loads(text: str, *, owner: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"{owner} is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None


def validate(model: type[BaseModel], input: dict[str, Any], *, owner: str) -> None:
    """Raise ``InvalidInput`` naming each field ``model`` refuses in ``input``."""
    try:
        model.model_validate(input)
    except ValidationError as exc:
        raise InvalidInput(f"{owner}: {'; '.join(problem(e) for e in exc.errors())}") from None


def problem(error: Any) -> str:
    """One refusal of pydantic's as a phrase; a secret-looking field's value is not shown."""
    loc = [str(part) for part in error.get("loc", ())]
    where = ".".join(loc) or "."
    if error.get("type") == "missing":
        return f"field '{where}' is required"
    message = str(error.get("msg", "is invalid"))
    value = MASK if loc and is_secret_key(loc[-1]) else repr(error.get("input"))
    return f"field '{where}' {message[:1].lower()}{message[1:]}, got {value}"
