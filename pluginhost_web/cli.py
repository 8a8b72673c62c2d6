"""``pluginhost web``: serve the console (added to the ``pluginhost`` command by
the ``pluginhost.commands`` entry point when this package is installed)."""

from __future__ import annotations

import os

import click

from pluginhost.cli import host_from_context, load_host


@click.command()
@click.option("--app", "-A", "app_spec", default=None, help="module:app (as `pluginhost --app`).")
@click.option("--host", "bind", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--flows", "flows_spec", default=None, help="module:attr of the Workflows (default: found beside the app)."
)
@click.option("--insecure-local", is_flag=True, help="Without credentials, serve 127.0.0.1 clients as user 'local'.")
@click.pass_context
def web(
    ctx: click.Context, app_spec: str | None, bind: str, port: int, flows_spec: str | None, insecure_local: bool
) -> None:
    """Serve the web console (credentials: pluginhost_web_users / pluginhost_web_token)."""
    from .serve import find_flows, serve

    host = load_host(app_spec) if app_spec else host_from_context(ctx)
    root = ctx.find_root().params  # `pluginhost --app` or `celery -A`
    spec = flows_spec or app_spec or root.get("app_spec") or root.get("app") or os.environ.get("PLUGINHOST_APP")
    serve(host, flows=find_flows(host, spec), bind=bind, port=port, insecure_local=insecure_local)
