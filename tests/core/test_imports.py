"""No package-level import cycle: every module imports first, in any order, in a fresh interpreter."""

from __future__ import annotations

import pkgutil
import random
import subprocess
import sys

import lightning_peft


def _modules() -> list[str]:
    return sorted(
        m.name
        for m in pkgutil.walk_packages(lightning_peft.__path__, "lightning_peft.")
        if "__main__" not in m.name
    )


def test_every_module_imports_first_in_a_fresh_interpreter() -> None:
    modules = _modules()
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    failures = []
    for module in modules:  # each one first: a cycle shows as an ImportError for some entry point
        run = subprocess.run([sys.executable, "-c", code, module], capture_output=True, text=True)
        if run.returncode:
            failures.append(f"{module}: {run.stderr.strip().splitlines()[-1]}")
    assert not failures, "\n".join(failures)


def test_random_orders_import_cleanly() -> None:
    modules = _modules()
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    for seed in range(3):
        order = modules[:]
        random.Random(seed).shuffle(order)
        run = subprocess.run([sys.executable, "-c", code, *order], capture_output=True, text=True)
        assert run.returncode == 0, f"order {order[:5]}...: {run.stderr.strip().splitlines()[-1]}"


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
