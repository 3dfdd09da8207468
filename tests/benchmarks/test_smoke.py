"""Every benchmark script runs in ``--quick`` mode (tiny models and sizes, seconds) and writes its JSON.

The numbers of a quick run mean nothing; the point is that a change to the library that breaks a benchmark
fails here, not months later when someone re-measures. Each script runs in its own process, as a user runs it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
# Every script with a main() that writes results (common.py and the README renderer are helpers).
HELPERS = {"common.py", "render_readme.py"}
# Scripts that run in a side environment of their own (``make adapterhub-counts``): here they must say so.
SIDE_ENV = {"adapterhub_counts.py": "make adapterhub-counts"}
SCRIPTS = sorted(p.name for p in BENCHMARKS.glob("*.py") if p.name not in HELPERS | set(SIDE_ENV))
OUT_FLAG = {"attention_scaling.py": "--json"}


def test_every_script_is_covered() -> None:
    assert len(SCRIPTS) >= 12, SCRIPTS  # a renamed folder must not turn this test into a no-op


@pytest.mark.parametrize("script", sorted(SIDE_ENV))
def test_side_environment_script_names_its_environment(script: str) -> None:
    pytest.importorskip("torch")
    try:
        import adapters  # noqa: F401

        pytest.skip("adapters is installed here: the script would run for real")
    except ImportError:
        pass
    run = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--quick"], capture_output=True, text=True
    )
    assert run.returncode == 2 and SIDE_ENV[script] in run.stderr, run.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_quick_run_writes_json(script: str, tmp_path: Path) -> None:
    out = tmp_path / f"{script.removesuffix('.py')}.json"
    cmd = [sys.executable, str(BENCHMARKS / script), "--quick", OUT_FLAG.get(script, "--out"), str(out)]
    if script == "attention_scaling.py":
        cmd += ["--png", str(tmp_path / "plot.png")]
    before = {p: p.stat().st_mtime_ns for p in (BENCHMARKS / "results").iterdir()}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    payload = json.loads(out.read_text())
    assert payload, f"{script} wrote an empty JSON"
    after = {p: p.stat().st_mtime_ns for p in (BENCHMARKS / "results").iterdir()}
    assert after == before, "a quick run must not touch benchmarks/results/"
