"""Every README figure that has a JSON source in ``benchmarks/results/`` says what the JSON says.

The attention scaling and training-step tables are generated regions (``benchmarks/render_readme.py``
rewrites them); the figures in prose are listed in that script's ``FIGURES``. A re-measurement that changes
a number fails here until the README is updated.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "render_readme.py"


def _renderer() -> ModuleType:
    spec = importlib.util.spec_from_file_location("render_readme", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_numbers_match_their_json() -> None:
    render = _renderer()
    assert render.problems(render.README.read_text()) == []


def test_a_changed_number_is_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check is not vacuous: one re-measured value makes it fail, in a table and in prose."""
    render = _renderer()
    text = render.README.read_text()
    results = tmp_path / "results"
    results.mkdir()
    for path in render.RESULTS.glob("*.json"):
        (results / path.name).write_text(path.read_text())
    monkeypatch.setattr(render, "RESULTS", results)
    assert render.problems(text) == []

    step = json.loads((results / "train_step.json").read_text())
    step["results"]["full"]["median_ms"] *= 1.5
    (results / "train_step.json").write_text(json.dumps(step))
    ddp = json.loads((results / "ddp_step.json").read_text())
    ddp["ddp_vs_single"] += 0.05
    (results / "ddp_step.json").write_text(json.dumps(ddp))
    found = render.problems(text)
    assert any(p.startswith("region train-step-table") for p in found), found
    assert any(p.startswith("ddp_step.json") for p in found), found
