"""Every ```python block of README.md runs as written, top to bottom in one namespace, as a reader would
paste them; the Lightning example's resume starts where its ``last.ckpt`` left off."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from lightning_peft.layouts import base as layout_registry
from lightning_peft.tasks import TextClassifier

README = Path(__file__).parents[1] / "README.md"


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(line, code)`` of every fenced ```python block."""
    return [
        (text[: m.start()].count("\n") + 2, m.group(1))
        for m in re.finditer(r"^```python\n(.*?)^```$", text, flags=re.S | re.M)
    ]


def test_every_python_block_of_the_readme_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    # the README registers a layout (OPT): on a copy of the registry, so later tests see the built-ins only
    monkeypatch.setattr(layout_registry, "_LAYOUTS", dict(layout_registry._LAYOUTS))
    started: list[int] = []
    monkeypatch.setattr(
        TextClassifier, "on_train_start", lambda self: started.append(self.trainer.global_step)
    )
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 4
    namespace: dict = {"__name__": "readme"}
    for line, code in blocks:
        exec(compile(code, f"README.md:{line}", "exec"), namespace)
    # The Lightning example: one epoch, then a new Trainer resumed from last.ckpt for a second epoch.
    steps_per_epoch = len(namespace["datamodule"].train_dataloader())
    assert started == [0, steps_per_epoch]
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert steps_per_epoch == 20 and last["global_step"] == 2 * steps_per_epoch
