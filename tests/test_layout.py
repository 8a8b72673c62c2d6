"""The package boundaries: a worker imports no web framework; the console is an
extension of the CLI; the old import path of the console still works."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WEB = ("fastapi", "starlette", "uvicorn", "jinja2", "multipart")


def _modules_after(code: str) -> set[str]:
    script = code + "\nimport sys\nprint('\\n'.join(sorted(sys.modules)))\n"
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True
    )
    return set(done.stdout.split())


def test_the_web_framework_is_only_a_dependency_of_the_web_extra() -> None:
    from importlib.metadata import requires

    declared = requires("pluginhost") or []
    for name in ("fastapi", "uvicorn", "jinja2", "python-multipart"):
        lines = [r for r in declared if r.lower().startswith(name)]
        assert lines and all('extra == "web"' in r for r in lines), (name, lines)


def test_a_worker_process_imports_no_web_framework() -> None:
    loaded = _modules_after(
        "from celery import Celery\n"
        "import pluginhost, pluginhost.cli, workflows, workflows.cli, workflows.runtime\n"
        "from pluginhost import PluginHost\n"
        "from workflows import Workflows\n"
        "host = PluginHost(Celery('w', broker='memory://'), store='memory://')\n"
        "flows = Workflows(host)\n"
    )
    web = sorted(m for m in loaded if m.split(".")[0] in WEB or m.startswith("pluginhost_web"))
    assert web == [], web


def test_the_console_adds_the_web_command_and_the_old_import_path_warns() -> None:
    done = subprocess.run(
        [sys.executable, "-W", "error::DeprecationWarning", "-c", "import pluginhost.web"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode != 0 and "pluginhost.web is now pluginhost_web" in done.stderr
    with pytest.deprecated_call(match="pluginhost.web is now pluginhost_web"):
        import pluginhost.web as old
    from pluginhost_web import create_app

    assert old.create_app is create_app
    helptext = subprocess.run(
        [str(Path(sys.executable).parent / "pluginhost"), "web", "--help"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    ).stdout  # fmt: skip
    assert "--insecure-local" in helptext  # the console's command, not the core's placeholder
