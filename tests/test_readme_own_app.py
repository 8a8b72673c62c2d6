"""The README's "Your own app, no servers" runs as written: its ``shop.py`` on a
real worker, and each command of the block after it, in order."""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pluginhost import CapabilityDisabled, embedded_conf

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def readme_blocks() -> tuple[str, list[str]]:
    """``shop.py`` (the python block that starts with ``# shop.py``) and the lines of
    the bash block that follows it."""
    text = (ROOT / "README.md").read_text()
    found = re.search(r"```python\n(# shop\.py\n.*?)```.*?```bash\n(.*?)```", text, re.S)
    assert found, "README.md has no ```python block starting '# shop.py' followed by a ```bash block"
    return found.group(1), found.group(2).splitlines()


def split_comment(line: str) -> tuple[str, str]:
    """A command line and its trailing comment (from a '#' outside quotes)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].strip(), line[i + 1 :].strip()
    return line.strip(), ""


@pytest.mark.parametrize("backend", ["embedded"], indirect=True)
def test_readme_own_app_runs_on_a_real_worker_as_written(workers: Any, tmp_path: Path) -> None:
    source, commands = readme_blocks()
    (tmp_path / "shop.py").write_text(source)
    worker_line, *steps, stop_line = [split_comment(line) for line in commands if line.strip()]
    assert stop_line[0] == "kill %1", stop_line  # the job the first line started

    # the worker line is started by the harness (stopped by the fixture, whatever
    # happens) and, as when the block is pasted, the next line runs at once
    argv = shlex.split(worker_line[0].rstrip("& "))
    assert argv[:4] == ["celery", "-A", "shop", "worker"], worker_line
    conf = embedded_conf(tmp_path / ".pluginhost")  # what shop.py's embedded_app uses
    worker = workers(
        "shop",
        conf=conf,
        queues=["celery"],
        extra_args=argv[4:],
        env={"PYTHONPATH": f"{tmp_path}:{ROOT}"},
        wait=False,
    )

    env = {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(tmp_path)}
    for command, comment in steps:
        done = subprocess.run(
            ["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
        )
        said = f"$ {command}\nexit {done.returncode}\n{done.stdout}{done.stderr}"
        if comment.startswith("refused"):
            assert done.returncode != 0, said
            assert "disabled" in done.stderr, said
        else:
            assert done.returncode == 0, said + worker.log_tail()
        if comment.startswith("prints "):
            assert comment.removeprefix("prints ") in done.stdout, said

    # the two runs before the disable reached the worker, the refused one did not
    received = re.findall(r"Task pluginhost\.capability\.welcome_email\[[0-9a-f-]+\] received", worker.log_text())
    assert len(received) == 2, worker.log_tail()
    # `kill %1` is SIGTERM to the worker's main process: it exits by itself, cleanly
    assert worker.stop(timeout=20) == 0, worker.log_tail()

    # the module itself, imported in this process, against the same folder
    spec = importlib.util.spec_from_file_location("readme_shop", tmp_path / "shop.py")
    assert spec and spec.loader
    shop = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shop)
    try:
        assert not shop.host.is_enabled("welcome_email")
        with pytest.raises(CapabilityDisabled):
            shop.host.run_capability("welcome_email", {"email": "a@b.c"})
    finally:
        shop.host.store.close()
