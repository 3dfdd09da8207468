"""No package-level import cycle: every module imports first, in any order.

One subprocess checks all orders: before each trial it drops every ``lightning_peft`` module from
``sys.modules`` (third-party packages stay loaded, so a trial costs our imports only), then imports the
modules of the trial in order. A cycle inside the package fails when its wrong end is imported first.
"""

from __future__ import annotations

import pkgutil
import random
import subprocess
import sys

import lightning_peft

_RUNNER = """
import importlib, json, sys
trials = json.loads(sys.argv[1])
failures = []
for order in trials:
    for name in [n for n in sys.modules if n == "lightning_peft" or n.startswith("lightning_peft.")]:
        del sys.modules[name]
    try:
        for name in order:
            importlib.import_module(name)
    except Exception as err:  # report the trial and go on
        failures.append(f"{order[0]} first ({len(order)} modules): {type(err).__name__}: {err}")
print(json.dumps(failures))
"""


def _modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages(lightning_peft.__path__, "lightning_peft."))


def _run(trials: list[list[str]], env: dict[str, str] | None = None) -> list[str]:
    import json
    import os

    run = subprocess.run(
        [sys.executable, "-c", _RUNNER, json.dumps(trials)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_every_module_imports_first_and_in_random_orders() -> None:
    modules = _modules()
    assert len(modules) > 40  # the walk found the package
    trials = [[m] for m in modules]  # each one first
    for seed in range(3):
        order = modules[:]
        random.Random(seed).shuffle(order)
        trials.append(order)
    failures = _run(trials)
    assert not failures, "\n".join(failures)


def test_the_check_catches_a_cycle(tmp_path) -> None:
    """The runner reports an import cycle: a package whose two modules import each other's names."""
    package = tmp_path / "cyclic"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from cyclic.b import B\nA = 1\n")
    (package / "b.py").write_text("from cyclic.a import A\nB = 2\n")
    failures = _run([["cyclic.a"]], env={"PYTHONPATH": str(tmp_path)})
    assert len(failures) == 1 and "ImportError" in failures[0], failures


def test_core_does_not_import_private_helpers_across_packages() -> None:
    """attention/ and the core share only public, documented functions."""
    import ast
    from pathlib import Path

    root = Path(lightning_peft.__file__).parent
    offenders = []
    for path in [*root.rglob("*.py"), *(root.parent / "attention").glob("*.py")]:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lightning_peft"):
                inside_attention = "attention" in path.parts
                from_attention = node.module.startswith("lightning_peft.attention")
                if inside_attention != from_attention:
                    offenders += [f"{path.name}: {a.name}" for a in node.names if a.name.startswith("_")]
    assert not offenders, offenders
