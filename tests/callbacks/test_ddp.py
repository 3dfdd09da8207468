"""DDP with 2 CPU processes: frozen base, no unused-parameter error, identical adapters on every rank,
one adapter-only checkpoint, and a single-process resume from it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lightning_peft as lp
from lightning_peft.callbacks import PEFT
from lightning_peft.callbacks.adapter_checkpoint import META_KEY
from tests.lit_helpers import TinyClassifier, tiny_loader, trainer
from tests.resume import ResumedFrom


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path: Path, assert_resumed_from: ResumedFrom) -> None:
    script = Path(__file__).with_name("ddp_train.py")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert ranks[0]["requires_grad"] == ranks[1]["requires_grad"]
    assert all("lora_" in n or n.startswith("classifier.") for n in ranks[0]["requires_grad"])
    for key, value in ranks[0]["adapters"].items():
        assert torch.equal(value, ranks[1]["adapters"][key]), key

    ckpts = sorted((tmp_path / "ckpt").glob("*.ckpt"))
    assert [p.name for p in ckpts] == ["last.ckpt"]
    saved = torch.load(ckpts[0], weights_only=False)
    assert set(saved["state_dict"]) - {META_KEY} == set(ranks[0]["adapters"])

    # The DDP checkpoint resumes in a single process at its step (3: the end of epoch 0, 3 batches per rank)
    # with its adapters. Lightning carries the 3 batches that epoch had into the single process's epoch of 6
    # batches, so the first resumed batch is numbered 3, in epoch 1.
    module = TinyClassifier()
    config = lp.LoRAConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"])
    probe = assert_resumed_from(ckpts[0], global_step=3, epoch=1, batch=3)
    trainer(tmp_path / "single", [PEFT(config), probe], max_steps=5, max_epochs=10).fit(
        module, tiny_loader(), ckpt_path=str(ckpts[0])
    )
    assert module.trainer.global_step == 5, (saved["global_step"], module.trainer.global_step)
