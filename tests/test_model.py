"""Plugin records, slugs, errors: pure unit tests."""

from __future__ import annotations

import pytest

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
