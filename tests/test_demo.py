"""The README's demo command runs, every expectation it prints holds, it fits an
80-column log and it stops its worker promptly."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAMP = re.compile(r"^\s*(\d+\.\d\d)s ")


def test_readme_demo_runs_on_the_embedded_default(tmp_path: Path) -> None:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "examples/demo.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        # no TTY, as in CI or `| tee`: the width comes from COLUMNS
        env={
            "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin",
            "PLUGINHOST_DEMO_DIR": str(tmp_path),
            "COLUMNS": "80",
        },
    )
    wall_s = time.monotonic() - started
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "refused before enqueue" in out
    assert "the queued run was refused just before it ran" in out
    assert "FAILED" not in out and "every expectation held" in out

    lines = out.splitlines()
    too_wide = [line for line in lines if len(line) > 80]
    assert not too_wide, f"{len(too_wide)} line(s) wider than 80 columns: {too_wide[0]!r}"
    # nothing cut off (rich marks a cut with an ellipsis), e.g. the status column
    assert "\u2026" not in out, [line for line in lines if "\u2026" in line]
    # a wrapped message continues indented under its text, never at column 0
    flush_left = [line for line in lines if line[:1] not in ("", " ", "\u2500")]
    assert flush_left == [lines[0], lines[-1]], flush_left

    # the worker's stop is the time between the last two stamped lines: a
    # prefork pool's warm shutdown (~2 s here), not a signal timing out
    stamps = [float(m.group(1)) for m in map(STAMP.match, lines) if m]
    stop_s = stamps[-1] - stamps[-2]
    assert "worker" in [line for line in lines if STAMP.match(line)][-1]
    assert stop_s < 4.5, f"stopping the worker took {stop_s:.1f} s (whole demo {wall_s:.1f} s)"
