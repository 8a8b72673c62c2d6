"""The README's demo command runs and every expectation it prints holds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_demo_runs_on_the_embedded_default(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "examples/demo.py"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin", "PLUGINHOST_DEMO_DIR": str(tmp_path), "COLUMNS": "120"},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "refused before enqueue" in out
    assert "the queued run was refused just before it ran" in out
    assert "FAILED" not in out and "every expectation held" in out
