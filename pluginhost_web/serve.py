"""``pluginhost web``: find the app's Workflows, check the credentials, run uvicorn."""

from __future__ import annotations

import importlib
import logging
from typing import Any

from pluginhost import PluginHost

from .app import create_app
from .auth import NoCredentials, WebAuth
from .console import FlowsLike

log = logging.getLogger("pluginhost.web")
LOOPBACK = "127.0.0.1"


def find_flows(host: PluginHost, spec: str | None) -> FlowsLike | None:
    """The workflows service: ``module:attr`` if given with an attribute, else the
    object in ``module`` that serves this host (a ``Workflows(host)``), else None."""
    if not spec:
        return None
    module_name, _, attr = spec.partition(":")
    module = importlib.import_module(module_name)
    if attr and not _is_flows(getattr(module, attr, None), None):
        attr = ""  # module:app names the Celery app: look for the flows beside it
    if attr:
        found: Any = getattr(module, attr)
        return found  # type: ignore[no-any-return]
    return next((v for v in vars(module).values() if _is_flows(v, host)), None)


def _is_flows(value: Any, host: PluginHost | None) -> bool:
    looks = all(callable(getattr(value, m, None)) for m in ("plan", "runs", "run", "resume", "version"))
    return looks and (host is None or getattr(value, "host", None) is host)


def console_auth(host: PluginHost, *, bind: str, insecure_local: bool) -> WebAuth:
    """The credentials from the app's config; without any, local mode only when
    ``insecure_local`` is set and the server binds to 127.0.0.1."""
    auth = WebAuth.from_app(host.app)
    if insecure_local and bind != LOOPBACK:
        raise NoCredentials(f"--insecure-local serves only {LOOPBACK}, not {bind!r}")
    if auth.configured:
        return auth
    if insecure_local:
        log.warning("pluginhost web: no credentials, serving loopback clients as user 'local'")
        return WebAuth.local()
    return auth.check()  # raises NoCredentials with the settings to use


def serve(
    host: PluginHost,
    *,
    flows: FlowsLike | None = None,
    bind: str = LOOPBACK,
    port: int = 8000,
    insecure_local: bool = False,
) -> None:
    """Serve the console with uvicorn until interrupted."""
    import uvicorn

    app = create_app(host, flows=flows, auth=console_auth(host, bind=bind, insecure_local=insecure_local))
    uvicorn.run(app, host=bind, port=port, log_level="info", server_header=False)
