"""Former home of the web console, which is now the ``pluginhost_web`` package
(installed with ``pip install "pluginhost[web]"``; workers need no web framework).
This name still works for code written against it, with a DeprecationWarning."""

from __future__ import annotations

import warnings

try:
    from pluginhost_web import NoCredentials, WebAuth, create_app
except ImportError as exc:  # installed without the [web] extra
    raise ImportError(f'the console is not installed: pip install "pluginhost[web]" ({exc})') from exc

warnings.warn(
    "pluginhost.web is now pluginhost_web: import create_app from pluginhost_web",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = ["create_app", "WebAuth", "NoCredentials"]
