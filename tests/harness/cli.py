"""The ``pluginhost`` command through its installed entry point, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.harness.conf import PH_CONF_ENV, REPO_ROOT


def run_cli(conf: dict[str, Any], app: str, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """``pluginhost ARGS`` (the console script next to this interpreter) with the
    test's settings in ``PH_CONF`` and ``PLUGINHOST_APP=app``; output captured."""
    env = {**os.environ, PH_CONF_ENV: json.dumps(conf), "PLUGINHOST_APP": app, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [str(Path(sys.executable).with_name("pluginhost")), *args],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
