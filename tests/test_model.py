"""Plugin records, slugs, errors: pure unit tests."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pluginhost import (
    CapabilityDisabled,
    InvalidConfig,
    InvalidPlugin,
    Kind,
    Plugin,
    PluginHostError,
)
from pluginhost.model import check_json_object, check_slug, mask_secrets


@pytest.mark.parametrize("slug", ["a", "email", "crm.v2", "x_y-z", "0abc", "a" * 64])
def test_valid_slugs_are_accepted(slug: str) -> None:
    assert check_slug(slug) == slug
    assert Plugin(slug=slug).slug == slug


@pytest.mark.parametrize(
    "slug",
    ["", "A", "-a", ".a", "a b", "a/b", "a" * 65, "é", "a;drop", "a\n", None, 5, "../etc"],
)
def test_invalid_slugs_raise_invalid_plugin(slug: object) -> None:
    with pytest.raises(InvalidPlugin, match="invalid slug"):
        check_slug(slug)
    with pytest.raises(InvalidPlugin):
        Plugin.parse({"slug": slug})


def test_plugin_defaults_and_arabic_labels_round_trip() -> None:
    p = Plugin(slug="email", label_en="Welcome e-mail", label_ar="بريد الترحيب")
    assert p.kind is Kind.capability and p.enabled and p.config == {} and p.sort == 0
    again = Plugin.model_validate_json(p.model_dump_json())
    assert again.label_ar == "بريد الترحيب"


def test_unknown_kind_is_rejected_with_the_value() -> None:
    with pytest.raises(InvalidPlugin, match="'kind'.*'widget'"):
        Plugin.parse({"slug": "x", "kind": "widget"})


@pytest.mark.parametrize(
    "config, fragment",
    [
        ({"a": float("nan")}, "finite"),
        ({"a": {1, 2}}, "not JSON"),
        ({"a": b"raw"}, "not JSON"),
        ({1: "x"}, "keys must be strings"),
        ({"a": [1, {"b": object()}]}, "a[1].b"),
    ],
)
def test_non_json_config_names_the_field(config: dict, fragment: str) -> None:
    with pytest.raises(InvalidConfig, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        check_json_object(config, owner="plugin 'x'")


def test_config_must_be_an_object() -> None:
    with pytest.raises(InvalidConfig, match="expected a JSON object, got list"):
        check_json_object([1], owner="plugin 'x'")


def test_errors_share_one_base_and_keep_their_message() -> None:
    err = CapabilityDisabled("capability 'x' is disabled")
    assert isinstance(err, PluginHostError)
    assert str(err) == "capability 'x' is disabled"
    assert type(err)(*err.args).args == err.args  # what Celery's JSON transport does


def test_secret_looking_keys_are_masked_at_any_depth() -> None:
    masked = mask_secrets({"smtp_password": "p", "nested": {"API_KEY": "k", "port": 25}, "token": 1})
    assert masked == {"smtp_password": "********", "nested": {"API_KEY": "********", "port": 25}, "token": "********"}


def test_an_unset_secret_is_shown_as_unset_not_masked() -> None:
    from pluginhost.model import MASK

    assert mask_secrets({"token": None, "password": "", "api_key": "k", "auth": {"secret": None}}) == {
        "token": None,
        "password": "",
        "api_key": MASK,
        "auth": {"secret": None},
    }


def test_a_rotated_secret_is_masked_as_changed_on_both_sides_of_a_change() -> None:
    from pluginhost.model import MASK, mask_change

    before = {"api_key": "k1", "db": {"password": "p", "host": "a"}, "token": None, "keys": [{"secret": "s1"}]}
    after = {
        "api_key": "k2",
        "db": {"password": "p", "host": "b"},
        "token": "t",
        "keys": [{"secret": "s2"}, {"secret": "s3"}],
    }
    assert mask_change(before, after) == (
        {"api_key": MASK, "db": {"password": MASK, "host": "a"}, "token": None, "keys": [{"secret": MASK}]},
        {
            "api_key": f"{MASK} (changed)",
            "db": {"password": MASK, "host": "b"},
            "token": MASK,
            "keys": [{"secret": f"{MASK} (changed)"}, {"secret": MASK}],
        },
    )
    # an entry masked once keeps its marks when masked again (CLI, console)
    assert mask_secrets(mask_change(before, after)[1])["api_key"] == f"{MASK} (changed)"


@pytest.mark.parametrize(
    "config, fragment",
    [
        ({"n": 2**63}, "field 'n' must be a 64-bit integer, got 9223372036854775808"),
        ({"n": -(2**63) - 1}, "must be a 64-bit integer"),
        ({"n": 10**5000}, "got an integer of 16610 bits"),
        ({"s": "\x00"}, "field 's' contains a NUL character"),
        ({"a": {"b\x00": 1}}, "key 'b\\x00' at 'a' contains a NUL character"),
        ({"s": ["ok", "\udc80"]}, "field 's[1]' is not valid Unicode"),
        ({"password": b"hunter2"}, "field 'password' is not JSON-serialisable (a bytes value; a secret, not shown)"),
        (
            {"api": {"token": float("nan")}},
            "field 'api.token' must be a finite number, got a value of type float (a secret, not shown)",
        ),
    ],
)
def test_json_the_store_or_its_readers_cannot_hold_is_refused_by_path(config: dict, fragment: str) -> None:
    with pytest.raises(InvalidConfig) as raised:
        check_json_object(config, owner="plugin 'x'")
    assert fragment in str(raised.value)
    assert "hunter2" not in str(raised.value)


def test_a_cyclic_or_very_deep_object_is_refused_not_a_recursion_error() -> None:
    cyclic: dict = {}
    cyclic["self"] = cyclic
    with pytest.raises(InvalidConfig, match="nested more than 100 levels deep"):
        check_json_object(cyclic, owner="plugin 'x'")
    deep: list = []
    for _ in range(98):
        deep = [deep]
    assert check_json_object({"deep": deep}, owner="plugin 'x'")  # the object and 99 lists: 100 levels
    with pytest.raises(InvalidConfig, match="nested more than 100 levels deep"):
        check_json_object({"deep": [deep]}, owner="plugin 'x'")


def test_validation_errors_hide_secret_values_and_mask_containers() -> None:
    from pydantic import BaseModel, Field, SecretStr, ValidationError

    from pluginhost.model import describe_validation_error

    class M(BaseModel):
        smtp_password: SecretStr
        port: int = Field(25, le=65535)
        extra: dict[str, int] = {}

    def message(data: dict) -> str:
        try:
            M.model_validate(data)
        except ValidationError as exc:
            return describe_validation_error(exc, owner="plugin 'x'", secret={"smtp_password"})
        raise AssertionError("valid")

    assert message({"smtp_password": 1234567}) == (
        "plugin 'x': field 'smtp_password' input should be a valid string,"
        " got a value of type int (a secret, not shown)"
    )
    assert "1234567" not in message({"smtp_password": "p", "port": {"token": 1234567}})
    assert message({"smtp_password": "p", "port": 10**5000}).endswith("got an integer of 16610 bits")


def test_secretstr_config_is_dumped_in_clear_for_the_store() -> None:
    from pydantic import BaseModel, SecretStr

    from pluginhost.model import dump_config

    class Inner(BaseModel):
        token: SecretStr = SecretStr("inner")

    class M(BaseModel):
        smtp_password: SecretStr | None = None
        inner: Inner = Inner()
        tokens: list[SecretStr] = []

    dumped = dump_config(M(smtp_password="p", tokens=["a", "b"]))
    assert dumped == {"smtp_password": "p", "inner": {"token": "inner"}, "tokens": ["a", "b"]}


@pytest.mark.parametrize("label", ["a\x00", "\ud800"])
def test_labels_postgresql_cannot_store_are_invalid(label: str) -> None:
    with pytest.raises(InvalidPlugin, match="label_en"):
        Plugin.parse({"slug": "x", "label_en": label})


@pytest.mark.parametrize("sort", [2**31, -(2**31) - 1, 10**5000], ids=["2**31", "-2**31-1", "10**5000"])
def test_a_sort_outside_32_bits_is_invalid_plugin(sort: int) -> None:
    with pytest.raises(InvalidPlugin, match=r"field 'sort' must be a 32-bit integer \(-2147483648 to 2147483647\)"):
        Plugin.parse({"slug": "x", "sort": sort})


_JSONISH = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(alphabet=st.characters(codec=None), max_size=8)
    | st.sampled_from([b"x", object(), 1j]),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.dictionaries(st.text(max_size=4) | st.integers(0, 3), inner, max_size=4)
    ),
    max_leaves=20,
)


@given(_JSONISH)
@settings(max_examples=400, deadline=None)
def test_the_fast_acceptance_pass_agrees_with_the_checking_pass(value: object) -> None:
    """check_json_object first runs a pass that builds no error paths; it must
    accept exactly what the pass that names the offending path accepts."""
    from pluginhost.model import _check_json, _holdable  # the two passes, side by side

    doc = {"v": value}
    try:
        _check_json(doc, "x", "", InvalidConfig, 0, False)
        accepted = True
    except InvalidConfig:
        accepted = False
    assert _holdable(doc, 0) == accepted
