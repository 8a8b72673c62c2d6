"""The test suite's own guards (pyproject.toml's filterwarnings)."""

from __future__ import annotations

import warnings

import pytest


def test_a_warning_raised_in_a_test_fails_it() -> None:
    with pytest.raises(UserWarning, match="any warning"):
        warnings.warn("any warning", UserWarning, stacklevel=1)
    with pytest.raises(DeprecationWarning):
        warnings.warn("a deprecation too", DeprecationWarning, stacklevel=1)
