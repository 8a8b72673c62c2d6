"""benchmarks/readme_table.py: the README's table comes from a run's summary.json,
with the run's date and load, and a run that cannot stand for the figures is refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "readme_table.py"

README = """# project

## Benchmarks

Some words.

<!-- benchmarks:begin -->
| old | table |
<!-- benchmarks:end -->

After the table.
"""


def _run_dir(tmp_path: Path, **run: Any) -> Path:
    rows = [
        {"figure": "dispatch, PostgreSQL + Redis", "bare": "1800 calls/s", "pluginhost": "1750 calls/s",
         "ratio": 0.972, "target": ">= 0.95", "passed": True},
        {"figure": "5-step workflow | solo", "bare": "40.1 ms", "pluginhost": "55.0 ms",
         "ratio": 1.372, "target": "<= 1.3", "passed": False},
        {"figure": "propagation p99", "bare": "", "pluginhost": "7.9 ms", "ratio": None,
         "target": "", "passed": None},
    ]  # fmt: skip
    details = {"started": "2026-12-02 16:00 UTC", "seconds": 3000, "load_start": "0.10 0.20 0.30",
               "load_end": "1.50 1.40 1.20", "cpus": 2, "quick": False, "disturbed": [], "errors": 0}  # fmt: skip
    details.update(run)
    log_dir = tmp_path / "run"
    log_dir.mkdir()
    (log_dir / "summary.json").write_text(json.dumps({"run": details, "rows": rows}))
    return log_dir


def _table(log_dir: Path, readme: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), str(log_dir), "--readme", str(readme), *extra],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_the_table_is_written_between_the_markers_with_the_runs_date_and_load(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(README)
    log_dir = _run_dir(tmp_path)
    done = _table(log_dir, readme)
    assert done.returncode == 0, done.stderr
    text = readme.read_text()
    assert "| old | table |" not in text and text.endswith("After the table.\n")
    assert "2026-12-02 16:00 UTC, 50 min, 2 CPUs, load 0.10 0.20 0.30 at the start and 1.50 1.40 1.20" in text
    assert "| dispatch, PostgreSQL + Redis | 1800 calls/s | 1750 calls/s | 0.972 | >= 0.95 | pass |" in text
    assert "| 5-step workflow \\| solo | 40.1 ms | 55.0 ms | 1.372 | <= 1.3 | **missed** |" in text
    assert "| propagation p99 | - | 7.9 ms | - | - | info |" in text
    assert _table(log_dir, readme, "--check").returncode == 0  # the same run: no difference
    readme.write_text(text.replace("0.972", "0.990"))
    assert _table(log_dir, readme, "--check").returncode == 1  # hand-edited: caught


def test_a_quick_or_disturbed_run_is_refused_unless_forced_and_then_says_so(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(README)
    log_dir = _run_dir(tmp_path, quick=True, disturbed=["workflow"])
    done = _table(log_dir, readme)
    assert done.returncode == 2 and "--quick" in done.stderr and "workflow" in done.stderr
    assert readme.read_text() == README  # nothing written
    assert _table(log_dir, readme, "--force").returncode == 0
    assert "**Not a clean run:** a --quick run (small N); other benchmarks ran during workflow." in readme.read_text()


def test_a_readme_without_markers_or_an_old_summary_is_a_clear_error(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    done = _table(_run_dir(tmp_path), readme)
    assert done.returncode == 2 and "benchmarks:begin" in done.stderr
    old = tmp_path / "old"
    old.mkdir()
    (old / "summary.json").write_text("[]")  # rows only, as the runner wrote them before
    readme.write_text(README)
    done = _table(old, readme)
    assert done.returncode == 2 and "no run details" in done.stderr


def test_the_project_readme_has_the_markers() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert text.count("<!-- benchmarks:begin -->") == 1 and text.count("<!-- benchmarks:end -->") == 1
