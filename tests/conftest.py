"""Shared fixtures; the tiny models and helpers they build on are in ``tests/models.py``."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

from tests.models import tiny_model

if TYPE_CHECKING:
    from tests.resume import ResumeProbe

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def bert() -> torch.nn.Module:
    return tiny_model("bert")


@pytest.fixture
def assert_resumed_from() -> Iterator[Callable[..., ResumeProbe]]:
    """Make :class:`tests.resume.ResumeProbe` callbacks: pass one to the resumed Trainer and it asserts the
    run starts at the checkpoint's step / epoch / batch with the checkpoint's tensors restored, before any
    outcome is compared. The test fails if a probe never saw a training batch.

    Example::

        probe = assert_resumed_from(ckpt, global_step=6, epoch=1, batch=0)
        trainer(..., callbacks=[..., probe]).fit(module, loader, ckpt_path=str(ckpt))
    """
    from tests.resume import ResumeProbe

    probes: list[ResumeProbe] = []

    def make(ckpt_path: str | Path, *, global_step: int, epoch: int, batch: int) -> ResumeProbe:
        probes.append(ResumeProbe(ckpt_path, global_step=global_step, epoch=epoch, batch=batch))
        return probes[-1]

    yield make
    assert all(p.fired for p in probes), (
        "a ResumeProbe never saw a training batch: was it passed to the Trainer?"
    )
