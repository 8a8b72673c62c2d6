"""The ``pluginhost`` command (also ``celery -A proj pluginhost ...``).

Every command is a thin call into PluginHost; bad input prints one line on
stderr and exits non-zero.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import sys
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any, NoReturn

import click
from celery import Celery
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .errors import PluginHostError
from .host import PluginHost
from .model import mask_secrets

EXIT_ERROR = 1
EXIT_USAGE = 2


class CLIError(click.ClickException):
    """A one-line error for the user."""


def load_host(spec: str | None) -> PluginHost:
    """The host for ``module:attr`` (a Celery app or a PluginHost; ``module`` alone
    looks for ``app``, ``celery`` or ``host``)."""
    if not spec:
        raise CLIError("no app given: pass --app module:app or set PLUGINHOST_APP")
    module_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise CLIError(
            f"cannot import app module {module_name!r}: {exc} (looked in the working directory"
            f" {os.getcwd()} and PYTHONPATH: run from the folder that holds it, or add that"
            " folder to PYTHONPATH)"
        ) from None
    names = [attr] if attr else ["host", "app", "celery"]
    for name in names:
        obj = getattr(module, name, None)
        if isinstance(obj, PluginHost):
            return obj
        if isinstance(obj, Celery):
            return PluginHost.from_app(obj)
    raise CLIError(f"{spec!r} is not a Celery app or PluginHost (looked for {', '.join(names)})")


class HostGroup(click.Group):
    """A group that turns PluginHostError and usage errors into one stderr line,
    and adds the commands of installed extensions (``pluginhost.commands``)."""

    _extensions_loaded = False

    def _load_extensions(self) -> None:
        if self._extensions_loaded:
            return
        self._extensions_loaded = True
        for ep in entry_points(group="pluginhost.commands"):
            try:
                self.add_command(ep.load(), ep.name)
            except Exception as exc:  # one broken extension must not break the others
                click.echo(f"warning: pluginhost extension {ep.name!r} did not load: {exc}", err=True)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        self._load_extensions()
        return super().get_command(ctx, cmd_name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._load_extensions()
        return super().list_commands(ctx)

    def main(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        kwargs["standalone_mode"] = False
        try:
            return super().main(*args, **kwargs)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.Abort:
            _fail("aborted", EXIT_ERROR)
        except click.UsageError as exc:
            _fail(exc.format_message().splitlines()[0], EXIT_USAGE)
        except click.ClickException as exc:
            _fail(exc.format_message(), EXIT_ERROR)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PluginHostError as exc:
            raise CLIError(f"{type(exc).__name__}: {exc}") from None
        except click.ClickException:
            raise
        except (click.exceptions.Exit, click.Abort):
            raise
        except Exception as exc:  # a broker or driver error: one line, not a traceback
            if os.environ.get("PLUGINHOST_DEBUG"):
                raise
            raise CLIError(f"{type(exc).__name__}: {exc}".splitlines()[0]) from None


_CONTROL = re.compile(r"[\x00-\x1f\x7f\u2028\u2029]")


def _fail(message: str, code: int) -> NoReturn:
    # One line, whatever the input held: control characters are shown escaped.
    line = _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode(), message)
    click.echo(f"error: {line}", err=True)
    sys.exit(code)


def host_from_context(ctx: click.Context) -> PluginHost:
    """The PluginHost for this invocation (for extension commands too)."""
    resolve: Callable[[], PluginHost] = ctx.find_object(dict)["resolve"]  # type: ignore[index]
    return resolve()


def console() -> Console:
    return Console(soft_wrap=True, width=200 if not sys.stdout.isatty() else None)


def row(*cells: Any) -> list[Text]:
    """Table cells as plain text: labels and config are data, never rich markup."""
    return [Text(str(c)) for c in cells]


def _plugins_table(plugins: list[Any], title: str | None = None) -> None:
    table = Table(title=title)
    for col in ("slug", "kind", "enabled", "sort", "label_en", "label_ar", "version", "config"):
        table.add_column(col)
    for p in plugins:
        table.add_row(
            *row(
                p.slug,
                str(p.kind),
                "yes" if p.enabled else "no",
                str(p.sort),
                p.label_en,
                p.label_ar,
                str(p.version),
                json.dumps(mask_secrets(p.config), ensure_ascii=False),
            )
        )
    console().print(table)


def _json_arg(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CLIError(f"{what} is not valid JSON: {exc.msg} at position {exc.pos}") from None
    except ValueError:  # Python refuses to read longer integers
        raise CLIError(
            f"{what} is not valid JSON: integer of more than {sys.get_int_max_str_digits()} digits"
        ) from None
    except RecursionError:
        raise CLIError(f"{what} is not valid JSON: nested too deeply") from None


def _pair_value(key: str, text: str) -> Any:
    """VALUE parsed as JSON if it is JSON, else the text itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text
    except (ValueError, RecursionError):
        return _json_arg(text, f"value of {key!r}")


def _wait_opts(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--actor", default=None, help="Recorded in the audit log (default: $USER).")(fn)
    fn = click.option("--wait", is_flag=True, help="Wait for worker acknowledgements and list them.")(fn)
    fn = click.option("--timeout", default=1.0, show_default=True, type=float, help="Seconds to wait.")(fn)
    return fn


def _actor(actor: str | None) -> str:
    return actor or os.environ.get("USER") or "cli"


def _admin_result(host: PluginHost, slug: str, result: Any, wait: bool, *, config: bool = False) -> None:
    """What every plugin mutation prints: the plugin's state after it (its config
    too for ``configure``, secrets masked) and, with ``--wait``, the workers that
    acknowledged it."""
    plugin = host.get(slug) if wait else result
    if plugin is None:  # deleted in between by someone else
        raise host.not_found(slug)
    state = f"enabled={'yes' if plugin.enabled else 'no'} sort={plugin.sort} version={plugin.version}"
    click.echo(f"{plugin.slug}: {state}")
    if config:
        click.echo(f"config: {json.dumps(mask_secrets(plugin.config), ensure_ascii=False)}")
    if wait:
        _acks(result)


def _acks(names: list[str]) -> None:
    click.echo(f"acknowledged by {len(names)} worker(s): {', '.join(names) or '-'}")


def _read_lines(source: Any) -> list[Any]:
    """The JSON value of every line of a JSON Lines file (a blank line only at the end)."""
    name = getattr(source, "name", "input")
    lines = source.read().splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise CLIError(f"{name} has no lines: nothing to run")
    values = []
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            raise CLIError(f"{name} line {number} is blank: one JSON object per line")
        values.append(_json_arg(text, f"{name} line {number}"))
    return values


def _run_many(host: PluginHost, slug: str, source: Any, wait: bool, timeout: float) -> None:
    from .errors import InvalidInput

    inputs = _read_lines(source)
    try:
        results = host.run_capability_many(slug, inputs)
    except InvalidInput as exc:
        found = re.match(r"input (\d+): ", str(exc))
        where = f" ({getattr(source, 'name', 'input')} line {int(found[1]) + 1})" if found else ""
        raise InvalidInput(f"{exc}{where}; nothing was enqueued") from None
    if not wait:
        click.echo("\n".join(r.id for r in results.results))
        return
    failed = 0
    for result in results.results:
        value = result.get(timeout=timeout, propagate=False)
        if result.failed():
            failed += 1
            value = {"error": f"{type(value).__name__}: {value}", "task_id": result.id}
        click.echo(json.dumps(value, ensure_ascii=False, default=str))
    if failed:
        raise CLIError(f"{failed} of {len(results.results)} run(s) failed")


def _commands(group: click.Group) -> None:
    @group.command("list")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
    @click.pass_context
    def list_(ctx: click.Context, as_json: bool) -> None:
        """Every plugin, ordered by (sort, slug)."""
        plugins = host_from_context(ctx).list()
        if as_json:
            rows = [{**p.to_json(), "config": mask_secrets(p.config)} for p in plugins]
            click.echo(json.dumps(rows, ensure_ascii=False, indent=2))
        else:
            _plugins_table(plugins)

    @group.command()
    @click.argument("slug")
    @click.pass_context
    def show(ctx: click.Context, slug: str) -> None:
        """One plugin as JSON."""
        from .model import check_slug

        host = host_from_context(ctx)
        plugin = host.get(check_slug(slug))
        if plugin is None:
            raise host.not_found(slug)
        click.echo(
            json.dumps({**plugin.to_json(), "config": mask_secrets(plugin.config)}, ensure_ascii=False, indent=2)
        )

    @group.command()
    @click.argument("slug")
    @_wait_opts
    @click.pass_context
    def enable(ctx: click.Context, slug: str, actor: str | None, wait: bool, timeout: float) -> None:
        """Enable a plugin everywhere."""
        host = host_from_context(ctx)
        _admin_result(host, slug, host.enable(slug, actor=_actor(actor), wait=wait, timeout=timeout), wait)

    @group.command()
    @click.argument("slug")
    @_wait_opts
    @click.pass_context
    def disable(ctx: click.Context, slug: str, actor: str | None, wait: bool, timeout: float) -> None:
        """Disable a plugin everywhere."""
        host = host_from_context(ctx)
        _admin_result(host, slug, host.disable(slug, actor=_actor(actor), wait=wait, timeout=timeout), wait)

    @group.command()
    @click.argument("slug")
    @click.argument("pairs", nargs=-1)
    @click.option("--json", "json_text", default=None, help="The config as a JSON object (instead of KEY=VALUE pairs).")
    @click.option("--merge", is_flag=True, help="Change only the keys given; the others keep their stored values.")
    @_wait_opts
    @click.pass_context
    def configure(
        ctx: click.Context,
        slug: str,
        pairs: tuple[str, ...],
        json_text: str | None,
        merge: bool,
        actor: str | None,
        wait: bool,
        timeout: float,
    ) -> None:
        """Set a plugin's config from KEY=VALUE pairs (VALUE read as JSON if it is
        JSON, else as text) or --json '{...}'.

        Without --merge the config given replaces the stored one: keys left out go
        back to their defaults, except stored secrets, which are kept (set one to
        null to clear it). With --merge only the keys given change. Unknown keys and
        invalid values are refused and nothing is written (as host.configure)."""
        host = host_from_context(ctx)
        if json_text is not None and pairs:
            raise click.UsageError("give KEY=VALUE pairs or --json, not both")
        if json_text is not None:
            config = _json_arg(json_text, "--json")
        elif pairs:
            config = {}
            for pair in pairs:
                key, sep, value = pair.partition("=")
                if not sep or not key:
                    raise click.UsageError(f"expected KEY=VALUE, got {pair!r}")
                config[key] = _pair_value(key, value)
        else:
            raise click.UsageError("give KEY=VALUE pairs or --json '{...}'")
        result = host.configure(slug, config, merge=merge, actor=_actor(actor), wait=wait, timeout=timeout)
        _admin_result(host, slug, result, wait, config=True)

    @group.command("sort")
    @click.argument("slug")
    @click.argument("position", type=int)
    @_wait_opts
    @click.pass_context
    def sort_(ctx: click.Context, slug: str, position: int, actor: str | None, wait: bool, timeout: float) -> None:
        """Set a plugin's sort weight (navigation order)."""
        host = host_from_context(ctx)
        _admin_result(host, slug, host.set_sort(slug, position, actor=_actor(actor), wait=wait, timeout=timeout), wait)

    @group.command()
    @click.argument("slug")
    @click.argument("key")
    @click.pass_context
    def config(ctx: click.Context, slug: str, key: str) -> None:
        """One config value as JSON."""
        from .model import did_you_mean

        host = host_from_context(ctx)
        plugin = host.get(slug)
        if plugin is None:
            raise host.not_found(slug)
        if key not in plugin.config:
            raise CLIError(f"plugin '{slug}' has no config key {key!r}{did_you_mean(key, plugin.config)}")
        click.echo(json.dumps(mask_secrets({key: plugin.config[key]})[key], ensure_ascii=False))

    @group.command()
    @click.option("--kind", default=None, help="Only plugins of this kind.")
    @click.option("--lang", type=click.Choice(["en", "ar"]), default="en", show_default=True)
    @click.pass_context
    def nav(ctx: click.Context, kind: str | None, lang: str) -> None:
        """Enabled plugins in navigation order."""
        from .errors import InvalidPlugin
        from .model import Kind

        if kind is not None and kind not in {k.value for k in Kind}:
            raise InvalidPlugin(f"unknown kind {kind!r}: expected one of {', '.join(k.value for k in Kind)}")
        table = Table()
        for col in ("sort", "slug", "kind", "label"):
            table.add_column(col, justify="right" if col == "sort" else "left")
        for p in host_from_context(ctx).nav(kind):
            label = (p.label_ar if lang == "ar" else p.label_en) or p.slug
            table.add_row(*row(p.sort, p.slug, p.kind.value, label))
        console().print(table)

    @group.command()
    @click.pass_context
    def capabilities(ctx: click.Context) -> None:
        """Declared capabilities with their plugin and state."""
        host = host_from_context(ctx)
        table = Table()
        for col in ("capability", "task", "plugin", "enabled", "on_disabled"):
            table.add_column(col)
        for slug in host.capabilities():
            cap = host.declared(slug)
            table.add_row(
                *row(slug, cap.task_name, cap.plugin, "yes" if host.is_enabled(cap.plugin) else "no", cap.on_disabled)
            )
        console().print(table)

    @group.command()
    @click.argument("slug")
    @click.option("--input", "input_text", default=None, help="The input as a JSON object (default {}).")
    @click.option(
        "--input-file",
        type=click.File("r", encoding="utf-8"),
        default=None,
        help="One run per line: a file of JSON objects (JSON Lines; - for stdin).",
    )
    @click.option("--wait", is_flag=True, help="Wait for the result and print it.")
    @click.option("--timeout", default=30.0, show_default=True, type=float)
    @click.pass_context
    def run(ctx: click.Context, slug: str, input_text: str | None, input_file: Any, wait: bool, timeout: float) -> None:
        """Enqueue a capability run (prints the task id, or the result with --wait).

        With --input-file, every line is validated first and the batch is checked
        once (host.run_capability_many): one bad line enqueues nothing. Prints one
        task id per line (with --wait one result per line, in the file's order;
        exit 1 if any run failed)."""
        host = host_from_context(ctx)
        if input_file is not None:
            if input_text is not None:
                raise click.UsageError("give --input or --input-file, not both")
            _run_many(host, slug, input_file, wait, timeout)
            return
        payload = _json_arg(input_text or "{}", "--input")
        result = host.run_capability(slug, payload)
        if not wait:
            click.echo(result.id)
            return
        value = result.get(timeout=timeout)
        click.echo(json.dumps(value, ensure_ascii=False, default=str))

    @group.command()
    @_wait_opts
    @click.pass_context
    def refresh(ctx: click.Context, actor: str | None, wait: bool, timeout: float) -> None:
        """Re-read the store here and on every worker."""
        host = host_from_context(ctx)
        acks = host.refresh(actor=_actor(actor), wait=wait, timeout=timeout)
        click.echo(f"revision {host.revision}")
        if wait:
            _acks(acks or [])

    @group.command()
    @click.option("--timeout", default=1.0, show_default=True, type=float)
    @click.pass_context
    def workers(ctx: click.Context, timeout: float) -> None:
        """Live workers and the store revision each has applied."""
        host = host_from_context(ctx)
        current = host.revision
        table = Table()
        for col in ("worker", "revision", "current", "pool", "processes"):
            table.add_column(col)
        found = host.workers(timeout=timeout)
        silent = 0
        for name, info in sorted(found.items()):
            if "error" in info:  # registered but silent, or a worker without pluginhost
                silent += 1
                table.add_row(*row(name, "-", "NO", info["error"], "-"))
                continue
            rev = info.get("revision")
            table.add_row(
                *row(
                    name,
                    str(rev),
                    "yes" if rev == current else "NO",
                    str(info.get("pool")),
                    str(len(info.get("processes") or []) or 1),
                )
            )
        console().print(table)
        click.echo(
            f"{len(found) - silent} worker(s) answered"
            + (f", {silent} without a revision" if silent else "")
            + f"; store revision {current}"
        )

    @group.command()
    @click.argument("slug", required=False)
    @click.option("--actor", default=None)
    @click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 10000))
    @click.option("--json", "as_json", is_flag=True)
    @click.pass_context
    def audit(ctx: click.Context, slug: str | None, actor: str | None, limit: int, as_json: bool) -> None:
        """Admin changes, newest first (secret-looking config values masked)."""
        entries = host_from_context(ctx).audit(slug, actor=actor, limit=limit)
        rows = [e.masked() for e in entries]
        if as_json:
            click.echo(json.dumps([r.model_dump(mode="json") for r in rows], ensure_ascii=False, indent=2))
            return
        table = Table()
        for col in ("at", "actor", "slug", "action", "change"):
            table.add_column(col)
        for e in rows:
            table.add_row(*row(e.at.strftime("%Y-%m-%d %H:%M:%S"), e.actor or "-", e.slug, e.action, e.summary()))
        console().print(table)

    @group.command()
    @click.pass_context
    def sync(ctx: click.Context) -> None:
        """Migrate the schema and create rows for declared capabilities."""
        created = host_from_context(ctx).sync()
        click.echo(f"created {len(created)} plugin(s){': ' if created else ''}{', '.join(p.slug for p in created)}")

    @group.group()
    def db() -> None:
        """Database schema."""

    @db.command()
    @click.pass_context
    def upgrade(ctx: click.Context) -> None:
        """Apply the schema migrations (pluginhost's and installed extensions')."""
        host = host_from_context(ctx)
        migrate = getattr(host.store, "migrate", None)
        if migrate is None:
            raise CLIError(f"{type(host.store).__name__} has no schema to migrate")
        migrate()
        for ep in entry_points(group="pluginhost.migrations"):
            ep.load()(host)
        click.echo("schema is up to date")

    @group.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
    def web() -> None:
        """Serve the web console (needs the [web] extra: pip install "pluginhost[web]")."""
        # Replaced by the console's own command when pluginhost_web is installed
        # (entry point pluginhost.commands); a worker needs no web framework.
        raise CLIError('the console is not installed: pip install "pluginhost[web]"')


@click.group(cls=HostGroup)
@click.option("--app", "-A", "app_spec", envvar="PLUGINHOST_APP", default=None, help="module:app (or $PLUGINHOST_APP).")
@click.version_option(package_name="pluginhost")
@click.pass_context
def main(ctx: click.Context, app_spec: str | None) -> None:
    """Manage pluginhost plugins, capabilities and workers."""
    cache: dict[str, PluginHost] = {}

    def resolve() -> PluginHost:
        if "host" not in cache:
            cache["host"] = load_host(app_spec)
        return cache["host"]

    ctx.obj = {"resolve": resolve}


@click.group("pluginhost", cls=HostGroup)
@click.pass_context
def celery_command(ctx: click.Context) -> None:
    """pluginhost commands for this app (celery -A proj pluginhost ...)."""
    celery_ctx = ctx.obj
    app = getattr(celery_ctx, "app", None)
    if app is None:
        raise CLIError("no app: run as celery -A module pluginhost ...")
    ctx.obj = {"resolve": lambda: PluginHost.from_app(app)}


_commands(main)
celery_command.commands = dict(main.commands)
