"""Every script under scripts/ runs here at a tiny size, as its own process (a smoke run: its
figures are not asserted, timings are measured by the scripts themselves, at full size), so a
name that moved breaks a test, not a benchmark found broken months later."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# each script, and its tiny run: the arguments, and a line its output must hold
TINY = {
    "bench.py": (["--rows", "20", "--latency-mean", "2", "--time-scale", "0.02"], "statuses"),
    "bench_checks.py": (["--images", "2"], "2K photo grain"),
    "bench_crash.py": (
        ["--rows", "30", "--kills", "1", "--time-scale", "0.02", "--listing", "on"],
        "rows_lost",
    ),
    "bench_http.py": (["--requests", "20"], "our poll"),
    "bench_report.py": (["--rows", "300", "--decisions", "5"], "review_export_ms"),
    "bench_scale.py": (["--rows", "500"], "resume_peak_rss_mb"),
    "first_run.py": (["--only", "shopify"], "shopify"),
}


def test_every_script_has_a_tiny_run() -> None:
    assert sorted(p.name for p in (ROOT / "scripts").glob("*.py")) == sorted(TINY)


@pytest.mark.parametrize("script", sorted(TINY))
def test_a_script_runs_at_a_tiny_size(
    script: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if script == "bench_report.py":
        request.getfixturevalue("chromium")  # the review's waits are measured in Chromium
    arguments, said = TINY[script]
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), *arguments],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert said in done.stdout, done.stdout[-2000:]
